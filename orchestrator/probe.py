"""Host probe: what this machine can run (driver, libcuda, devices, CPU).

Every file is read under an injectable root directory so tests can fake any
host (no GPU, an old driver, a Fedora /usr/lib64 layout, an arm64 box).
NVML and `ldconfig -p` are only asked on the real root.
"""

from __future__ import annotations

import os
import re
import subprocess
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
DRIVER_RE = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Host:
    platform: str  # linux/amd64
    driver_version: str | None = None
    driver_source: str | None = None  # nvml | /proc/driver/nvidia/version
    libcuda: str | None = None
    devices: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def arch(self) -> str:
        return self.platform.split("/")[1]

    def as_json(self) -> dict:
        return {"platform": self.platform, "driver_version": self.driver_version,
                "driver_source": self.driver_source, "libcuda": self.libcuda, "devices": list(self.devices)}


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


def probe(root: str | os.PathLike = "/", machine: str | None = None) -> Host:
    root = Path(root)
    real = root.resolve() == Path("/")
    arch = ARCHES.get(machine or os.uname().machine, machine or os.uname().machine)
    notes = []

    driver, source = (_nvml_driver(), "nvml") if real else (None, None)
    if driver is None:
        try:
            driver = parse_driver_version((root / "proc/driver/nvidia/version").read_text())
            source = "/proc/driver/nvidia/version" if driver else None
        except OSError:
            source = None

    libcuda = _ldconfig_libcuda() if real else None
    if libcuda is None:
        for d in LIBCUDA_DIRS:
            candidate = root / d / "libcuda.so.1"
            if candidate.exists():
                libcuda = "/" + str(candidate.relative_to(root))
                break
    devices = tuple(sorted("/" + str(p.relative_to(root)) for p in (root / "dev").glob("nvidia[0-9]*")))
    if libcuda and not driver:
        notes.append("libcuda.so.1 found but no driver version (no NVML, no /proc/driver/nvidia/version)")
    return Host(f"linux/{arch}", driver, source, libcuda, devices, tuple(notes))
