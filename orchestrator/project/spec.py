"""Stage 1: the project file, loaded and validated into typed dataclasses.

Every problem is reported as a `SpecError` naming the file, the key path,
what was expected and what was found. Shape is checked with the JSON Schema
in data/project.schema.json; meaning (known backends, torch/CUDA pairs,
platforms, files on disk) is checked here against the compatibility data.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from orchestrator.common.errors import SpecError
from orchestrator.oci import signing
from orchestrator.oci.registry.auth import EnvLogin, env_login
from orchestrator.project import compat as compat_mod
from orchestrator.project.validate import (BUILDER_EXAMPLES, allow_sdist, check_requirements_file, describe, endpoint_problem,
                                          expect_file, image_ref_problem, parse_yaml, project_schema, registry_problem,
                                          schema_error, system_packages)

DEFAULT_REGISTRY = "127.0.0.1:5000"
DEFAULT_BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
DEFAULT_BOOTSTRAP_INCLUDE = ("python3", "python3-venv", "python3-pip", "ca-certificates", "libgomp1")
# Layers a project may configure; base, cuda-libs, torch, service and app
# are derived from other keys.
CONFIGURABLE_LAYERS = ("shared",)
NAME_RE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*$")
PLATFORM_RE = re.compile(r"^linux/(amd64|arm64)$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

PYTHON_TAG_RE = re.compile(r"^(\d+)\.(\d+)(?:$|[.-])")
VARIANT_RE = re.compile(r"^([^/\s]+)/([^/\s]+) (linux/[a-z0-9]+)$")  # smoke.allow_partial: 'tts/cuda13 linux/arm64'



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
class SmokeSettings:
    """`smoke:`: where each platform's smoke containers run, and which variants may be promoted partial."""

    engines: dict[str, Builder] = field(default_factory=dict)  # platform -> engine (smoke.engines)
    allow_partial: tuple[str, ...] = ()  # 'service/backend platform', as written

    def allows_partial(self, label: str) -> bool:
        return label in self.allow_partial


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
    smoke: SmokeSettings = SmokeSettings()
    # The public keys whose signatures hosts accept (`trust.keys`), read and checked at load.
    trust: tuple[signing.PublicKey, ...] = ()
    # REGISTRY_USERNAME/REGISTRY_PASSWORD, read when the file is loaded, for this registry (or REGISTRY_HOST's)
    # only: every registry client gets it and sends it to that host alone.
    login: EnvLogin | None = field(default=None, repr=False, compare=False)

    def repository(self, image: str) -> str:
        return f"{self.registry}/{self.name}/{image}"

    def cuda_lines(self) -> list[str]:
        """The CUDA lines the backends use, newest first (the fallback order)."""
        return sorted({b.cuda for b in self.backends.values() if b.is_cuda}, key=Version, reverse=True)


# --- YAML: duplicate and non-string keys are errors ------------------------


# --- loading ---------------------------------------------------------------


# --- references and requirement files ----------------------------------------


