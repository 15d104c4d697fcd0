"""Selection (pure): which image this host should run, and why.

Walks the platform's fallback list starting at its default (the publisher
writes the newest CUDA line first, then older lines, then cpu), skips a
backend whose requirement the host fails ("driver 550.54.15 < 580.65.06",
"GPU 0 (NVIDIA GeForce RTX 5090) is sm_120, this build has sm_50..sm_90"),
and returns the first that fits, by digest. A CUDA backend (one with
`requires.cuda`) is chosen only when its `requires.archs` (torch's
get_arch_list()) can run on every GPU the service would see. An override is
honoured but still checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from orchestrator.common.errors import UserError
from orchestrator.host.probe import Gpu, Host, visible_gpus
from orchestrator.oci.backends import check_schema_version

ARCH_RE = re.compile(r"^(sm|compute)_([0-9]+)([a-z]?)$")


# --- compute capabilities ------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """One entry of torch.cuda.get_arch_list(): sm_86 (a cubin), compute_90 (PTX), sm_90a."""

    name: str
    ptx: bool  # compute_XY: PTX the driver JIT-compiles
    cc: tuple[int, int]
    suffix: str  # '' | 'a' (arch-specific: that cc only) | 'f' (family: later minors of that major)

    def runs_on(self, cc: tuple[int, int]) -> bool:
        """CUDA's binary compatibility: a cubin runs on later minors of its major; PTX on any later cc."""
        if self.suffix == "a":
            return cc == self.cc
        if self.ptx and not self.suffix:
            return cc >= self.cc
        return cc[0] == self.cc[0] and cc[1] >= self.cc[1]


def parse_arch(name: str) -> Arch:
    """'sm_86' -> 8.6, 'sm_120' -> 12.0, 'sm_100a' -> 10.0 arch-specific; ValueError if not an arch."""
    m = ARCH_RE.match(name) if isinstance(name, str) else None
    if not m or len(m.group(2)) < 2:
        raise ValueError(f"{name!r} is not a CUDA arch name")
    digits = m.group(2)  # the last digit is the minor: 86 -> 8.6, 120 -> 12.0
    return Arch(name, m.group(1) == "compute", (int(digits[:-1]), int(digits[-1])), m.group(3))


def supports(archs: Iterable[str | Arch], cc: tuple[int, int]) -> bool:
    """Can a build with these archs run on a GPU of compute capability cc?"""
    return any((a if isinstance(a, Arch) else parse_arch(a)).runs_on(cc) for a in archs)


def arch_range(archs: Iterable[str | Arch]) -> str:
    """'sm_50..sm_90', with PTX named after it: 'sm_75..sm_120 + PTX compute_120'."""
    parsed = [a if isinstance(a, Arch) else parse_arch(a) for a in archs]
    cubins = sorted((a for a in parsed if not a.ptx), key=lambda a: (a.cc, a.suffix))
    ptx = sorted((a for a in parsed if a.ptx), key=lambda a: (a.cc, a.suffix))
    text = (cubins[0].name if len(cubins) == 1 else f"{cubins[0].name}..{cubins[-1].name}") if cubins else ""
    if ptx:
        text = (text + " + " if text else "") + "PTX " + ",".join(a.name for a in ptx)
    return text


def _gpu_list(gpus: list[Gpu]) -> str:
    """'GPU 0 sm_90' / 'GPU 0,1 sm_90, GPU 2 sm_80': GPUs grouped by arch, in index order."""
    groups: dict[str, list[str]] = {}
    for g in gpus:
        groups.setdefault(g.sm, []).append(str(g.index))
    return ", ".join(f"GPU {','.join(ix)} {sm}" for sm, ix in groups.items())


@dataclass(frozen=True)
class Choice:
    backend: str
    image: str
    platform: str
    reasons: tuple[str, ...]  # why each earlier backend was skipped, then why this one
    candidates: tuple[str, ...]  # the order walked, from the default
    host: Host | None = None  # what the probe found, GPUs included
    smoke: dict | None = None  # the chosen image's smoke record in the manifest (what its smoke test ran)
    smoke_gate: dict | None = None  # the manifest's top-level smoke section (ran, variants, partial)

    def as_json(self) -> dict:
        out = {"backend": self.backend, "image": self.image, "platform": self.platform,
               "reasons": list(self.reasons), "candidates": list(self.candidates),
               "smoke": self.smoke, "smoke_gate": self.smoke_gate}
        if self.host is not None:
            out["host"] = self.host.as_json()
        return out


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


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str  # why not ("driver 550.54.15 < 580.65.06"), or what was met ("driver ... >= ...; GPU 0 sm_90 in ...")


