"""Stage 1: the project file, loaded and validated into typed dataclasses.

Every problem is reported as a `SpecError` naming the file, the key path,
what was expected and what was found. Shape is checked with the JSON Schema
in data/project.schema.json; meaning (known backends, torch/CUDA pairs,
platforms, files on disk) is checked here against the compatibility data.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jsonschema
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from orchestrator.common.errors import SpecError
from orchestrator.project import compat as compat_mod

DEFAULT_REGISTRY = "127.0.0.1:5000"
DEFAULT_BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
DEFAULT_BOOTSTRAP_INCLUDE = ("python3", "python3-venv", "python3-pip", "ca-certificates", "libgomp1")
# Layers a project may configure; base, cuda-libs, torch, service and app
# are derived from other keys.
CONFIGURABLE_LAYERS = ("shared",)
NAME_RE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*$")
PLATFORM_RE = re.compile(r"^linux/(amd64|arm64)$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# The docker image reference grammar (github.com/distribution/reference):
# [domain[:port]/]path[:tag][@sha256:hex], path components lower-case.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
DOMAIN_RE = re.compile(rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::([0-9]+))?$")
PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
PYTHON_TAG_RE = re.compile(r"^(\d+)\.(\d+)(?:$|[.-])")
# Debian policy 5.6.1 (package names) and 5.6.12 (versions: [epoch:]upstream[-revision]).
DEB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
DEB_VERSION_RE = re.compile(r"^(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*$")


@dataclass(frozen=True)
class Sources:
    """Where pip/uv find wheels for one backend (strings as written, ${VAR} unexpanded)."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()

    def expanded(self) -> "Sources":
        def exp(s: str) -> str:
            return ENV_RE.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), s)

        return Sources(
            index_url=exp(self.index_url) or None if self.index_url else None,
            extra_index_urls=tuple(u for u in map(exp, self.extra_index_urls) if u),
            find_links=tuple(p for f in self.find_links for p in exp(f).split() if p),
        )

    def index_args(self, find_links: bool = True) -> list[str]:
        """The expanded sources as pip/uv options (--index-url, --extra-index-url, --find-links)."""
        src = self.expanded()
        args = ["--index-url", src.index_url] if src.index_url else []
        args += [a for u in src.extra_index_urls for a in ("--extra-index-url", u)]
        return args + ([a for f in src.find_links for a in ("--find-links", f)] if find_links else [])


@dataclass(frozen=True)
class Backend:
    name: str
    torch_by_platform: tuple[tuple[str, str | None], ...]  # None: no torch layer
    cuda: str | None  # None for cpu
    sources: Sources
    platforms: tuple[str, ...]

    @property
    def is_cuda(self) -> bool:
        return self.cuda is not None

    def torch_for(self, platform: str) -> str | None:
        return dict(self.torch_by_platform).get(platform)

    def torch_summary(self) -> str:
        versions = {t for _, t in self.torch_by_platform}
        if len(versions) == 1:
            return next(iter(versions)) or "none"
        return ", ".join(f"{t or 'none'} ({p})" for p, t in self.torch_by_platform)


@dataclass(frozen=True)
class Service:
    name: str
    path: Path
    requirements: Path | None
    command: tuple[str, ...]
    port: int
    version: str
    backends: tuple[str, ...]
    policy: str = "fallback"
    system_packages: tuple[str, ...] = ()  # Debian packages of this service only (name or name=version)


@dataclass(frozen=True)
class CudaLibs:
    """One CUDA-libs image per CUDA line the backends use (cu124-v1, cu130-v1), shared by every service."""

    revision: int = 1
    # Per torch-less CUDA line, the wheels it holds: (("12.4", ("nvidia-cuda-runtime-cu12",)),).
    # With torch, the set is torch's pins.
    packages: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    cuda: str | None = None  # the legacy single-line key, checked against the backends

    def packages_for(self, cuda: str) -> tuple[str, ...]:
        return dict(self.packages or ()).get(cuda, ())

    @staticmethod
    def line_tag(cuda: str) -> str:
        return compat_mod.load().cuda(cuda).tag  # cu130

    def tag(self, cuda: str) -> str:
        return f"{self.line_tag(cuda)}-v{self.revision}"  # cu130-v1


