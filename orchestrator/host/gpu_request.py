"""How a CUDA container asks the engine for GPUs, the way this host provides them.

Three ways a host hands GPUs to Docker containers, tried in this order:

  nvidia   the NVIDIA Container Toolkit (docker info lists the `nvidia`
           runtime, or its hook is installed): a DeviceRequest with
           driver "nvidia", like `docker run --gpus all`;
  cdi      CDI enabled in the engine (docker info CDISpecDirs) with a spec
           for nvidia.com/gpu in one of those dirs (`nvidia-ctk cdi
           generate`): a DeviceRequest with driver "cdi" and device ids
           nvidia.com/gpu=all, like `docker run --device nvidia.com/gpu=all`;
  none     no GPU request: a cuda image finds no libcuda and falls back
           (or exits 78 under BACKEND_POLICY=strict).

Either way the host must have a GPU device node (/dev/nvidia0, /dev/dxg on
WSL2): asking for GPUs on a host without one makes the engine refuse to
start the container.

The caller's NVIDIA_VISIBLE_DEVICES (else CUDA_VISIBLE_DEVICES) picks the
GPUs: unset or "all" means every GPU, "none"/"void"/"" (or CUDA's "-1")
means none, "0,1" or GPU UUIDs name them. Only CUDA backends get a request;
a cpu container never does.

`decide` is pure (tests give it any host); `host_facts` reads the engine
and the filesystem; `for_host` does both.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

CDI_KIND = "nvidia.com/gpu"
# The engine's default CDI dirs: looked at when CDI is off, to say how to turn it on.
DEFAULT_CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
NO_GPU_VALUES = ("none", "void", "")
NVIDIA_HOOK = "nvidia-container-runtime-hook"
_CDI_KIND_RE = re.compile(r"""["']?kind["']?\s*:\s*["']?nvidia\.com/gpu["']?""")


@dataclass(frozen=True)
class HostFacts:
    """What decides the request: from docker info, the filesystem and the caller's environment."""

    runtimes: tuple[str, ...] = ()  # docker info Runtimes
    nvidia_hook: bool = False  # nvidia-container-runtime-hook on PATH (the engine's --gpus driver needs it)
    cdi_spec_dirs: tuple[str, ...] = ()  # docker info CDISpecDirs: empty when CDI is off
    # Spec files defining nvidia.com/gpu in those dirs (in the default dirs when CDI is off, for the hint).
    cdi_nvidia_specs: tuple[str, ...] = ()
    gpu_nodes: tuple[str, ...] = ()  # /dev/nvidia0.., /dev/dxg
    nvidia_visible_devices: str | None = None  # the caller's env; None when unset
    cuda_visible_devices: str | None = None


@dataclass(frozen=True)
class GpuRequest:
    """The docker-py arguments for one CUDA container, and what to tell the user."""

    mechanism: str | None  # nvidia | cdi | None (no request)
    device_ids: tuple[str, ...] | None  # None: all GPUs
    description: str
    environment: dict[str, str] = field(default_factory=dict)  # added to the container's env

    @property
    def requested(self) -> bool:
        return self.mechanism is not None

    def device_requests(self) -> list:
        """[docker.types.DeviceRequest] for containers.run/create; [] for no request."""
        import docker  # local: the pure decision needs no docker-py

        if self.mechanism == "nvidia":
            if self.device_ids is None:
                return [docker.types.DeviceRequest(driver="nvidia", count=-1, capabilities=[["gpu"]])]
            return [docker.types.DeviceRequest(driver="nvidia", device_ids=list(self.device_ids),
                                               capabilities=[["gpu"]])]
        if self.mechanism == "cdi":
            ids = ["all"] if self.device_ids is None else list(self.device_ids)
            return [docker.types.DeviceRequest(driver="cdi", device_ids=[f"{CDI_KIND}={i}" for i in ids])]
        return []

    def kwargs(self) -> dict:
        """Keyword arguments for client.containers.run/create (device_requests only; env: see environment)."""
        reqs = self.device_requests()
        return {"device_requests": reqs} if reqs else {}


def visible_devices(facts: HostFacts) -> tuple[tuple[str, ...] | None, str]:
    """(device ids or None for all, where that came from). () means: no GPU wanted."""
    for var, value in (("NVIDIA_VISIBLE_DEVICES", facts.nvidia_visible_devices),
                       ("CUDA_VISIBLE_DEVICES", facts.cuda_visible_devices)):
        if value is None:
            continue
        text = value.strip().lower()
        if text in NO_GPU_VALUES or (var == "CUDA_VISIBLE_DEVICES" and text == "-1"):
            return (), f"{var}={value!r}"
        if text == "all":
            return None, f"{var}=all"
        # Indices (0,1), UUIDs (GPU-...) and MIG ids (MIG-..., 0:1) pass through as the user wrote them.
        # CUDA_VISIBLE_DEVICES indices follow CUDA's order; they match the engine's with CUDA_DEVICE_ORDER=PCI_BUS_ID.
        return tuple(x.strip() for x in value.split(",") if x.strip()), f"{var}={value}"
    return None, ""