def unmet(backend: str, spec: dict, host: Host) -> str | None:
    """Why the host cannot run this backend, or None if it can."""
    v = check(backend, spec, host)
    return None if v.ok else v.detail


def check(backend: str, spec: dict, host: Host) -> Verdict:
    """Whether the host can run this backend: libcuda, a device, the driver range, then
    every visible GPU's compute capability against the build's archs."""
    requires = spec.get("requires") or {}
    if not requires.get("cuda"):
        return Verdict(True, "")
    why = _unmet_driver(backend, requires, host)
    if why:
        return Verdict(False, why)
    met = []
    want = requires.get("driver")
    if want:
        spec_set = SpecifierSet(want)  # _unmet_driver parsed it already
        single = len(spec_set) == 1 and next(iter(spec_set)).operator == ">="
        met.append(f"driver {host.driver_version} >= {next(iter(spec_set)).version}" if single
                   else f"driver {host.driver_version} satisfies {want}")
    vis = visible_gpus(host)
    if vis.problem:
        return Verdict(False, vis.problem)
    archs = requires.get("archs")
    if archs:
        try:
            parsed = [parse_arch(a) for a in archs]
        except ValueError as e:
            raise UserError(f"the backend manifest's {backend}.requires.archs: {e}",
                            "expected names like 'sm_90', 'sm_90a' or 'compute_90' "
                            "(torch.cuda.get_arch_list()); re-publish the manifest") from None
        have = arch_range(parsed)
        bad = [g for g in vis.gpus if g.cc and not supports(parsed, g.cc)]
        if bad:
            return Verdict(False, ", ".join(f"{g.label} is {g.sm}" for g in bad) + f", this build has {have}")
        known = [g for g in vis.gpus if g.cc]
        unknown = [g for g in vis.gpus if not g.cc]
        if known:
            met.append(f"{_gpu_list(known)} in {have}")
        if unknown:
            met.append(f"GPU {','.join(str(g.index) for g in unknown)} compute capability unknown, not checked")
        if not vis.gpus:  # no NVML, no libcuda answer: let the image's own probe decide
            met.append("compute capability unknown, not checked")
    if vis.scope:
        met.append(vis.scope)
    return Verdict(True, "; ".join(met))


def _unmet_driver(backend: str, requires: dict, host: Host) -> str | None:
    """Why the driver side (libcuda, a device, the version range) rules this backend out."""
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


def _met(detail: str) -> str:
    return ", requirements met" + (f" ({detail})" if detail else "")


def select(manifest: dict, host: Host, override: str | None = None, source: str = "backend manifest") -> Choice:
    check_schema_version(manifest, source)
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
        v = check(override, backends[override], host)
        if not v.ok:
            raise UserError(f"backend {override!r} was asked for, but this host cannot run it: {v.detail}",
                            "drop the override to let selection fall back")
        why = f"{override}: asked for (override)" + (_met(v.detail) if v.detail else "")
        return Choice(override, backends[override]["image"], host.platform, (why,), (override,), host,
                      backends[override].get("smoke"), manifest.get("smoke"))
    reasons = []
    for name in order:
        v = check(name, backends[name], host)
        if not v.ok:
            reasons.append(f"{name}: skipped, {v.detail}")
            continue
        reasons.append(f"{name}: " + ("default" if name == entry.get("default") else "next in the fallback list")
                       + (_met(v.detail) if backends[name].get("requires") else ""))
        return Choice(name, backends[name]["image"], host.platform, tuple(reasons), tuple(order), host,
                      backends[name].get("smoke"), manifest.get("smoke"))
    raise UserError(f"no backend in {source} can run on this host: " + "; ".join(reasons),
                    "add a cpu backend to the fallback list, or update the driver / the GPUs made visible")
