"""Stage 3 (pure): which images to build, from which layers, under which tags.

No Docker, no network, no writes: a `BuildPlan` is computed from the
project and its locks and can be inspected, rendered and tested on its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.common.errors import UserError
from orchestrator.debian.aptlock import AptLock
from orchestrator.debian.layer import layer_key
from orchestrator.host.contract import (  # noqa: F401
    APP_DIR,
    APP_UID,
    HOME_DIR,
    LABEL_PREFIX,
    RUNTIME_DIR,
    SITE,
    WRITABLE_DIRS,
    run_options,
)
from orchestrator.oci.image import Settings
from orchestrator.oci.image import healthcheck as hc_config
from orchestrator.project import compat as compat_mod
from orchestrator.project.lockfile import Lock
from orchestrator.project.spec import Backend, LayerSplit, Project, Service


@dataclass(frozen=True)
class LayerStage:
    """One dependency lock installed into its own site dir, sent as one or more layers (see `split`)."""

    name: str  # cuda-libs | torch | shared | service-<name>
    lock: Lock
    split: LayerSplit = LayerSplit()  # big packages get their own layers (orchestrator/layer_split.py)

    @property
    def site_dir(self) -> str:
        return f"{SITE}/{self.name}"

    @property
    def context_lock(self) -> str:
        return f"locks/{self.name}.txt"


@dataclass(frozen=True)
class SystemStage:
    """Debian packages (one apt lock) as one layer, unpacked by the tool (apt_layer), not by BuildKit."""

    name: str  # system (every service) | system-<service>
    lock: AptLock
    lock_file: str  # relative to the project: locks/apt-<arch>/<layer>.txt

    @property
    def context_lock(self) -> str:
        return f"locks/{self.name}.apt.txt"

    def context_text(self) -> str:
        """What the build context holds for it: the layer's cache key and the pins (not the sources' dates,
        so a re-lock that moves no version changes no content tag)."""
        return f"# apt layer {layer_key(self.lock)}\n{self.lock.body()}"


@dataclass(frozen=True)
class ImagePlan:
    key: str  # cuda-libs | <service>
    kind: str  # cuda-libs | service
    backend: Backend
    platform: str
    repository: str
    human_tags: tuple[str, ...]
    content_prefix: str  # the content tag is <prefix>-<hash12>
    dockerfile: str  # file name under dockerfiles/
    from_image: str  # "base" or "cuda-libs"
    layers: tuple[LayerStage, ...]
    service: Service | None = None
    env: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    lib_dirs: tuple[str, ...] = ()
    system: tuple[SystemStage, ...] = ()  # Debian package layers (see stages())

    @property
    def arch(self) -> str:
        return self.platform.split("/")[1]

    def stages(self) -> tuple[LayerStage | SystemStage, ...]:
        """Every layer this image adds to its parent, bottom-up (the app last, not listed).

        The project's system packages sit right on the parent (base or CUDA
        libs): they change less often than torch and the Python layers, and
        the CUDA-libs image, shared by every service, must not depend on
        them. A service's own sit just below its Python layer, so changing
        them touches only that service's top layers.
        """
        project_level = [s for s in self.system if s.name == "system"]
        own = [s for s in self.system if s.name != "system"]
        out: list[LayerStage | SystemStage] = list(project_level)
        for stage in self.layers:
            if stage.name.startswith("service-"):
                out += own
                own = []
            out.append(stage)
        return tuple(out + own)

    def system_packages(self) -> tuple[str, ...]:
        """The Debian packages the project file asks this image for (names, without versions)."""
        return tuple(r.partition("=")[0] for s in self.system for r in s.lock.requests)

    def ref(self, tag: str) -> str:
        return f"{self.repository}:{tag}"


@dataclass(frozen=True)
class Healthcheck:
    test: tuple[str, ...]
    interval: int
    timeout: int
    start_period: int
    retries: int


def healthcheck(port: int) -> Healthcheck:
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=3)"
    return Healthcheck(("python3", "-c", probe), 15, 5, 120, 3)


@dataclass(frozen=True)
class BuildPlan:
    project: Project
    images: tuple[ImagePlan, ...] = field(default_factory=tuple)


def _alloc_env() -> tuple[tuple[str, str], ...]:
    # Newer torch reads PYTORCH_ALLOC_CONF and warns on the old name; older
    # torch reads only the old one. Set both.
    return (("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
            ("PYTORCH_ALLOC_CONF", "expandable_segments:True"))


def cuda_libs_plan(project: Project, backend: Backend, platform: str, locks: list[Lock]) -> ImagePlan:
    """The CUDA-libs image of the backend's CUDA line: cu124-v1, cu130-v1 (one per line and platform)."""
    compat = compat_mod.load()
    cl = project.cuda_libs
    line = backend.cuda
    lock = next(lk for lk in locks if lk.layer == "cuda-libs")
    stage = LayerStage("cuda-libs", lock, project.layer_split)
    lib_dirs = tuple(dict.fromkeys(f"{stage.site_dir}/{d}" for d in (compat.nvidia_lib_dir(p.name) for p in lock.pins)
                                   if d))
    rel = compat.cuda(line)
    labels = (
        ("org.opencontainers.image.title", f"{project.name} CUDA {line} libraries"),
        ("org.opencontainers.image.version", cl.tag(line)),
        (f"{LABEL_PREFIX}.cuda", line),
        (f"{LABEL_PREFIX}.cuda-libs.revision", str(cl.revision)),
        (f"{LABEL_PREFIX}.min-driver", rel.min_driver),
    )
    env = (
        ("NVIDIA_VISIBLE_DEVICES", "all"),
        ("NVIDIA_DRIVER_CAPABILITIES", "compute,utility"),
        ("CUDA_VERSION", line),
        ("CUDA_LIBS_DIR", stage.site_dir),
        ("CUDA_RUNTIME_LIB", rel.runtime_lib),
        ("LD_LIBRARY_PATH", ":".join(lib_dirs)),
    )
    return ImagePlan("cuda-libs", "cuda-libs", backend, platform, project.repository("cuda-libs"),
                     (cl.tag(line),), cl.line_tag(line), f"cuda-libs.{cl.line_tag(line)}.Dockerfile", "base",
                     (stage,), None, env, labels, lib_dirs)


