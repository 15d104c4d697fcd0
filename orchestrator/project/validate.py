"""Checks on what a project file says, each naming the file and key path, what was expected and the fix.

YAML that refuses duplicate and non-string keys; JSON-Schema errors turned
into one sentence and a hint; image references and registries by docker's
grammar; requirement files that a --require-hashes lock can be made from;
Debian package requests; builder endpoints. orchestrator.project.spec calls
these while it builds the typed project.
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path

import jsonschema
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from orchestrator.common.errors import SpecError

# The docker image reference grammar (github.com/distribution/reference):
# [domain[:port]/]path[:tag][@sha256:hex], path components lower-case.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"


DOMAIN_RE = re.compile(rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::([0-9]+))?$")


PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")


TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


# Debian policy 5.6.1 (package names) and 5.6.12 (versions: [epoch:]upstream[-revision]).
DEB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


DEB_VERSION_RE = re.compile(r"^(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*$")


_STR_TAG = "tag:yaml.org,2002:str"


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_keys(file: str, node: yaml.Node, path: tuple = (), seen_nodes: set | None = None) -> None:
    """Refuse duplicate and non-string mapping keys, naming the full key path.

    Runs on the composed node tree, before construction, so the path of a
    nested key (services.tts) is known; plain PyYAML keeps the last value.
    """
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # aliases may point back up the tree
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            line = k.start_mark.line + 1
            if k.tag == _MERGE_TAG:
                _check_keys(file, v, path, seen_nodes)
                continue
            if not isinstance(k, yaml.ScalarNode) or k.tag != _STR_TAG:
                found = f"{k.tag.rsplit(':', 1)[-1]} {k.value}" if isinstance(k, yaml.ScalarNode) else "a complex key"
                raise SpecError(file, _keypath(path), f"expected a string key on line {line}, found {found}",
                                "quote the key, e.g. \"123\":")
            if k.value in first:
                raise SpecError(file, _keypath(path + (k.value,)),
                                f"duplicate key {k.value!r} on line {line} (first defined on line {first[k.value]})",
                                "each service, backend and key may appear once")
            first[k.value] = line
            _check_keys(file, v, path + (k.value,), seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(file, item, path + (i,), seen_nodes)


def parse_yaml(file: str, text: str):
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(file, node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def project_schema() -> dict:
    return json.loads(resources.files("orchestrator").joinpath("data/project.schema.json").read_text())


def _keypath(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def describe(value) -> str:
    if value is None:
        return "nothing (null)"
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return f"{type(value).__name__} {text[:60]}"


# What to write instead, for keys whose schema pattern refused a value.
PATTERN_HINTS = {
    "project": "lower-case letters, digits and . _ - (it names registry repositories), e.g. project: demo",
    "version": "a tag-safe version in quotes, e.g. version: \"0.1.0\" (letters, digits, . _ -)",
    "registry": "host[:port][/path], e.g. registry: 127.0.0.1:5000 or registry: ghcr.io/acme",
    "python": "major.minor in quotes, e.g. python: \"3.11\"",
}


# Keys that take one of several shapes: (what is expected, the fix).
ONE_OF = {
    "allow_sdist": ("false, true or a list of Python package names",
                    "write allow_sdist: false (refuse source-only packages), true, or [name, ...]"),
    "builders.*": ("a Docker endpoint string, or {host: tcp://..., cert_path: DIR}",
                   "write e.g. linux/arm64: ssh://builder@arm-host, or {host: tcp://arm-host:2376, "
                   "cert_path: /etc/orchestrator/arm-host} for TLS (ca.pem, cert.pem, key.pem)"),
    "smoke.engines.*": ("a Docker endpoint string, or {host: tcp://..., cert_path: DIR}",
                        "write e.g. linux/arm64: ssh://ci@arm-host, or {host: tcp://arm-host:2376, "
                        "cert_path: /etc/orchestrator/arm-host} for TLS (ca.pem, cert.pem, key.pem)"),
}


def _schema_hint(err: jsonschema.ValidationError) -> str:
    path = [p for p in err.absolute_path if not isinstance(p, int)]
    last = str(path[-1]) if path else ""
    v = err.validator
    if v == "pattern":
        return PATTERN_HINTS.get(last, f"write a value matching {err.validator_value}")
    if v == "type":
        want = err.validator_value
        if want == "string" and isinstance(err.instance, (int, float)) and not isinstance(err.instance, bool):
            return f"quote the value: {last}: \"{err.instance}\""
        what = " or ".join(want) if isinstance(want, list) else want
        return f"write {'an' if what[:1] in 'aeiou' else 'a'} {what} at {_keypath(err.absolute_path)}"
    if v in ("enum", "const"):
        want = err.validator_value if v == "enum" else [err.validator_value]
        return "use " + " or ".join(repr(w) for w in want)
    if v in ("minItems", "minProperties"):
        return "add at least one entry, or remove the key to get the default"
    if v in ("minimum", "maximum"):
        return f"use a value {'>=' if v == 'minimum' else '<='} {err.validator_value}"
    if v == "minLength":
        return "write a non-empty value, or remove the key to get the default"
    return "see orchestrator/data/project.schema.json for the expected shape"


def schema_error(file: str, err: jsonschema.ValidationError) -> SpecError:
    e = _schema_error_bare(file, err)
    if e.hint is None:
        e.hint = _schema_hint(err)
    return e


def _schema_error_bare(file: str, err: jsonschema.ValidationError) -> SpecError:
    key = _keypath(err.absolute_path)
    v = err.validator
    if v == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        where = _keypath(list(err.absolute_path) + [extra[0]]) if extra else key
        return SpecError(file, where, f"unknown key {extra[0]!r}; expected one of: {allowed}",
                         "remove the key or fix its spelling")
    if v == "required":
        missing = err.message.split("'")[1]
        return SpecError(file, _keypath(list(err.absolute_path) + [missing]),
                         "is required but missing", f"add `{missing}:`")
    if v == "type":
        want = err.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return SpecError(file, key, f"expected {want}, found {describe(err.instance)}")
    if v in ("enum", "const"):
        want = err.validator_value if v == "enum" else [err.validator_value]
        return SpecError(file, key, f"expected one of {want}, found {describe(err.instance)}")
    if v == "pattern":
        return SpecError(file, key, f"expected a value matching {err.validator_value}, found {describe(err.instance)}")
    if v in ("minItems", "minProperties"):
        empty = "list" if isinstance(err.instance, list) else "mapping"
        return SpecError(file, key, f"expected at least one entry, found an empty {empty}")
    if v in ("minimum", "maximum"):
        return SpecError(file, key, f"expected {v} {err.validator_value}, found {err.instance}")
    one_of = ONE_OF.get(key) or ONE_OF.get(key.split(".", 1)[0] + ".*") or ONE_OF.get(key.rsplit(".", 1)[0] + ".*")
    if v == "oneOf" and one_of:
        want, fix = one_of
        return SpecError(file, key, f"expected {want}, found {describe(err.instance)}", fix)
    return SpecError(file, key, err.message)


def expect_file(file: str, key: str, root: Path, rel: str, what: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        lexical = Path(os.path.normpath(root / rel))
        how = " through a symlink" if lexical.is_relative_to(root) else ""
        raise SpecError(file, key, f"{what} {rel!r} is outside the project directory {root} "
                        f"(it resolves{how} to {path})",
                        "keep services and requirements inside the project directory: copy them in "
                        "(a symlink must point inside too)")
    if not path.exists():
        raise SpecError(file, key, f"{what} {rel!r} does not exist (looked at {path})",
                        "create it or fix the path, which is relative to the project file")
    if what.endswith("file") and not path.is_file():
        raise SpecError(file, key, f"expected a file, found a directory: {rel!r}",
                        "point it at a requirements file such as requirements/app.in" if "requirements" in what
                        else f"point it at the {what} itself")
    return path


def _domain_problem(domain: str) -> str | None:
    m = DOMAIN_RE.match(domain)
    if not m:
        return f"{domain!r} is not a host name or address"
    if m.group(1) is not None and not 0 < int(m.group(1)) <= 65535:
        return f"port {m.group(1)} is out of range (1-65535)"
    return None


def _path_problem(path: str) -> str | None:
    for comp in path.split("/"):
        if not PATH_COMPONENT_RE.match(comp):
            if comp.lower() != comp and PATH_COMPONENT_RE.match(comp.lower()):
                return f"repository path component {comp!r} must be lower-case"
            return (f"repository path component {comp!r} must be lower-case letters and digits "
                    "separated by '.', '_', '__' or '-'")
    return None


def image_ref_problem(ref: str) -> str | None:
    """Why ref is not a docker image reference ([host[:port]/]path[:tag][@sha256:hex]), or None."""
    if not ref:
        return "it is empty"
    bad = sorted({c for c in ref if c.isspace() or c in ";|&$`'\"<>(){}*?!\\"})
    if bad:
        return f"it contains {', '.join(repr(c) for c in bad)}"
    rest, digest = ref, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not DIGEST_RE.match(digest):
            return f"the digest {digest!r} is not sha256: followed by 64 lower-case hex digits"
    domain, path = "", rest
    if "/" in rest:
        first, tail = rest.split("/", 1)
        # As docker reads it: the first component is a registry host only if it
        # has a '.' or a ':', is localhost, or has upper-case letters.
        if "." in first or ":" in first or first == "localhost" or first.lower() != first:
            domain, path = first, tail
    if domain and (why := _domain_problem(domain)):
        return why
    tag = None
    if ":" in path:
        path, tag = path.rsplit(":", 1)
        if not TAG_RE.match(tag):
            return f"the tag {tag!r} must be 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'"
    if not path:
        return "the repository name is empty"
    if why := _path_problem(path):
        return why
    if len(f"{domain}/{path}" if domain else path) > 255:
        return "the repository name is longer than 255 characters"
    return None


def registry_problem(value: str) -> str | None:
    """Why value is not a registry (host[:port][/path]) we can push to, or None."""
    if not value:
        return "it is empty"
    domain, _, path = value.partition("/")
    if why := _domain_problem(domain):
        return why
    if "." not in domain and ":" not in domain and domain != "localhost":
        return (f"{domain!r} has no '.' and no ':port', so docker would read it as a Docker Hub "
                "namespace, not a registry host")
    if path and (why := _path_problem(path)):
        return why
    return None


_SOURCE_OPTIONS = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--no-index",
                   "--trusted-host")


_NESTED_OPTIONS = ("-r", "--requirement", "-c", "--constraint")


def _logical_lines(text: str):
    """(first line number, line) with backslash continuations joined and comments dropped (pip's rules)."""
    number, parts = None, []
    for i, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if number is None:
            number = i
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        joined = " ".join(p.strip() for p in parts).strip()
        if joined:
            yield number, joined
        number, parts = None, []
    if parts and (joined := " ".join(p.strip() for p in parts).strip()):
        yield number, joined


def check_requirements_file(file: str, key: str, path: Path) -> None:
    """Refuse what `invoke lock` cannot turn into a --require-hashes lock.

    Locks are resolved by uv from an index or find-links and installed with
    --require-hashes --no-deps; the file's text is the lock's input hash. So
    URL, path and editable requirements, index options (they belong to the
    backend's sources) and nested -r/-c files (outside the hash) are refused.
    """
    path = Path(path)
    try:
        rel = os.path.relpath(path, Path(file).resolve().parent)
    except ValueError:
        rel = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SpecError(file, key, f"cannot read requirements file {rel!r} ({e.strerror})",
                        "make it a readable file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SpecError(file, key, f"requirements file {rel!r} is not UTF-8 (byte {data[e.start]:#04x} on line {line})",
                        "save it as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    for number, line in _logical_lines(text):
        where = f"requirements file {rel!r} line {number}"
        first = line.split()[0]
        option = first.split("=", 1)[0]
        if option in ("-e", "--editable") or first.startswith("-e"):
            raise SpecError(file, key, f"{where}: editable requirement {line!r} cannot be locked",
                            "drop -e: locks install pinned wheels with --require-hashes; the service's own code "
                            "goes in services.<name>.path")
        if option in _SOURCE_OPTIONS or any(first.startswith(o) for o in ("-i", "-f")):
            raise SpecError(file, key, f"{where}: option {line!r} is not allowed in a requirements file",
                            "set index_url, extra_index_urls or find_links on the backend in the project file")
        if option in _NESTED_OPTIONS or any(first.startswith(o) for o in ("-r", "-c")):
            raise SpecError(file, key, f"{where}: {line!r} includes another file, which would not be part of "
                            "the lock's inputs", "copy its requirements into this file")
        if first.startswith("-"):
            raise SpecError(file, key, f"{where}: option {line!r} is not supported",
                            "list requirements only (name, extras, version range, markers)")
        req_text, _, opts = line.partition(" --")
        if opts and not all(o.startswith("hash") for o in (" --" + opts).split(" --")[1:]):
            raise SpecError(file, key, f"{where}: per-requirement option in {line!r} is not supported",
                            "list requirements only (name, extras, version range, markers)")
        try:
            req = Requirement(req_text.strip())
        except InvalidRequirement as e:
            if "://" in req_text or req_text.startswith((".", "/", "~")) or \
                    req_text.strip().endswith((".whl", ".tar.gz", ".zip")):
                raise SpecError(file, key, f"{where}: URL or path requirement {line!r} cannot be locked "
                                "with --require-hashes",
                                "publish the package to an index or a find-links directory and require it by "
                                "name (name==x.y)") from None
            raise SpecError(file, key, f"{where}: {line!r} is not a requirement ({str(e).splitlines()[0]})",
                            "write name[extras]<version range>, e.g. numpy>=1.26,<3") from None
        if req.url:
            raise SpecError(file, key, f"{where}: URL requirement {line!r} cannot be locked with --require-hashes",
                            f"publish {req.name} to an index or a find-links directory and require it by name "
                            f"({req.name}==x.y)")


def system_packages(file: str, key: str, entries: list, below: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Debian package requests as written (`ffmpeg`, `libsndfile1=1.2.0-1`), checked for syntax only.

    below: what the project level already installs for every service (a
    service repeating it is refused: it would be locked and shipped twice).
    Whether a name exists is known only against the archive, at `invoke lock`.
    """
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        name, sep, version = entry.partition("=")
        k = f"{key}[{i}]"
        if not DEB_NAME_RE.match(name):
            lower = name.strip().lower().replace("_", "-")
            fix = (f"write {lower!r}" if lower != name and DEB_NAME_RE.match(lower) else
                   "use the binary package name as `apt-get install` takes it, e.g. ffmpeg or libsndfile1")
            raise SpecError(file, k, f"{entry!r} is not a Debian package name (lower-case letters, digits and "
                            "+ - ., at least two characters, starting with a letter or digit)", fix)
        if sep and not DEB_VERSION_RE.match(version):
            raise SpecError(file, k, f"{version!r} is not a Debian version (expected [epoch:]upstream[-revision], "
                            "e.g. 7:5.1.6-0+deb12u1)", f"write {name}=<version as `apt-cache policy {name}` shows it>, "
                            f"or just {name}")
        if name in seen:
            raise SpecError(file, k, f"{name!r} is listed twice (first at {key}[{seen[name]}])", "list each package once")
        seen[name] = i
        if name in below:
            raise SpecError(file, k, f"{name!r} is already in the project-level system_packages, which every "
                            "service gets", f"remove it from {key}")
    return tuple(entries)


def allow_sdist(file: str, value) -> bool | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    names = []
    for i, entry in enumerate(value):
        try:
            req = Requirement(entry)
        except InvalidRequirement:
            req = None
        if req is None or str(req) != req.name:
            raise SpecError(file, f"allow_sdist[{i}]", f"expected a Python package name, found {entry!r}",
                            "list names only (no versions or extras), e.g. allow_sdist: [openai-whisper]")
        names.append(canonicalize_name(req.name))
    return tuple(sorted(set(names)))


BUILDER_SCHEMES = ("unix", "tcp", "ssh")


BUILDER_EXAMPLES = "ssh://builder@arm-host, tcp://arm-host:2376 or unix:///var/run/docker.sock"


def endpoint_problem(host: str) -> str | None:
    """Why host is not a Docker endpoint this tool can build on (unix, tcp or ssh), or None."""
    scheme, sep, rest = host.partition("://")
    if not sep or scheme not in BUILDER_SCHEMES:
        return f"the scheme must be unix://, tcp:// or ssh://, found {(scheme + '://') if sep else 'no scheme'}"
    if any(c.isspace() for c in host):
        return "it contains white space"
    if scheme == "unix":
        return None if rest.startswith("/") else "a unix:// endpoint needs an absolute socket path (unix:///path)"
    authority = rest.split("/", 1)[0]
    hostport = authority.rsplit("@", 1)[-1]
    name, _, port = hostport.rpartition(":") if hostport.count(":") == 1 else (hostport, "", "")
    if not name:
        return f"a {scheme}:// endpoint needs a host name"
    if port and not (port.isdigit() and 0 < int(port) <= 65535):
        return f"port {port!r} is not a port number (1-65535)"
    return None