def decide(facts: HostFacts | None, cuda: bool = True) -> GpuRequest:
    """The GPU request for a container of a CUDA backend (cuda=True) or not, on a host with these facts.

    facts may be None for a non-CUDA backend: it never gets a request.
    """
    if not cuda:
        return GpuRequest(None, None, "no GPU request (cpu backend)")
    facts = facts or HostFacts()
    ids, source = visible_devices(facts)
    if ids == ():
        # A host whose default runtime is nvidia would still inject GPUs by the image's env: say void.
        return GpuRequest(None, (), f"no GPU request: {source} asks for no GPU; cuda images will fall back",
                          {"NVIDIA_VISIBLE_DEVICES": "void"})
    if not facts.gpu_nodes:
        return GpuRequest(None, None, "no GPU on this host (no /dev/nvidia0): cuda images will fall back")
    which = "all" if ids is None else ",".join(ids)
    src = f" ({source})" if source else ""
    toolkit = "nvidia" in facts.runtimes or facts.nvidia_hook
    if toolkit:
        how = "nvidia runtime" if "nvidia" in facts.runtimes else NVIDIA_HOOK
        # The request picks the GPUs; the env keeps a host whose default runtime is nvidia in line with it.
        env = {} if ids is None else {"NVIDIA_VISIBLE_DEVICES": which}
        return GpuRequest("nvidia", ids, f"GPUs: {which} via {how}{src}", env)
    if facts.cdi_spec_dirs and facts.cdi_nvidia_specs:
        return GpuRequest("cdi", ids, f"GPUs: {which} via CDI {CDI_KIND} ({facts.cdi_nvidia_specs[0]}){src}")
    if facts.cdi_spec_dirs:
        hint = (f"CDI is enabled but no {CDI_KIND} spec is in {', '.join(facts.cdi_spec_dirs)} "
                "(run: nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml)")
    elif facts.cdi_nvidia_specs:
        hint = (f"a CDI spec for {CDI_KIND} is in {facts.cdi_nvidia_specs[0]} but CDI is off in the engine "
                "(Docker 25+: set \"features\": {\"cdi\": true} in /etc/docker/daemon.json and restart dockerd)")
    else:
        hint = ("no GPU runtime in the engine (install the NVIDIA Container Toolkit and run "
                "nvidia-ctk runtime configure --runtime=docker, then restart dockerd)")
    return GpuRequest(None, None, f"{hint}: cuda images will fall back")


# --- effects -------------------------------------------------------------

def gpu_nodes(root: Path = Path("/")) -> tuple[str, ...]:
    """GPU device nodes under root: /dev/nvidia0.. (not nvidiactl, nvidia-uvm), or WSL2's /dev/dxg."""
    dev = root / "dev"
    found = sorted((p for p in dev.glob("nvidia*") if p.name[len("nvidia"):].isdigit()),
                   key=lambda p: int(p.name[len("nvidia"):]))
    if (dev / "dxg").exists():
        found.append(dev / "dxg")
    return tuple(f"/dev/{p.name}" for p in found)


def cdi_nvidia_specs(dirs, root: Path = Path("/")) -> tuple[str, ...]:
    """Spec files (.json, .yaml, .yml) in dirs that define the nvidia.com/gpu kind."""
    out = []
    for d in dirs:
        base = root / str(d).lstrip("/")
        try:
            files = sorted(p for p in base.iterdir() if p.suffix in (".json", ".yaml", ".yml"))
        except OSError:
            continue
        for p in files:
            try:
                if _CDI_KIND_RE.search(p.read_text(errors="replace")):
                    out.append(str(Path("/") / p.relative_to(root)))
            except OSError:
                continue
    return tuple(out)


def host_facts(info: dict | None, environ=None, root: Path = Path("/"), which=shutil.which) -> HostFacts:
    """Facts from docker info (client.info()), the caller's environment and the filesystem under root."""
    info = info or {}
    environ = os.environ if environ is None else environ
    spec_dirs = tuple(info.get("CDISpecDirs") or ())
    return HostFacts(runtimes=tuple(sorted(info.get("Runtimes") or {})),
                     nvidia_hook=which(NVIDIA_HOOK) is not None,
                     cdi_spec_dirs=spec_dirs,
                     cdi_nvidia_specs=cdi_nvidia_specs(spec_dirs or DEFAULT_CDI_DIRS, root),
                     gpu_nodes=gpu_nodes(root),
                     nvidia_visible_devices=environ.get("NVIDIA_VISIBLE_DEVICES"),
                     cuda_visible_devices=environ.get("CUDA_VISIBLE_DEVICES"))


def for_host(client, cuda: bool = True, environ=None) -> GpuRequest:
    """The request for a container on this engine (a docker-py client): docker info plus this machine's files
    and env."""
    if not cuda:
        return decide(None, cuda=False)
    return decide(host_facts(client.info(), environ), cuda=True)