def load(path: str | os.PathLike) -> Project:
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise SpecError(file, "", "project file not found", "pass --project PATH or run from the project root")
    try:
        data = parse_yaml(file, path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(file, "", f"cannot read the project file ({e})", "it must be a readable UTF-8 YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise SpecError(file, "", f"not valid YAML at {where}: {getattr(e, 'problem', e)}",
                        "fix the YAML there: check the indentation, and quote values that contain ': ' or '#'") from None
    if not isinstance(data, dict):
        raise SpecError(file, "", f"expected a mapping at the top level, found {describe(data)}",
                        "start with keys such as `schema: 1`, `project: NAME`, `backends:` and `services:`")

    validator = jsonschema.Draft202012Validator(project_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise schema_error(file, errors[0])
    return _build(path, data)


def _builders(file: str, data: dict, platforms: tuple[str, ...], root: Path,
              section: str = "builders") -> dict[str, Builder]:
    """`builders:` (or `smoke.engines:`) checked: each key one of the project's platforms, each value an endpoint."""
    out: dict[str, Builder] = {}
    for platform, value in data.items():
        key = f"{section}.{platform}"
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


def _trust(file: str, data: dict, root: Path) -> tuple[signing.PublicKey, ...]:
    """`trust.keys`: each a committed ECDSA P-256 public key file inside the project, listed once."""
    keys: list[signing.PublicKey] = []
    for i, rel in enumerate(data.get("keys") or ()):
        key = f"trust.keys[{i}]"
        path = expect_file(file, key, root, rel, "public key file")
        try:
            pem = path.read_bytes()
        except OSError as e:
            raise SpecError(file, key, f"cannot read {rel!r} ({e.strerror})", "make it readable") from None
        if why := signing.public_key_problem(pem):
            raise SpecError(file, key, f"{rel!r} is not a public key this tool verifies with: {why}",
                            "point it at the .pub file `invoke keys` wrote (or a cosign.pub of an ECDSA P-256 key)")
        public = signing.load_public_key(pem, rel)
        if any(k.keyid == public.keyid for k in keys):
            first = next(j for j, k in enumerate(keys) if k.keyid == public.keyid)
            raise SpecError(file, key, f"{rel!r} is the same key as trust.keys[{first}]", "list each key once")
        keys.append(public)
    return tuple(keys)


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
    """The typed project from a file that passed the schema: each section checked for meaning."""
    file = str(path)
    root = path.resolve().parent
    compat = compat_mod.load()
    platforms = _platforms(file, data)
    python = data.get("python", "3.11")
    cuda_libs = _cuda_libs_settings(file, data.get("cuda_libs") or {}, compat)
    backends = {name: _backend(file, name, b, platforms, cuda_libs, compat) for name, b in data["backends"].items()}
    cuda_libs = _cuda_libs_packages(file, data.get("cuda_libs") or {}, cuda_libs, backends, compat)
    layers = _layers(file, data, root)
    project_system = system_packages(file, "system_packages", data.get("system_packages", []))
    default_version = data.get("version", "0.1.0")
    services = {name: _service(file, name, s, root, backends, default_version, project_system)
                for name, s in data["services"].items()}
    base = _base(file, data.get("base") or {}, python, compat)
    registry = _registry(file, data)
    return Project(path.resolve(), root, data["project"], default_version, registry, python,
                   platforms, base, cuda_libs, backends, layers, services, data.get("compression", "gzip"),
                   project_system, allow_sdist(file, data.get("allow_sdist", False)),
                   _builders(file, data.get("builders") or {}, platforms, root),
                   LayerSplit(**(data.get("layer_split") or {})),
                   _smoke(file, data.get("smoke") or {}, platforms, root, backends, services),
                   _trust(file, data.get("trust") or {}, root), env_login(os.environ, registry))


def _smoke(file: str, data: dict, platforms: tuple[str, ...], root: Path, backends: dict[str, Backend],
           services: dict[str, Service]) -> SmokeSettings:
    """`smoke:`: engines as `builders:` takes them; allow_partial naming variants the project has."""
    engines = _builders(file, data.get("engines") or {}, platforms, root, section="smoke.engines")
    allowed = tuple(data.get("allow_partial") or ())
    for i, label in enumerate(allowed):
        key = f"smoke.allow_partial[{i}]"
        m = VARIANT_RE.match(label)
        if not m:
            raise SpecError(file, key, f"{label!r} does not name a variant",
                            "write 'service/backend platform', e.g. 'tts/cuda13 linux/arm64'")
        service, backend, platform = m.groups()
        if service not in services:
            raise SpecError(file, key, f"no service {service!r}; the project has {sorted(services)}",
                            f"name one of {sorted(services)}, or remove the entry")
        if backend not in services[service].backends:
            raise SpecError(file, key, f"service {service} has no backend {backend!r}; it has "
                            f"{list(services[service].backends)}", "name one of them, or remove the entry")
        if platform not in backends[backend].platforms:
            raise SpecError(file, key, f"backend {backend} is not built for {platform} (its platforms: "
                            f"{list(backends[backend].platforms)})", "name one of them, or remove the entry")
    return SmokeSettings(engines, allowed)


def _platforms(file: str, data: dict) -> tuple[str, ...]:
    """`platforms:`, each linux/amd64 or linux/arm64, once."""
    platforms = tuple(data.get("platforms", ["linux/amd64"]))
    for i, p in enumerate(platforms):
        if not PLATFORM_RE.match(p):
            raise SpecError(file, f"platforms[{i}]", f"expected linux/amd64 or linux/arm64, found {p!r}",
                            "use linux/amd64 and/or linux/arm64")
    for i, p in enumerate(platforms):
        if p in platforms[:i]:
            raise SpecError(file, f"platforms[{i}]", f"{p!r} is listed twice (first at platforms[{platforms.index(p)}])",
                            "list each platform once")
    return platforms


def _cuda_libs_settings(file: str, cl: dict, compat) -> CudaLibs:
    """`cuda_libs:` revision and the legacy single-line key (its packages need the backends: _cuda_libs_packages)."""
    # cuda_libs: optional; one image per CUDA line, tagged <line>-v<revision>
    if "cuda" in cl and compat.cuda(cl["cuda"]) is None:
        raise SpecError(file, "cuda_libs.cuda", f"unknown CUDA version {cl['cuda']!r}; "
                        f"the compatibility data knows {compat.cuda_versions()}",
                        "use one of them, or add the release to orchestrator/data/compat.yaml")
    return CudaLibs(cl.get("revision", 1), tuple(cl["packages"]) if "packages" in cl else None, cl.get("cuda"))


def _backend(file: str, name: str, b: dict, platforms: tuple[str, ...], cuda_libs: CudaLibs, compat) -> Backend:
    """One `backends.<name>`: its torch per platform, CUDA line, sources, and the platforms it can be built for."""
    key = f"backends.{name}"
    # Names are free-form (cuda, cuda13, cpu, ...): a backend with `cuda:` is a CUDA line.
    if not NAME_RE.match(name) or name in ("base", "cuda-libs"):
        raise SpecError(file, key, f"backend name {name!r} must be lower-case letters, digits and . _ - "
                        "(it becomes part of image tags), and not 'base' or 'cuda-libs'",
                        "rename the backend, e.g. cuda, cuda13 or cpu")
    raw_torch = b.get("torch")
    torch_map = _torch_by_platform(file, key, raw_torch, platforms, compat)
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
    bplats = _backend_platforms(file, key, name, b, torch, buildable, platforms)
    sources = Sources(b.get("index_url"), tuple(b.get("extra_index_urls", ())), tuple(b.get("find_links", ())))
    return Backend(name, tuple((p, torch_map.get(p)) for p in bplats), cuda, sources, bplats)


def _torch_by_platform(file: str, key: str, raw_torch, platforms: tuple[str, ...], compat) -> dict[str, str | None]:
    """A backend's `torch:` (one version, a mapping per platform, or null), each a version the compat data knows."""
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
    return torch_map


def _backend_platforms(file: str, key: str, name: str, b: dict, torch, buildable: list[str],
                       platforms: tuple[str, ...]) -> tuple[str, ...]:
    """`backends.<name>.platforms` as listed (each buildable), else the project's platforms it can be built for."""
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
    return bplats


def _cuda_libs_packages(file: str, cl: dict, cuda_libs: CudaLibs, backends: dict[str, Backend], compat) -> CudaLibs:
    """`cuda_libs.packages`: the wheels of each torch-less CUDA line, checked against the compatibility data."""
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
    return CudaLibs(cuda_libs.revision, tuple((k, tuple(v)) for k, v in by_line.items()) or None, cuda_libs.cuda)


def _layers(file: str, data: dict, root: Path) -> dict[str, Path]:
    """`layers:`: only the configurable ones, each a requirements file a lock can be made from."""
    layers: dict[str, Path] = {}
    for name, layer in (data.get("layers") or {}).items():
        if name not in CONFIGURABLE_LAYERS:
            raise SpecError(file, f"layers.{name}", f"unknown layer {name!r}; configurable layers are "
                            f"{list(CONFIGURABLE_LAYERS)} (base, cuda-libs, torch, service and app are derived)",
                            "put shared requirements under layers.shared, service ones under services.<name>")
        layers[name] = expect_file(file, f"layers.{name}.requirements", root, layer["requirements"], "requirements file")
        check_requirements_file(file, f"layers.{name}.requirements", layers[name])
    return layers


def _service(file: str, name: str, s: dict, root: Path, backends: dict[str, Backend], default_version: str,
             project_system: tuple[str, ...]) -> Service:
    """One `services.<name>`: its directory, requirements, backends and system packages."""
    key = f"services.{name}"
    if not NAME_RE.match(name) or name in ("cuda-libs", "base"):
        raise SpecError(file, key, f"service name {name!r} must be lower-case letters, digits and . _ - "
                        "(it becomes a registry repository), and not 'base' or 'cuda-libs'",
                        "rename the service, e.g. tts or speech-to-text")
    spath = expect_file(file, f"{key}.path", root, s["path"], "service directory")
    if not spath.is_dir():
        raise SpecError(file, f"{key}.path", f"expected a directory, found a file: {s['path']!r}",
                        "point path at the service's directory (its code is copied into the image)")
    req = None
    if "requirements" in s:
        req = expect_file(file, f"{key}.requirements", root, s["requirements"], "requirements file")
        check_requirements_file(file, f"{key}.requirements", req)
    sb = tuple(s.get("backends", list(backends)))
    for i, b in enumerate(sb):
        if b not in backends:
            raise SpecError(file, f"{key}.backends[{i}]", f"unknown backend {b!r}; this project defines {list(backends)}",
                            f"use one of {list(backends)}, or define backends.{b}")
    return Service(name, spath, req, tuple(s["command"]), s.get("port", 8000),
                             s.get("version", default_version), sb, s.get("policy", "fallback"),
                             system_packages(file, f"{key}.system_packages", s.get("system_packages", []),
                                             tuple(p.partition("=")[0] for p in project_system)))


def _base(file: str, bdata: dict, python: str, compat) -> Base:
    """`base:`: the image and how to bootstrap it, and that its python is the project's."""
    boot = bdata.get("bootstrap") or {}
    base = Base(bdata.get("image", DEFAULT_BASE_IMAGE), boot.get("suite", "bookworm"),
                tuple(boot.get("include", DEFAULT_BOOTSTRAP_INCLUDE)), boot.get("when", "offline"))

    if "image" in bdata and (why := image_ref_problem(base.image)):
        raise SpecError(file, "base.image", f"{base.image!r} is not an image reference: {why}",
                        "write [host[:port]/]path[:tag][@sha256:<64 hex>], e.g. "
                        "docker.io/library/python:3.11-slim-bookworm")
    _check_python(file, python, base, "bootstrap" in bdata and "suite" in boot, compat)
    return base


def _registry(file: str, data: dict) -> str:
    """The registry: $ORCH_REGISTRY, else `registry:`, else the embedded default."""
    from_env = bool(os.environ.get("ORCH_REGISTRY"))
    registry = os.environ.get("ORCH_REGISTRY") or data.get("registry", DEFAULT_REGISTRY)
    if why := registry_problem(registry):
        raise SpecError(file, "registry", f"{registry!r}{' (from $ORCH_REGISTRY)' if from_env else ''} is not a "
                        f"registry: {why}", ("fix $ORCH_REGISTRY: " if from_env else "")
                        + "write host[:port][/path], e.g. 127.0.0.1:5000 or ghcr.io/acme")
    return registry

