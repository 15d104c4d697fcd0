"""Host probe: what this machine can run (driver, libcuda, devices, CPU).

Every file is read under an injectable root directory so tests can fake any
host (no GPU, an old driver, a Fedora /usr/lib64 layout, an arm64 box, WSL2).
NVML, libcuda and `ldconfig -p` are only asked on the real root; a test may
pass its own `nvml` (driver version) and `gpus` (GPU list) functions to stand
in for them on a fake root, and its own `env` for the visibility variables.

GPUs and their compute capabilities come from runtime/gpus.py (stdlib only,
shared with the image): NVML, else libcuda. Which of them a service would
use is NVIDIA_VISIBLE_DEVICES, then CUDA_VISIBLE_DEVICES (`visible_gpus`).

WSL2 has no /dev/nvidia* and no /proc/driver/nvidia/version: the GPU is
/dev/dxg, libcuda.so.1 lives in /usr/lib/wsl/lib and the driver version
comes from NVML only.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.common.hostinfo import host_arch
from orchestrator.host.runtime import gpus

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
WSL_LIB_DIR = "usr/lib/wsl/lib"
WSL_DEVICE = "dev/dxg"
DRIVER_RE = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Gpu:
    """One physical GPU, numbered as nvidia-smi and NVIDIA_VISIBLE_DEVICES number it."""

    index: int
    uuid: str | None = None  # GPU-xxxxxxxx-...
    name: str | None = None  # NVIDIA GeForce RTX 5090
    cc: tuple[int, int] | None = None  # compute capability (12, 0); None: unknown
    source: str | None = None  # where cc came from: nvml | cuda

    @property
    def sm(self) -> str | None:
        return f"sm_{self.cc[0]}{self.cc[1]}" if self.cc else None

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.name})" if self.name else f"GPU {self.index}"

    def as_json(self) -> dict:
        return {"index": self.index, "uuid": self.uuid, "name": self.name,
                "cc": f"{self.cc[0]}.{self.cc[1]}" if self.cc else None, "sm": self.sm, "source": self.source}

    @classmethod
    def from_report(cls, d: dict, source: str | None) -> Gpu:
        """From one entry of runtime/gpus.py's report ({"index", "uuid", "name", "cc": "9.0"})."""
        cc = None
        if d.get("cc"):
            major, _, minor = str(d["cc"]).partition(".")
            cc = (int(major), int(minor or 0))
        return cls(int(d["index"]), d.get("uuid"), d.get("name"), cc, source if cc else None)


@dataclass(frozen=True)
class Host:
    platform: str  # linux/amd64
    driver_version: str | None = None
    driver_source: str | None = None  # nvml | /proc/driver/nvidia/version
    libcuda: str | None = None
    devices: tuple[str, ...] = ()  # /dev/nvidia0.. or, on WSL2, /dev/dxg
    notes: tuple[str, ...] = field(default_factory=tuple)
    wsl: bool = False  # WSL2: GPU through /dev/dxg, driver from NVML only
    gpus: tuple[Gpu, ...] = ()  # every GPU, by index; () when nothing could list them
    nvidia_visible: str | None = None  # $NVIDIA_VISIBLE_DEVICES as set, None when unset
    cuda_visible: str | None = None  # $CUDA_VISIBLE_DEVICES as set, None when unset

    @property
    def arch(self) -> str:
        return self.platform.split("/")[1]

    @property
    def visible(self) -> str | None:
        """The visibility variables as set ('CUDA_VISIBLE_DEVICES=1'), None when neither is."""
        parts = [f"{k}={v}" for k, v in (("NVIDIA_VISIBLE_DEVICES", self.nvidia_visible),
                                          ("CUDA_VISIBLE_DEVICES", self.cuda_visible)) if v is not None]
        return " ".join(parts) or None

    def as_json(self) -> dict:
        return {"platform": self.platform, "driver_version": self.driver_version,
                "driver_source": self.driver_source, "libcuda": self.libcuda, "devices": list(self.devices),
                "wsl": self.wsl, "gpus": [g.as_json() for g in self.gpus],
                "visible": {"NVIDIA_VISIBLE_DEVICES": self.nvidia_visible, "CUDA_VISIBLE_DEVICES": self.cuda_visible},
                "notes": list(self.notes)}


@dataclass(frozen=True)
class Visible:
    """The GPUs a service started here would get, after the visibility variables."""

    gpus: tuple[Gpu, ...]
    known: bool  # False: no GPU list (no NVML/libcuda answer, or a fake root without one)
    problem: str | None = None  # why no GPU is visible at all
    scope: str | None = None  # the variables that narrowed the list, for the reasons


