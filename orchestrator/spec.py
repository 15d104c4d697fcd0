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

from . import compat as compat_mod
from .errors import SpecError

DEFAULT_REGISTRY = "127.0.0.1:5000"
DEFAULT_BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
DEFAULT_BOOTSTRAP_INCLUDE = ("python3", "python3-venv", "python3-pip", "ca-certificates", "libgomp1")
KNOWN_BACKENDS = ("cuda", "cpu")
# Layers a project may configure; base, cuda-libs, torch, service and app
# are derived from other keys.
CONFIGURABLE_LAYERS = ("shared",)
NAME_RE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*$")
PLATFORM_RE = re.compile(r"^linux/(amd64|arm64)$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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


@dataclass(frozen=True)
class CudaLibs:
    cuda: str
    tag: str  # cu124
    revision: int
    packages: tuple[str, ...] | None  # None: every nvidia-* wheel torch pins


@dataclass(frozen=True)
class Base:
    image: str
    suite: str
    include: tuple[str, ...]
    bootstrap_when: str = "offline"  # always | offline (only when image's registry cannot be reached)


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
    cuda_libs: CudaLibs | None
    backends: dict[str, Backend]
    layers: dict[str, Path]
    services: dict[str, Service] = field(default_factory=dict)
    compression: str = "gzip"  # gzip | zstd (see orchestrator/layers.py)

    def repository(self, image: str) -> str:
        return f"{self.registry}/{self.name}/{image}"


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


def _schema_error(file: str, err: jsonschema.ValidationError) -> SpecError:
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
    return SpecError(file, key, err.message)


def _expect_file(file: str, key: str, root: Path, rel: str, what: str) -> Path:
    path = (root / rel).resolve()
    if not path.exists():
        raise SpecError(file, key, f"{what} {rel!r} does not exist (looked at {path})",
                        "create it or fix the path, which is relative to the project file")
    if what.endswith("file") and not path.is_file():
        raise SpecError(file, key, f"expected a file, found a directory: {rel!r}")
    return path


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
        raise SpecError(file, "", f"not valid YAML at {where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise SpecError(file, "", f"expected a mapping at the top level, found {_describe(data)}")

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise _schema_error(file, errors[0])
    return _build(path, data)


def _build(path: Path, data: dict) -> Project:
    file = str(path)
    root = path.resolve().parent
    compat = compat_mod.load()

    platforms = tuple(data.get("platforms", ["linux/amd64"]))
    for i, p in enumerate(platforms):
        if not PLATFORM_RE.match(p):
            raise SpecError(file, f"platforms[{i}]", f"expected linux/amd64 or linux/arm64, found {p!r}")
    for i, p in enumerate(platforms):
        if p in platforms[:i]:
            raise SpecError(file, f"platforms[{i}]", f"{p!r} is listed twice (first at platforms[{platforms.index(p)}])",
                            "list each platform once")

    python = data.get("python", "3.11")

    # cuda_libs
    cuda_libs = None
    if "cuda_libs" in data:
        cl = data["cuda_libs"]
        rel = compat.cuda(cl["cuda"])
        if rel is None:
            raise SpecError(file, "cuda_libs.cuda", f"unknown CUDA version {cl['cuda']!r}; "
                            f"the compatibility data knows {compat.cuda_versions()}")
        cuda_libs = CudaLibs(cl["cuda"], rel.tag, cl.get("revision", 1),
                             tuple(cl["packages"]) if "packages" in cl else None)

    # backends
    backends: dict[str, Backend] = {}
    for name, b in data["backends"].items():
        key = f"backends.{name}"
        if name not in KNOWN_BACKENDS:
            raise SpecError(file, key, f"unknown backend {name!r}; expected one of {list(KNOWN_BACKENDS)}")
        raw_torch = b.get("torch")
        if isinstance(raw_torch, dict):
            # Per-platform torch: e.g. the x86_64 CPU build is 2.13.0+cpu from a
            # wheelhouse while PyPI's aarch64 CPU build is 2.9.1.
            for i, (p, _) in enumerate(raw_torch.items()):
                if p not in platforms:
                    raise SpecError(file, f"{key}.torch.{p}", f"{p!r} is not one of the project's platforms {list(platforms)}")
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
                raise SpecError(file, tkey, f"expected a torch version such as '2.5.1', found {torch!r}") from None
            if Version(torch).public not in compat.torch_versions():
                raise SpecError(file, tkey, f"torch {torch} is not in the compatibility data; "
                                f"known: {compat.torch_versions()}")
        # The single value used for messages and cross-checks below.
        torch = next((t for t in torch_map.values() if t is not None), None) if isinstance(raw_torch, dict) else raw_torch
        cuda = b.get("cuda")
        if name == "cuda":
            if cuda is None:
                raise SpecError(file, f"{key}.cuda", "is required for the cuda backend", "add `cuda: \"12.4\"`")
            if compat.cuda(cuda) is None:
                raise SpecError(file, f"{key}.cuda", f"unknown CUDA version {cuda!r}; known: {compat.cuda_versions()}")
            if torch is not None and compat.cuda_pins(torch, cuda) is None:
                raise SpecError(file, f"{key}.torch",
                                f"torch {torch} is not built for CUDA {cuda}; with CUDA {cuda} use torch "
                                f"{[t for t in compat.torch_versions() if compat.cuda_pins(t, cuda)] or 'none known'}",
                                "pick a torch/CUDA pair from orchestrator/data/compat.yaml")
            if cuda_libs is None:
                raise SpecError(file, "cuda_libs", "is required when a cuda backend is defined",
                                f"add `cuda_libs: {{cuda: \"{cuda}\", revision: 1}}`")
            if cuda_libs.cuda != cuda:
                raise SpecError(file, f"{key}.cuda", f"CUDA {cuda} differs from cuda_libs.cuda {cuda_libs.cuda}",
                                "one project ships one CUDA-libs image; make them agree")
            if torch is not None and cuda_libs.packages is not None:
                raise SpecError(file, "cuda_libs.packages",
                                f"must not be set when backends.{name} has torch: the CUDA-libs set is derived from "
                                f"torch {torch}'s pins for CUDA {cuda}", "remove the `packages:` key from cuda_libs")
            if any(t is None for t in torch_map.values()) and cuda_libs.packages is None:
                raise SpecError(file, "cuda_libs.packages", "is required when the cuda backend has no torch",
                                "list the nvidia-*-cu12 wheels your services need")
        elif cuda is not None:
            raise SpecError(file, f"{key}.cuda", f"the {name} backend takes no CUDA version, found {cuda!r}")
        buildable = [p for p in compat.platforms() if p in compat.platforms_for(name, torch_map.get(p, torch), cuda)
                     and (not isinstance(raw_torch, dict) or p in raw_torch)]
        if "platforms" in b:
            bplats = tuple(b["platforms"])
            for i, p in enumerate(bplats):
                if p not in platforms:
                    raise SpecError(file, f"{key}.platforms[{i}]",
                                    f"{p!r} is not one of the project's platforms {list(platforms)}")
                if p in bplats[:i]:
                    raise SpecError(file, f"{key}.platforms[{i}]", f"{p!r} is listed twice")
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

    # cuda_libs.packages must be a subset of what CUDA release pins
    if cuda_libs is not None and cuda_libs.packages is not None:
        allowed: dict[str, str] = {}
        for t in compat.torch_versions():
            allowed.update(compat.cuda_pins(t, cuda_libs.cuda) or {})
        for i, req in enumerate(cuda_libs.packages):
            try:
                parsed = Requirement(req)
            except InvalidRequirement:
                raise SpecError(file, f"cuda_libs.packages[{i}]", f"expected a requirement such as "
                                f"'nvidia-cuda-runtime-cu12' or 'nvidia-cuda-runtime-cu12==12.4.127', found {req!r}") from None
            pname = canonicalize_name(parsed.name)
            if parsed.extras or parsed.marker or parsed.url:
                raise SpecError(file, f"cuda_libs.packages[{i}]", f"expected a plain name or name==version, found {req!r}")
            if pname not in allowed:
                raise SpecError(file, f"cuda_libs.packages[{i}]",
                                f"{pname!r} is not a CUDA {cuda_libs.cuda} library wheel in the compatibility data",
                                f"known: {sorted(allowed)}")

    # layers
    layers: dict[str, Path] = {}
    for name, layer in (data.get("layers") or {}).items():
        if name not in CONFIGURABLE_LAYERS:
            raise SpecError(file, f"layers.{name}", f"unknown layer {name!r}; configurable layers are "
                            f"{list(CONFIGURABLE_LAYERS)} (base, cuda-libs, torch, service and app are derived)")
        layers[name] = _expect_file(file, f"layers.{name}.requirements", root, layer["requirements"], "requirements file")

    # services
    services: dict[str, Service] = {}
    default_version = data.get("version", "0.1.0")
    for name, s in data["services"].items():
        key = f"services.{name}"
        if not NAME_RE.match(name) or name in ("cuda-libs", "base"):
            raise SpecError(file, key, f"service name {name!r} must be lower-case letters, digits and . _ - "
                            "(it becomes a registry repository), and not 'base' or 'cuda-libs'")
        spath = _expect_file(file, f"{key}.path", root, s["path"], "service directory")
        if not spath.is_dir():
            raise SpecError(file, f"{key}.path", f"expected a directory, found a file: {s['path']!r}")
        req = None
        if "requirements" in s:
            req = _expect_file(file, f"{key}.requirements", root, s["requirements"], "requirements file")
        sb = tuple(s.get("backends", list(backends)))
        for i, b in enumerate(sb):
            if b not in backends:
                raise SpecError(file, f"{key}.backends[{i}]", f"unknown backend {b!r}; this project defines {list(backends)}")
        services[name] = Service(name, spath, req, tuple(s["command"]), s.get("port", 8000),
                                 s.get("version", default_version), sb, s.get("policy", "fallback"))

    bdata = data.get("base") or {}
    boot = bdata.get("bootstrap") or {}
    base = Base(bdata.get("image", DEFAULT_BASE_IMAGE), boot.get("suite", "bookworm"),
                tuple(boot.get("include", DEFAULT_BOOTSTRAP_INCLUDE)), boot.get("when", "offline"))

    registry = os.environ.get("ORCH_REGISTRY") or data.get("registry", DEFAULT_REGISTRY)
    return Project(path.resolve(), root, data["project"], default_version, registry, python,
                   platforms, base, cuda_libs, backends, layers, services, data.get("compression", "gzip"))