@dataclass(frozen=True)
class LayerSplit:
    """How a dependency lock is cut into layers (orchestrator/layer_split.py states the policy)."""

    own_mb: float = 8.0  # a package this big, installed, gets a layer of its own...
    max_layers: int = 12  # ...until the lock has this many layers, the shared one included


@dataclass(frozen=True)
class Base:
    image: str
    suite: str
    include: tuple[str, ...]
    bootstrap_when: str = "offline"  # always | offline (only when image's registry cannot be reached)


@dataclass(frozen=True)
class Builder:
    """The Docker Engine that builds a platform (`builders:` in the project file).

    host is a Docker endpoint as DOCKER_HOST takes it: unix:///path, tcp://host:port
    or ssh://[user@]host. cert_path (tcp:// only) is a directory laid out as Docker's
    DOCKER_CERT_PATH (ca.pem, cert.pem, key.pem): TLS with the server verified.
    Two builders with the same host and certificates are one engine.
    """

    host: str
    cert_path: str | None = None
    key: str = field(default="", compare=False)  # where it is configured, e.g. builders.linux/arm64; "" for the default

    @property
    def scheme(self) -> str:
        return self.host.split("://", 1)[0]

    def __str__(self) -> str:
        return f"{self.host} ({self.key or 'the default engine'})"


@dataclass(frozen=True)
class Project:
    file: Path
    root: Path
    name: str
    version: str
    registry: str
    python: str
    platforms: tuple[str, ...]
    base: Base
    cuda_libs: CudaLibs
    backends: dict[str, Backend]
    layers: dict[str, Path]
    services: dict[str, Service] = field(default_factory=dict)
    compression: str = "gzip"  # gzip | zstd (see orchestrator/layers.py)
    system_packages: tuple[str, ...] = ()  # Debian packages every service gets (name or name=version)
    # Python packages that may come from a source distribution: False (none), True (any), or names.
    allow_sdist: bool | tuple[str, ...] = False
    # Platform -> the engine that builds it; platforms not listed build on the default engine.
    builders: dict[str, Builder] = field(default_factory=dict)
    layer_split: LayerSplit = LayerSplit()

    def repository(self, image: str) -> str:
        return f"{self.registry}/{self.name}/{image}"

    def cuda_lines(self) -> list[str]:
        """The CUDA lines the backends use, newest first (the fallback order)."""
        return sorted({b.cuda for b in self.backends.values() if b.is_cuda}, key=Version, reverse=True)


# --- YAML: duplicate and non-string keys are errors ------------------------

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


