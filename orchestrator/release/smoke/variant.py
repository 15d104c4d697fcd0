"""What a smoke test checks: a variant by digest, and what this host should make of it.

A `Variant` is one service image of a build (service, backend, platform, by
digest) with what the project and the compatibility data say it must be:
torch and CUDA versions, the arch list, system packages, and whether its
torch can run under QEMU at all. Backend names are free-form; `cuda` says
what is a CUDA line. Pure but for asking the engine how it hands out GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from orchestrator.common import hostinfo
from orchestrator.host import gpu_request as gpu_mod
from orchestrator.host.runtime import entrypoint as ep
from orchestrator.project import compat as compat_mod
from orchestrator.project.spec import Project


DEFAULT_ENGINE = "the default engine"  # how smoke records name the engine no project key names


def variant_label(service: str, backend: str, platform: str) -> str:
    """'tts/cuda13 linux/arm64': how logs, smoke records and smoke.allow_partial name a variant."""
    return f"{service}/{backend} {platform}"


@dataclass(frozen=True)
class Variant:
    service: str
    backend: str
    platform: str
    image: str  # repo@sha256:... or any local reference
    port: int
    version: str
    torch: str | None  # expected torch.__version__, None if the image has no torch
    cuda: str | None  # expected torch.version.cuda / CUDA release, None for cpu
    archs: tuple[str, ...] = ()  # expected torch arch list (compat data); () = take the image's CUDA_ARCHS
    system_packages: tuple[str, ...] = ()  # Debian packages the project file asks for (names)
    # Why this torch cannot run under QEMU on this platform (compat data), or None.
    emulation_blocker: str | None = None


def variants_from_builds(project: Project, results) -> list[Variant]:
    """Exactly the per-platform digests a build made (service images only; results: BuildResults)."""
    compat = compat_mod.load()
    out = []
    for r in results:
        if r.image.kind != "service":
            continue
        svc, backend = r.image.service, r.image.backend
        torch = backend.torch_for(r.image.platform)
        archs = compat.archs(torch, backend.cuda, r.image.platform) if (torch and backend.cuda) else ()
        out.append(Variant(svc.name, backend.name, r.image.platform, f"{r.image.repository}@{r.digest}",
                           svc.port, svc.version, torch, backend.cuda, tuple(archs), r.image.system_packages(),
                           compat.emulation_blocker(torch, r.image.platform) if torch else None))
    return out


def same_torch(found: str | None, wanted: str) -> bool:
    """'2.5.1+cu124' is the 2.5.1 asked for; a local version asked for must match exactly."""
    try:
        f, w = Version(found or ""), Version(wanted)
    except InvalidVersion:
        return False
    return f == w if w.local else f.public == w.public


def native(variant: Variant, engine_platform: str | None = None) -> bool:
    """Runs on the engine's own architecture (else under QEMU); engine_platform: that engine's (default: this machine's)."""
    return variant.platform == (engine_platform or hostinfo.host_platform())


def host_gpu_request(client) -> gpu_mod.GpuRequest:
    """How this host's CUDA containers get GPUs from the engine client talks to (none when it has none to give)."""
    return gpu_mod.for_host(client)


def host_has_gpu(client) -> bool:
    """The engine can hand GPUs to containers (NVIDIA runtime or CDI), the host has one, and the caller wants it."""
    return host_gpu_request(client).requested


def gpu_for(variant: Variant, gpu: gpu_mod.GpuRequest | bool, engine_platform: str | None = None) -> gpu_mod.GpuRequest:
    """The request a variant's container makes: gpu is the engine host's GpuRequest, or False (none).

    Only native CUDA variants get GPUs: an emulated arm64 container cannot use an amd64 host's driver.
    """
    if not variant.cuda or not native(variant, engine_platform) or not gpu or not isinstance(gpu, gpu_mod.GpuRequest):
        return gpu_mod.decide(None, cuda=False)
    return gpu


def expected_cuda(variant: Variant, request: gpu_mod.GpuRequest, info: dict) -> tuple[bool, str]:
    """Should this variant serve on CUDA, given its GPU request and the GPUs /info's probe saw? -> (yes, why not).

    Judged from the compat data (arch list, minimum driver), not from the
    entrypoint's own verdict: a GPU host that this line cannot drive (an
    sm_120 card for a 12.4 build, a driver older than the line needs) must
    fall back, any other must serve on CUDA.
    """
    if not variant.cuda:
        return False, "cpu backend"
    if not request.requested:
        return False, "no GPU handed to the container"
    probe = info.get("cuda_probe") or {}
    archs = list(variant.archs) or list(probe.get("archs") or [])
    for g in probe.get("gpus") or []:
        cc = ep.parse_cc(g.get("cc"))
        if archs and cc and not ep.cc_supported(archs, cc):
            gpu = f"GPU {g.get('index')} ({g.get('name')})"
            return False, f"{gpu} is {g.get('arch')}, not in {ep.describe_archs(archs)}"
    release = compat_mod.load().cuda(variant.cuda)
    have = probe.get("driver_version")
    if release and have and ep._version_tuple(have) < ep._version_tuple(release.min_driver):
        return False, f"driver {have} < {release.min_driver} (CUDA {variant.cuda})"
    return True, ""
