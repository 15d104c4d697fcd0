"""Selection (pure): which image this host should run, and why.

Walks the platform's fallback list starting at its default, skips a backend
whose requirement the host fails ("driver 515.65 < 525.60.13"), and returns
the first that fits, by digest. An override is honoured but still checked.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import UserError
from .probe import Host


@dataclass(frozen=True)
class Choice:
    backend: str
    image: str
    platform: str
    reasons: tuple[str, ...]  # why each earlier backend was skipped, then why this one
    candidates: tuple[str, ...]  # the order walked, from the default

    def as_json(self) -> dict:
        return {"backend": self.backend, "image": self.image, "platform": self.platform,
                "reasons": list(self.reasons), "candidates": list(self.candidates)}


def walk_order(entry: dict) -> list[str]:
    """The fallback list rotated to start at the default."""
    fallback = list(entry.get("fallback") or [])
    default = entry.get("default")
    if default in fallback:
        i = fallback.index(default)
        fallback = fallback[i:] + [b for b in fallback[:i] if b not in fallback[i:]]
    elif default:
        fallback = [default] + fallback
    return [b for b in fallback if b in entry.get("backends", {})]


def unmet(backend: str, spec: dict, host: Host) -> str | None:
    """Why the host cannot run this backend, or None if it can."""
    requires = spec.get("requires") or {}
    if not requires.get("cuda"):
        return None
    if host.libcuda is None:
        return "no NVIDIA driver (libcuda.so.1 not found via ldconfig or the usual library paths)"
    if not host.devices:
        # WSL2 exposes the GPU as /dev/dxg, never /dev/nvidia*.
        return "no /dev/dxg device (WSL2 GPU paravirtualization is off)" if host.wsl else "no /dev/nvidia* device"
    want = requires.get("driver")
    if want:
        if host.driver_version is None:
            return ("driver version unknown (NVML did not answer; WSL2 has no /proc/driver/nvidia/version)"
                    if host.wsl else "driver version unknown (no NVML, no /proc/driver/nvidia/version)")
        try:
            spec = SpecifierSet(want)
        except InvalidSpecifier:
            raise UserError(f"the backend manifest's {backend}.requires.driver {want!r} is not a version range",
                            "expected e.g. '>=525.60.13'; re-publish the manifest") from None
        try:
            ok = Version(host.driver_version) in spec
        except InvalidVersion:
            return f"driver version {host.driver_version!r} unreadable"
        if not ok:
            single = len(spec) == 1 and next(iter(spec)).operator == ">="
            return f"driver {host.driver_version} < {next(iter(spec)).version}" if single \
                else f"driver {host.driver_version} does not satisfy {want}"
    return None


def select(manifest: dict, host: Host, override: str | None = None, source: str = "backend manifest") -> Choice:
    platforms = manifest.get("platforms", {})
    entry = platforms.get(host.platform)
    if entry is None:
        raise UserError(f"{source} has no images for {host.platform} (it has {sorted(platforms)})",
                        "publish for this platform, or run on a host of another architecture")
    order = walk_order(entry)
    backends = entry["backends"]
    if override:
        if override not in backends:
            raise UserError(f"backend {override!r} is not published for {host.platform} in {source} "
                            f"(available: {sorted(backends)})", "drop the override or publish that backend")
        why = unmet(override, backends[override], host)
        if why:
            raise UserError(f"backend {override!r} was asked for, but this host cannot run it: {why}",
                            "drop the override to let selection fall back")
        return Choice(override, backends[override]["image"], host.platform, (f"{override}: asked for (override)",),
                      (override,))
    reasons = []
    for name in order:
        why = unmet(name, backends[name], host)
        if why:
            reasons.append(f"{name}: skipped, {why}")
            continue
        reasons.append(f"{name}: " + ("default" if name == entry.get("default") else "next in the fallback list")
                       + (", requirements met" if backends[name].get("requires") else ""))
        return Choice(name, backends[name]["image"], host.platform, tuple(reasons), tuple(order))
    raise UserError(f"no backend in {source} can run on this host: " + "; ".join(reasons),
                    "add a cpu backend to the fallback list, or fix the driver")