def _parse_yaml(file: str, text: str):
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(file, node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


# --- loading ---------------------------------------------------------------

def _schema() -> dict:
    return json.loads(resources.files("orchestrator").joinpath("data/project.schema.json").read_text())


def _keypath(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _describe(value) -> str:
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
        return f"write a {' or '.join(want) if isinstance(want, list) else want} at {_keypath(err.absolute_path)}"
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


def _schema_error(file: str, err: jsonschema.ValidationError) -> SpecError:
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
        return SpecError(file, key, f"expected {want}, found {_describe(err.instance)}")
    if v in ("enum", "const"):
        want = err.validator_value if v == "enum" else [err.validator_value]
        return SpecError(file, key, f"expected one of {want}, found {_describe(err.instance)}")
    if v == "pattern":
        return SpecError(file, key, f"expected a value matching {err.validator_value}, found {_describe(err.instance)}")
    if v in ("minItems", "minProperties"):
        empty = "list" if isinstance(err.instance, list) else "mapping"
        return SpecError(file, key, f"expected at least one entry, found an empty {empty}")
    if v in ("minimum", "maximum"):
        return SpecError(file, key, f"expected {v} {err.validator_value}, found {err.instance}")
    one_of = ONE_OF.get(key) or ONE_OF.get(key.split(".", 1)[0] + ".*")
    if v == "oneOf" and one_of:
        want, fix = one_of
        return SpecError(file, key, f"expected {want}, found {_describe(err.instance)}", fix)
    return SpecError(file, key, err.message)


def _expect_file(file: str, key: str, root: Path, rel: str, what: str) -> Path:
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
                        "point it at a requirements file such as requirements/app.in")
    return path


# --- references and requirement files ----------------------------------------

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



def load(path: str | os.PathLike) -> Project:
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise SpecError(file, "", "project file not found", "pass --project PATH or run from the project root")
    try:
        data = _parse_yaml(file, path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(file, "", f"cannot read the project file ({e})", "it must be a readable UTF-8 YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise SpecError(file, "", f"not valid YAML at {where}: {getattr(e, 'problem', e)}",
                        "fix the YAML there: check the indentation, and quote values that contain ': ' or '#'") from None
    if not isinstance(data, dict):
        raise SpecError(file, "", f"expected a mapping at the top level, found {_describe(data)}",
                        "start with keys such as `schema: 1`, `project: NAME`, `backends:` and `services:`")

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise _schema_error(file, errors[0])
    return _build(path, data)


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


def _allow_sdist(file: str, value) -> bool | tuple[str, ...]:
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


def _builders(file: str, data: dict, platforms: tuple[str, ...], root: Path) -> dict[str, Builder]:
    """`builders:` checked: each key one of the project's platforms, each value an endpoint we can build on."""
    out: dict[str, Builder] = {}
    for platform, value in data.items():
        key = f"builders.{platform}"
        if platform not in platforms:
            raise SpecError(file, key, f"{platform!r} is not one of the project's platforms {list(platforms)}",
                            f"add {platform} to platforms, or remove {key}")
        host, cert_path = (value, None) if isinstance(value, str) else (value["host"], value.get("cert_path"))
        where = key if isinstance(value, str) else f"{key}.host"
        if why := endpoint_problem(host):
            raise SpecError(file, where, f"{host!r} is not a Docker endpoint: {why}",
                            f"write e.g. {BUILDER_EXAMPLES} (as DOCKER_HOST takes it)")
        if cert_path is not None and not host.startswith("tcp://"):
            raise SpecError(file, f"{key}.cert_path", f"TLS certificates are for tcp:// endpoints, not {host!r}",
                            f"remove {key}.cert_path (ssh:// and unix:// need no certificates)")
        if cert_path is not None:  # `~` and paths relative to the project file, as written elsewhere in it
            cert_path = str(root / Path(cert_path).expanduser())
        out[platform] = Builder(host, cert_path, key)
    return out


def _check_python(file: str, python: str, base: Base, suite_given: bool, compat) -> None:
    """The locks are resolved for `python`; the base's interpreter must be that version."""
    debian = {str(k): str(v) for k, v in (compat.raw.get("debian_python") or {}).items()}
    image = base.image.split("@")[0]
    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    m = PYTHON_TAG_RE.match(tag)
    if repo.rsplit("/", 1)[-1] == "python" and m:
        tagged = f"{m.group(1)}.{m.group(2)}"
        if tagged != python:
            raise SpecError(file, "python", f"python {python} differs from base.image {base.image!r}, whose tag is "
                            f"python {tagged}: locks for {python} would not install into its interpreter",
                            f"set python: \"{tagged}\"" + "".join(
                                f", or base.image: python:{python}-slim-{suite} with base.bootstrap.suite: {suite}"
                                for suite in [s for s in sorted(debian) if debian[s] == python][:1]))
    suite_python = debian.get(base.suite)
    if suite_python is None:
        raise SpecError(file, "base.bootstrap.suite", f"unknown Debian suite {base.suite!r}; the compatibility data "
                        f"knows {sorted(debian)}",
                        "use one of them, or add the suite's python3 version under debian_python in "
                        "orchestrator/data/compat.yaml")
    if suite_python != python:
        same = sorted(s for s, v in debian.items() if v == python)
        raise SpecError(file, "python", f"python {python} differs from base.bootstrap.suite {base.suite}"
                        f"{'' if suite_given else ' (the default)'}, whose python3 is {suite_python}: a base "
                        f"bootstrapped from {base.suite} could not run locks resolved for {python}",
                        f"set python: \"{suite_python}\""
                        + (f", or base.bootstrap.suite: {same[0]}" if same else
                           f" (no Debian suite in the compatibility data ships python {python})"))


def _build(path: Path, data: dict) -> Project:
    file = str(path)
    root = path.resolve().parent
    compat = compat_mod.load()

    platforms = tuple(data.get("platforms", ["linux/amd64"]))
    for i, p in enumerate(platforms):
        if not PLATFORM_RE.match(p):
            raise SpecError(file, f"platforms[{i}]", f"expected linux/amd64 or linux/arm64, found {p!r}",
                            "use linux/amd64 and/or linux/arm64")
    for i, p in enumerate(platforms):
        if p in platforms[:i]:
            raise SpecError(file, f"platforms[{i}]", f"{p!r} is listed twice (first at platforms[{platforms.index(p)}])",
                            "list each platform once")

    python = data.get("python", "3.11")

    # cuda_libs: optional; one image per CUDA line, tagged <line>-v<revision>
    cl = data.get("cuda_libs") or {}
    if "cuda" in cl and compat.cuda(cl["cuda"]) is None:
        raise SpecError(file, "cuda_libs.cuda", f"unknown CUDA version {cl['cuda']!r}; "
                        f"the compatibility data knows {compat.cuda_versions()}",
                        "use one of them, or add the release to orchestrator/data/compat.yaml")
    cuda_libs = CudaLibs(cl.get("revision", 1), tuple(cl["packages"]) if "packages" in cl else None, cl.get("cuda"))

    # backends
    backends: dict[str, Backend] = {}
    for name, b in data["backends"].items():
        key = f"backends.{name}"
        # Names are free-form (cuda, cuda13, cpu, ...): a backend with `cuda:` is a CUDA line.
        if not NAME_RE.match(name) or name in ("base", "cuda-libs"):
            raise SpecError(file, key, f"backend name {name!r} must be lower-case letters, digits and . _ - "
                            "(it becomes part of image tags), and not 'base' or 'cuda-libs'",
                            "rename the backend, e.g. cuda, cuda13 or cpu")
        raw_torch = b.get("torch")
        if isinstance(raw_torch, dict):
            # Per-platform torch: e.g. the x86_64 CPU build is 2.13.0+cpu from a
            # wheelhouse while PyPI's aarch64 CPU build is 2.9.1.
            for i, (p, _) in enumerate(raw_torch.items()):
                if p not in platforms:
                    raise SpecError(file, f"{key}.torch.{p}", f"{p!r} is not one of the project's platforms {list(platforms)}",
                                    f"add {p} to platforms, or remove {key}.torch.{p}")
            torch_map = {p: raw_torch.get(p) for p in platforms}
        else:
            torch_map = {p: raw_torch for p in platforms}
        for p, torch in torch_map.items():
            tkey = f"{key}.torch.{p}" if isinstance(raw_torch, dict) else f"{key}.torch"
            if torch is None:
                continue
            try:
                Version(torch)
            except InvalidVersion:
                raise SpecError(file, tkey, f"expected a torch version such as '2.5.1', found {torch!r}",
                                f"write a version in quotes, e.g. torch: \"{compat.torch_versions()[-1]}\", or null for no torch") from None
            if Version(torch).public not in compat.torch_versions():
                raise SpecError(file, tkey, f"torch {torch} is not in the compatibility data; "
                                f"known: {compat.torch_versions()}",
                                "pick a known torch, or add it to orchestrator/data/compat.yaml")
        # The single value used for messages and cross-checks below.
        torch = next((t for t in torch_map.values() if t is not None), None) if isinstance(raw_torch, dict) else raw_torch
        cuda = b.get("cuda")
        if name == "cuda" and cuda is None:
            raise SpecError(file, f"{key}.cuda", "is required for the cuda backend", "add `cuda: \"12.4\"`")
        if cuda is not None:
            if compat.cuda(cuda) is None:
                raise SpecError(file, f"{key}.cuda", f"unknown CUDA version {cuda!r}; known: {compat.cuda_versions()}",
                                "use one of them, or add the release to orchestrator/data/compat.yaml")
            if torch is not None and compat.cuda_pins(torch, cuda) is None:
                raise SpecError(file, f"{key}.torch",
                                f"torch {torch} is not built for CUDA {cuda}; with CUDA {cuda} use torch "
                                f"{[t for t in compat.torch_versions() if compat.cuda_pins(t, cuda)] or 'none known'}",
                                "pick a torch/CUDA pair from orchestrator/data/compat.yaml")
            if cuda_libs.cuda is not None and cuda_libs.cuda != cuda:
                raise SpecError(file, f"{key}.cuda", f"CUDA {cuda} differs from cuda_libs.cuda {cuda_libs.cuda}",
                                "remove cuda_libs.cuda: each backend's CUDA line gets its own CUDA-libs image")
        kind = "cuda" if cuda is not None else "cpu"
        buildable = [p for p in compat.platforms() if p in compat.platforms_for(kind, torch_map.get(p, torch), cuda)
                     and (not isinstance(raw_torch, dict) or p in raw_torch)]
        if "platforms" in b:
            bplats = tuple(b["platforms"])
            for i, p in enumerate(bplats):
                if p not in platforms:
                    raise SpecError(file, f"{key}.platforms[{i}]",
                                    f"{p!r} is not one of the project's platforms {list(platforms)}",
                                    f"add {p} to platforms, or drop it from {key}.platforms")
                if p in bplats[:i]:
                    raise SpecError(file, f"{key}.platforms[{i}]", f"{p!r} is listed twice", "list each platform once")
                if p not in buildable:
                    raise SpecError(file, f"{key}.platforms[{i}]",
                                    f"{name} with torch {torch} cannot be built for {p}: the compatibility data "
                                    f"lists wheels for {buildable} only",
                                    f"drop {p} from backends.{name}.platforms (clients on {p} fall back to another backend)")
        else:
            # Not listed: the project's platforms this backend can be built for.
            bplats = tuple(p for p in platforms if p in buildable)
            if not bplats:
                raise SpecError(file, key, f"{name} with torch {torch} cannot be built for any of the project's "
                                f"platforms {list(platforms)}: the compatibility data lists wheels for {buildable} only",
                                f"add one of {buildable} to platforms, or remove backends.{name}")
        sources = Sources(b.get("index_url"), tuple(b.get("extra_index_urls", ())), tuple(b.get("find_links", ())))
        backends[name] = Backend(name, tuple((p, torch_map.get(p)) for p in bplats), cuda, sources, bplats)

    # cuda_libs.packages: the wheels of each torch-less CUDA line; a list serves the one such line,
    # a mapping {"12.4": [...], "13.0": [...]} several (the wheel names differ per line).
    bare_lines = sorted({b.cuda for b in backends.values() if b.is_cuda and any(t is None for _, t in b.torch_by_platform)},
                        key=Version)
    raw_packages = cl.get("packages")
    by_line: dict[str, list] = {}
    if isinstance(raw_packages, dict):
        by_line = {str(k): v for k, v in raw_packages.items()}
        where = {line: f"cuda_libs.packages.{line}" for line in by_line}
    elif raw_packages is not None:
        if len(bare_lines) > 1:
            raise SpecError(file, "cuda_libs.packages", f"one package list cannot serve CUDA lines {bare_lines}",
                            "write a mapping, e.g. packages: {\"12.4\": [nvidia-cuda-runtime-cu12], "
                            "\"13.0\": [nvidia-cuda-runtime]}")
        by_line = {bare_lines[0] if bare_lines else "": raw_packages}
        where = {line: "cuda_libs.packages" for line in by_line}
    for line, pkgs in by_line.items():
        if line not in bare_lines:
            raise SpecError(file, where[line], "is only for CUDA backends without torch (with torch, the CUDA-libs "
                            "set is derived from torch's pins)" + (f"; no torch-less backend uses CUDA {line}" if line else ""),
                            "remove it, or set torch: null on a backend of that CUDA line")
        allowed: dict[str, str] = {}
        for t in compat.torch_versions():
            allowed.update(compat.cuda_pins(t, line) or {})
        for i, req in enumerate(pkgs):
            try:
                parsed = Requirement(req)
            except InvalidRequirement:
                raise SpecError(file, f"{where[line]}[{i}]", f"expected a requirement such as "
                                f"'nvidia-cuda-runtime-cu12' or 'nvidia-cuda-runtime-cu12==12.4.127', found {req!r}",
                                "write a wheel name, optionally ==version")  from None
            pname = canonicalize_name(parsed.name)
            if parsed.extras or parsed.marker or parsed.url:
                raise SpecError(file, f"{where[line]}[{i}]", f"expected a plain name or name==version, found {req!r}",
                                "drop extras, markers and URLs, e.g. nvidia-cuda-runtime-cu12==12.4.127")
            if pname not in allowed:
                raise SpecError(file, f"{where[line]}[{i}]",
                                f"{pname!r} is not a CUDA {line} library wheel in the compatibility data",
                                f"known: {sorted(allowed)}")
    for line in bare_lines:
        if line not in by_line:
            names = [b.name for b in backends.values() if b.cuda == line]
            raise SpecError(file, "cuda_libs.packages", f"is required when backends.{names[0]} (CUDA {line}) has no torch",
                            "list the nvidia-* wheels your services need")
    cuda_libs = CudaLibs(cuda_libs.revision, tuple((k, tuple(v)) for k, v in by_line.items()) or None, cuda_libs.cuda)

    # layers
    layers: dict[str, Path] = {}
    for name, layer in (data.get("layers") or {}).items():
        if name not in CONFIGURABLE_LAYERS:
            raise SpecError(file, f"layers.{name}", f"unknown layer {name!r}; configurable layers are "
                            f"{list(CONFIGURABLE_LAYERS)} (base, cuda-libs, torch, service and app are derived)",
                            "put shared requirements under layers.shared, service ones under services.<name>")
        layers[name] = _expect_file(file, f"layers.{name}.requirements", root, layer["requirements"], "requirements file")
        check_requirements_file(file, f"layers.{name}.requirements", layers[name])

    project_system = system_packages(file, "system_packages", data.get("system_packages", []))

    # services
    services: dict[str, Service] = {}
    default_version = data.get("version", "0.1.0")
    for name, s in data["services"].items():
        key = f"services.{name}"
        if not NAME_RE.match(name) or name in ("cuda-libs", "base"):
            raise SpecError(file, key, f"service name {name!r} must be lower-case letters, digits and . _ - "
                            "(it becomes a registry repository), and not 'base' or 'cuda-libs'",
                            "rename the service, e.g. tts or speech-to-text")
        spath = _expect_file(file, f"{key}.path", root, s["path"], "service directory")
        if not spath.is_dir():
            raise SpecError(file, f"{key}.path", f"expected a directory, found a file: {s['path']!r}",
                            "point path at the service's directory (its code is copied into the image)")
        req = None
        if "requirements" in s:
            req = _expect_file(file, f"{key}.requirements", root, s["requirements"], "requirements file")
            check_requirements_file(file, f"{key}.requirements", req)
        sb = tuple(s.get("backends", list(backends)))
        for i, b in enumerate(sb):
            if b not in backends:
                raise SpecError(file, f"{key}.backends[{i}]", f"unknown backend {b!r}; this project defines {list(backends)}",
                                f"use one of {list(backends)}, or define backends.{b}")
        services[name] = Service(name, spath, req, tuple(s["command"]), s.get("port", 8000),
                                 s.get("version", default_version), sb, s.get("policy", "fallback"),
                                 system_packages(file, f"{key}.system_packages", s.get("system_packages", []),
                                                 tuple(p.partition("=")[0] for p in project_system)))

    bdata = data.get("base") or {}
    boot = bdata.get("bootstrap") or {}
    base = Base(bdata.get("image", DEFAULT_BASE_IMAGE), boot.get("suite", "bookworm"),
                tuple(boot.get("include", DEFAULT_BOOTSTRAP_INCLUDE)), boot.get("when", "offline"))

    if "image" in bdata and (why := image_ref_problem(base.image)):
        raise SpecError(file, "base.image", f"{base.image!r} is not an image reference: {why}",
                        "write [host[:port]/]path[:tag][@sha256:<64 hex>], e.g. "
                        "docker.io/library/python:3.11-slim-bookworm")
    _check_python(file, python, base, "bootstrap" in bdata and "suite" in boot, compat)

    from_env = bool(os.environ.get("ORCH_REGISTRY"))
    registry = os.environ.get("ORCH_REGISTRY") or data.get("registry", DEFAULT_REGISTRY)
    if why := registry_problem(registry):
        raise SpecError(file, "registry", f"{registry!r}{' (from $ORCH_REGISTRY)' if from_env else ''} is not a "
                        f"registry: {why}", ("fix $ORCH_REGISTRY: " if from_env else "")
                        + "write host[:port][/path], e.g. 127.0.0.1:5000 or ghcr.io/acme")
    return Project(path.resolve(), root, data["project"], default_version, registry, python,
                   platforms, base, cuda_libs, backends, layers, services, data.get("compression", "gzip"),
                   project_system, _allow_sdist(file, data.get("allow_sdist", False)),
                   _builders(file, data.get("builders") or {}, platforms, root),
                   LayerSplit(**(data.get("layer_split") or {})))