def system_stages(project: Project, svc: Service, platform: str,
                  system: dict[tuple[str, str], AptLock]) -> tuple[SystemStage, ...]:
    """The service's Debian package layers on a platform: the project's, then its own."""
    arch = platform.split("/")[1]
    out = []
    for layer, stage, wanted in (("system", "system", project.system_packages),
                                 (f"service-{svc.name}", f"system-{svc.name}", svc.system_packages)):
        if not wanted:
            continue
        lock_file = f"locks/apt-{arch}/{layer}.txt"
        lk = system.get((platform, layer))
        if lk is None:
            raise UserError(f"lock {lock_file} is not loaded for {svc.name} on {platform}", "run `invoke lock`")
        if lk.pins:  # everything already in the base: no layer
            out.append(SystemStage(stage, lk, lock_file))
    return tuple(out)


def service_plan(project: Project, svc: Service, backend: Backend, platform: str, locks: list[Lock],
                 system: dict[tuple[str, str], AptLock] | None = None) -> ImagePlan:
    compat = compat_mod.load()
    stages = tuple(LayerStage(lk.layer, lk, project.layer_split) for lk in locks
                   if lk.layer != "cuda-libs" and (not lk.layer.startswith("service-") or lk.layer == f"service-{svc.name}")
                   and lk.pins)
    site_dirs = [s.site_dir for s in reversed(stages)]
    if backend.is_cuda:
        site_dirs.append(f"{SITE}/cuda-libs")
    env = [
        ("PYTHONPATH", ":".join([APP_DIR, RUNTIME_DIR] + site_dirs)),
        ("PATH", ":".join(f"{d}/bin" for d in site_dirs) + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        ("PYTHONUNBUFFERED", "1"),
        ("HOME", HOME_DIR),
        ("TMPDIR", "/tmp"),
        ("SERVICE_NAME", svc.name),
        ("SERVICE_VERSION", svc.version),
        ("SERVICE_PORT", str(svc.port)),
        ("SERVICE_BACKEND", backend.name),
        # Names are free-form; the entrypoint decides whether to probe CUDA by kind.
        ("SERVICE_BACKEND_KIND", "cuda" if backend.is_cuda else "cpu"),
        ("BACKEND_POLICY", svc.policy),
    ]
    env += list(_alloc_env())
    labels = [
        ("org.opencontainers.image.title", f"{project.name}/{svc.name}"),
        ("org.opencontainers.image.version", svc.version),
        (f"{LABEL_PREFIX}.service", svc.name),
        (f"{LABEL_PREFIX}.backend", backend.name),
        # For runtimes with a read-only root (docker --read-only, Kubernetes readOnlyRootFilesystem).
        (f"{LABEL_PREFIX}.writable-dirs", " ".join(WRITABLE_DIRS)),
        # Per platform, so it comes in as a build argument (see render).
        (f"{LABEL_PREFIX}.torch", "${TORCH_VERSION}"),
    ]
    if backend.is_cuda:
        rel = compat.cuda(backend.cuda)
        env += [("CUDA_MIN_DRIVER", rel.min_driver), ("CUDA_RUNTIME_VERSION", str(rel.runtime_version))]
        torch = backend.torch_for(platform)
        if torch is not None:
            # What torch's kernels cover; the entrypoint checks the GPU against it.
            # Per platform (the builds differ), so it comes in as a build argument like the torch label.
            env.append(("CUDA_ARCHS", "${CUDA_ARCHS}"))
        labels += [(f"{LABEL_PREFIX}.cuda", backend.cuda), (f"{LABEL_PREFIX}.min-driver", rel.min_driver),
                   (f"{LABEL_PREFIX}.cuda-libs", project.cuda_libs.tag(backend.cuda))]
    return ImagePlan(svc.name, "service", backend, platform, project.repository(svc.name),
                     (f"{svc.version}-{backend.name}",), f"{svc.version}-{backend.name}",
                     f"{svc.name}.{backend.name}.Dockerfile", "cuda-libs" if backend.is_cuda else "base",
                     stages, svc, tuple(env), tuple(labels), (), system_stages(project, svc, platform, system or {}))


def make_plan(project: Project, locks: dict[tuple[str, str], list[Lock]],
              backends: list[str] | None = None, services: list[str] | None = None,
              platforms: list[str] | None = None,
              system: dict[tuple[str, str], AptLock] | None = None) -> BuildPlan:
    """All images for the selected backends/services/platforms, dependencies first.

    system: the apt locks by (platform, layer), as lock.load_apt_locks reads them.
    """
    images: list[ImagePlan] = []
    libs_pins: dict[tuple[str, str], tuple[str, tuple]] = {}  # (line, platform) -> (backend, pins)
    for backend in project.backends.values():
        if backends and backend.name not in backends:
            continue
        for platform in backend.platforms:
            if platforms and platform not in platforms:
                continue
            blocks = locks[(backend.name, platform)]
            if backend.is_cuda:
                libs = cuda_libs_plan(project, backend, platform, blocks)
                # Backends on one CUDA line share its CUDA-libs image (one tag), so they must pin the same wheels.
                first = libs_pins.setdefault((backend.cuda, platform), (backend.name, libs.layers[0].lock.pins))
                if first[1] != libs.layers[0].lock.pins:
                    raise UserError(f"backends {first[0]} and {backend.name} both use CUDA {backend.cuda} on {platform} "
                                    "but their locks pin different CUDA libraries; they would publish different "
                                    f"images under one tag ({libs.human_tags[0]})",
                                    "give them the same torch, or put them on different CUDA lines")
                images.append(libs)
            for svc in project.services.values():
                if backend.name in svc.backends and (not services or svc.name in services):
                    images.append(service_plan(project, svc, backend, platform, blocks, system))
    return BuildPlan(project, tuple(images))


def content_tag(image: ImagePlan, dockerfile_text: str, context_digest: str, parent: str) -> str:
    """A tag that changes exactly when what goes into the image changes.

    parent: the base image digest, or the CUDA-libs content tag for cuda services.
    """
    h = hashlib.sha256()
    for part in (dockerfile_text, context_digest, parent, image.platform):
        h.update(part.encode())
        h.update(b"\0")
    return f"{image.content_prefix}-{h.hexdigest()[:12]}"


def tree_digest(path: Path, skip: tuple[str, ...] = ()) -> str:
    """Hash of a directory's relative paths, modes and contents (mtimes ignored).

    skip: top-level entries left out (the wheelhouse: its wheels are pinned
    by hash in the locks, whatever else the find-links directory holds).
    """
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if "__pycache__" in p.parts or p.suffix == ".pyc" or p.relative_to(path).parts[0] in skip:
            continue
        rel = p.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0")
        if p.is_file():
            h.update(b"x" if p.stat().st_mode & 0o111 else b"-")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def settings(image: ImagePlan, base_name: str, base_digest: str):
    """What the image's config sets on top of its parent: the final stage of its Dockerfile, as data.

    The base is named without a registry host (and pinned by digest), so the
    same image has the same config digest in every registry.
    """
    torch = image.backend.torch_for(image.platform) or "none"
    labels = tuple((k, v.replace("${TORCH_VERSION}", torch)) for k, v in image.labels)
    archs = " ".join(compat_mod.load().archs(torch, image.backend.cuda, image.platform)) if image.backend.is_cuda else ""
    env = tuple((k, v.replace("${CUDA_ARCHS}", archs)) for k, v in image.env)
    labels += (("org.opencontainers.image.base.name", base_name),
               ("org.opencontainers.image.base.digest", base_digest))
    if image.kind != "service":
        return Settings(env=env, labels=labels)
    svc = image.service
    hc = healthcheck(svc.port)
    return Settings(env=env, labels=labels, user=f"{APP_UID}:{APP_UID}", workdir=APP_DIR,
                    entrypoint=("python3", f"{RUNTIME_DIR}/entrypoint.py"), cmd=tuple(svc.command),
                    exposed_ports=(f"{svc.port}/tcp",),
                    healthcheck=hc_config(list(hc.test), hc.interval, hc.timeout, hc.start_period, hc.retries))


def check_selection(project: Project, backends=None, services=None, platforms=None) -> None:
    """Names given on the command line exist, and each named backend builds for each named platform."""
    for b in backends or []:
        if b not in project.backends:
            raise UserError(f"unknown backend {b!r}; {project.file.name} defines {sorted(project.backends)}")
    for s in services or []:
        if s not in project.services:
            raise UserError(f"unknown service {s!r}; {project.file.name} defines {sorted(project.services)}")
    for p in platforms or []:
        # Named backends must build there; "all" means those that do.
        for b in backends or []:
            if p not in project.backends[b].platforms:
                raise UserError(f"backend {b} is not built for {p}: the compatibility data or backends.{b}.platforms "
                                f"allow {list(project.backends[b].platforms)}",
                                f"clients on {p} use another backend; see `invoke select`")
