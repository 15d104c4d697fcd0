"""Host probe: what this machine can run (driver, libcuda, devices, CPU).

Every file is read under an injectable root directory so tests can fake any
host (no GPU, an old driver, a Fedora /usr/lib64 layout, an arm64 box, WSL2).
NVML and `ldconfig -p` are only asked on the real root; a test may pass its
own `nvml` function to stand in for NVML on a fake root.

WSL2 has no /dev/nvidia* and no /proc/driver/nvidia/version: the GPU is
/dev/dxg, libcuda.so.1 lives in /usr/lib/wsl/lib and the driver version
comes from NVML only.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Where distributions and runtimes put libcuda.so.1, in search order.
LIBCUDA_DIRS = (
    "usr/lib/x86_64-linux-gnu",  # Debian/Ubuntu multiarch, NVIDIA Container Toolkit mounts
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",  # Fedora, RHEL, openSUSE
    "usr/lib",  # Arch
    "usr/lib/wsl/lib",  # WSL2
    "usr/local/nvidia/lib64",  # GKE and other Kubernetes node images
    "usr/local/nvidia/lib",
    "run/opengl-driver/lib",  # NixOS
)
ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
WSL_LIB_DIR = "usr/lib/wsl/lib"
WSL_DEVICE = "dev/dxg"
DRIVER_RE = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Host:
    platform: str  # linux/amd64
    driver_version: str | None = None
    driver_source: str | None = None  # nvml | /proc/driver/nvidia/version
    libcuda: str | None = None
    devices: tuple[str, ...] = ()  # /dev/nvidia0.. or, on WSL2, /dev/dxg
    notes: tuple[str, ...] = field(default_factory=tuple)
    wsl: bool = False  # WSL2: GPU through /dev/dxg, driver from NVML only

    @property
    def arch(self) -> str:
        return self.platform.split("/")[1]

    def as_json(self) -> dict:
        return {"platform": self.platform, "driver_version": self.driver_version,
                "driver_source": self.driver_source, "libcuda": self.libcuda, "devices": list(self.devices), "wsl": self.wsl}


def _nvml_driver() -> str | None:
    # The in-image entrypoint asks NVML the same way; it is stdlib-only, so share it.
    from .runtime.entrypoint import _nvml_driver_version

    return _nvml_driver_version()


def _ldconfig_libcuda() -> str | None:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.strip().startswith("libcuda.so.1 ") and "=>" in line:
            return line.split("=>", 1)[1].strip()
    return None


def parse_driver_version(text: str) -> str | None:
    m = DRIVER_RE.search(text)
    return m.group(1) if m else None


def probe(root: str | os.PathLike = "/", machine: str | None = None,
          nvml: Callable[[], str | None] | None = None) -> Host:
    """What the host at root offers. `nvml` answers the driver version in place of
    NVML (default: the real NVML on the real root, none on a fake root)."""
    root = Path(root)
    real = root.resolve() == Path("/")
    arch = ARCHES.get(machine or os.uname().machine, machine or os.uname().machine)
    notes = []
    wsl = (root / WSL_DEVICE).exists() or (root / WSL_LIB_DIR).is_dir()

    ask_nvml = nvml if nvml is not None else (_nvml_driver if real else None)
    driver = ask_nvml() if ask_nvml else None
    source = "nvml" if driver else None
    if driver is None:
        try:
            driver = parse_driver_version((root / "proc/driver/nvidia/version").read_text())
            source = "/proc/driver/nvidia/version" if driver else None
        except OSError:
            source = None

    libcuda = _ldconfig_libcuda() if real else None
    if libcuda is None:
        # On WSL2 the Windows driver's libcuda comes first: a distribution's own
        # libcuda.so.1 there cannot reach the GPU.
        for d in ((WSL_LIB_DIR,) if wsl else ()) + LIBCUDA_DIRS:
            candidate = root / d / "libcuda.so.1"
            if candidate.exists():
                libcuda = "/" + str(candidate.relative_to(root))
                break
    devices = sorted("/" + str(p.relative_to(root)) for p in (root / "dev").glob("nvidia[0-9]*"))
    if (root / WSL_DEVICE).exists():
        devices.append("/" + WSL_DEVICE)
    if libcuda and not driver:
        notes.append("libcuda.so.1 found but no driver version ("
                     + ("WSL2: NVML did not answer" if wsl else "no NVML, no /proc/driver/nvidia/version") + ")")
    if wsl and not (root / WSL_DEVICE).exists():
        notes.append("WSL2 without /dev/dxg: GPU paravirtualization is off (update WSL and the Windows driver)")
    return Host(f"linux/{arch}", driver, source, libcuda, tuple(devices), tuple(notes), wsl)
