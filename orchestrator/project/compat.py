"""The compatibility table (data/compat.yaml) as typed look-ups."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import yaml
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version


@dataclass(frozen=True)
class CudaRelease:
    version: str
    tag: str
    min_driver: str
    release_driver: str
    runtime_version: int
    runtime_lib: str  # libcudart, relative to the CUDA-libs site dir


@dataclass(frozen=True)
class Compat:
    raw: dict

    # --- CUDA ---------------------------------------------------------
    def cuda(self, version: str) -> CudaRelease | None:
        entry = self.raw["cuda"].get(version)
        if entry is None:
            return None
        return CudaRelease(version, entry["tag"], entry["min_driver"],
                           entry["release_driver"], int(entry["runtime_version"]), entry["runtime_lib"])

    def cuda_versions(self) -> list[str]:
        """Oldest line first."""
        return sorted(self.raw["cuda"], key=Version)

    # --- torch --------------------------------------------------------
    def torch_versions(self) -> list[str]:
        return sorted(self.raw["torch"], key=Version)

    def _torch(self, torch: str) -> dict | None:
        try:
            public = Version(torch).public
        except InvalidVersion:
            return None
        return self.raw["torch"].get(public)

    def torch_cuda_versions(self, torch: str) -> list[str]:
        return sorted((self._torch(torch) or {}).get("cuda", {}))

    def cuda_pins(self, torch: str, cuda: str) -> dict[str, str] | None:
        entry = (self._torch(torch) or {}).get("cuda", {}).get(cuda)
        return None if entry is None else dict(entry["pins"])

    def archs(self, torch: str, cuda: str, platform: str) -> tuple[str, ...]:
        """The GPU architectures torch's build for this CUDA carries on platform (torch.cuda.get_arch_list()).

        `archs` is one list, or one per platform where the builds differ (torch 2.13.0's aarch64
        build targets sm_80 and up, its x86_64 build sm_75 and up).
        """
        entry = (self._torch(torch) or {}).get("cuda", {}).get(cuda) or {}
        archs = entry.get("archs", ())
        return tuple(archs.get(platform, ()) if isinstance(archs, dict) else archs)

    def emulation_blocker(self, torch: str, platform: str) -> str | None:
        """Why this torch cannot run under QEMU for platform (measured), or None."""
        return ((self._torch(torch) or {}).get("emulation_blockers") or {}).get(platform)

    def cuda_release_pins(self, cuda: str) -> dict[str, str]:
        """Every nvidia-* wheel version any known torch pins for this CUDA release."""
        pins: dict[str, str] = {}
        for t in self.torch_versions():
            pins.update(self.cuda_pins(t, cuda) or {})
        return pins

    def platforms_for(self, backend_kind: str, torch: str | None, cuda: str | None) -> list[str]:
        """Platforms on which (backend, torch, cuda) can be built."""
        if torch is None:
            # No torch layer: only the CUDA libs matter, and nvidia-*-cu12
            # wheels exist for both architectures.
            return list(self.raw["platforms"])
        entry = self._torch(torch) or {}
        if backend_kind == "cuda":
            return list(entry.get("cuda", {}).get(cuda, {}).get("platforms", []))
        return list(entry.get("cpu", {}).get("platforms", []))

    # --- layers -------------------------------------------------------
    def is_cuda_libs_package(self, name: str) -> bool:
        name = canonicalize_name(name)
        return any(name.startswith(p) for p in self.raw["cuda_libs_packages"])

    def nvidia_lib_dir(self, name: str) -> str | None:
        return self.raw["nvidia_lib_dirs"].get(canonicalize_name(name))

    def platforms(self) -> list[str]:
        return list(self.raw["platforms"])

    def python_platform(self, platform: str) -> str:
        return self.raw["python_platform"][platform]


@functools.lru_cache(maxsize=1)
def load() -> Compat:
    text = resources.files("orchestrator").joinpath("data/compat.yaml").read_text()
    return Compat(yaml.safe_load(text))