def _match(entry: str, gpus: tuple[Gpu, ...], by_position: bool) -> tuple[Gpu, ...] | None:
    """The GPUs one visibility entry names; None when it names none of them."""
    if re.fullmatch(r"\d+", entry):
        i = int(entry)
        if by_position:  # CUDA_VISIBLE_DEVICES counts the GPUs left visible, in order
            return (gpus[i],) if i < len(gpus) else None
        return tuple(g for g in gpus if g.index == i) or None
    if re.fullmatch(r"\d+:\d+", entry) and not by_position:  # a MIG slice "gpu:instance"
        return _match(entry.split(":")[0], gpus, False)
    if entry.upper().startswith("MIG-"):
        # A MIG UUID does not name its parent without asking NVML about MIG: check every GPU.
        return gpus or None
    if entry.upper().startswith("GPU-"):
        # Full UUIDs, or (as CUDA accepts) an unambiguous prefix.
        hits = tuple(g for g in gpus if g.uuid and g.uuid.lower().startswith(entry.lower()))
        return hits if len(hits) == 1 else None
    return None


def visible_gpus(host: Host) -> Visible:
    """Apply NVIDIA_VISIBLE_DEVICES (the container toolkit: all | none | void | indices or
    GPU-UUIDs, numbered as nvidia-smi) and then CUDA_VISIBLE_DEVICES (indices among the GPUs
    left, or UUID prefixes; CUDA stops at the first entry that names no GPU)."""
    gpus, known, scope = host.gpus, bool(host.gpus), []
    nv = (host.nvidia_visible or "").strip()
    if nv.lower() in ("none", "void"):
        return Visible((), known, f"NVIDIA_VISIBLE_DEVICES={nv}: no GPU visible")
    if nv and nv.lower() != "all":
        scope.append(f"NVIDIA_VISIBLE_DEVICES={nv}")
        if known:
            picked: list[Gpu] = []
            for entry in (e.strip() for e in nv.split(",")):
                hits = _match(entry, gpus, by_position=False)
                if hits is None:
                    have = ", ".join(str(g.index) + (f" {g.uuid}" if g.uuid else "") for g in gpus)
                    return Visible((), known, f"NVIDIA_VISIBLE_DEVICES={nv} names {entry!r}, "
                                              f"which is not a GPU of this host (it has {have})")
                picked += [g for g in hits if g not in picked]
            # Inside the container the GPUs are numbered anew, in bus order.
            gpus = tuple(sorted(picked, key=lambda g: g.index))
    cv = host.cuda_visible
    if cv is not None:
        cv = cv.strip()
        scope.append(f"CUDA_VISIBLE_DEVICES={cv}")
        entries = [e.strip() for e in cv.split(",")] if cv else []
        if known:
            picked = []
            for entry in entries:
                hits = _match(entry, gpus, by_position=True)
                if hits is None or any(g in picked for g in hits):
                    break
                picked += hits
            if not picked:
                return Visible((), known, f"CUDA_VISIBLE_DEVICES={cv!r}: no GPU visible"
                                          + (f" (this host has {len(gpus)})" if cv else ""))
            gpus = tuple(picked)
        elif not entries or not re.fullmatch(r"\d+|(?i:GPU|MIG)-.*", entries[0]):
            return Visible((), known, f"CUDA_VISIBLE_DEVICES={cv!r}: no GPU visible")
    return Visible(gpus, known, None, " ".join(scope) or None)


def _nvml_driver() -> str | None:
    # The GPU lister is stdlib-only and shared with the image: ask NVML through it.

    return gpus.nvml_driver_version()


def _real_gpus() -> tuple[list[Gpu], list[str]]:
    """Every GPU of this machine from NVML, else libcuda, and what went wrong asking."""
    report = gpus.probe_gpus()
    return [Gpu.from_report(g, report["source"]) for g in report["gpus"]], list(report.get("notes") or ())


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
          nvml: Callable[[], str | None] | None = None, gpus: Callable[[], list[Gpu]] | None = None,
          env: Mapping[str, str] | None = None) -> Host:
    """What the host at root offers. `nvml` answers the driver version and `gpus` the GPU
    list in place of NVML/libcuda (default: the real ones on the real root, none on a
    fake root); `env` holds the visibility variables (default: os.environ)."""
    env = os.environ if env is None else env
    root = Path(root)
    real = root.resolve() == Path("/")
    arch = host_arch(machine)
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

    found: list[Gpu] = []
    if gpus is not None:
        found = list(gpus())
    elif real and libcuda:  # no driver, no GPU to list: do not even load the libraries
        found, why = _real_gpus()
        notes += why
    if (gpus is not None or real) and libcuda and devices and not found:
        notes.append("no GPU list (NVML and libcuda did not answer): compute capabilities cannot be checked")
    return Host(f"linux/{arch}", driver, source, libcuda, tuple(devices), tuple(notes), wsl,
                tuple(sorted(found, key=lambda g: g.index)),
                env.get("NVIDIA_VISIBLE_DEVICES"), env.get("CUDA_VISIBLE_DEVICES"))
