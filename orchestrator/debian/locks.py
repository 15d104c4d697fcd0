"""The project's Debian system packages, locked per platform in locks/apt-<arch>/.

`system.txt` holds what the project level asks for (every service gets it),
`service-<name>.txt` what one service adds. Each is resolved
(orchestrator.debian.apt) against the base's own package list
(locks/base.json); a service's lock also counts the project-level pins as
installed, so nothing is shipped twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.common.errors import UserError
from orchestrator.debian import aptlock
from orchestrator.debian import archive
from orchestrator.debian import basepin
from orchestrator.project.lockfile import LOCK_DIR, Stale
from orchestrator.project.spec import Project


@dataclass(frozen=True)
class AptTarget:
    """One apt lock: the Debian packages one layer adds on one platform."""

    platform: str
    layer: str  # system (every service) | service-<name>
    requests: tuple[str, ...]  # as written: name or name=version

    def path(self, root: Path) -> Path:
        return aptlock.lock_path(root, self.platform, self.layer)


def apt_targets(project: Project) -> list[AptTarget]:
    """The apt locks the project needs: the project level first (service locks build on it), per platform
    any image is built for; a service's only where one of its backends builds."""
    built = [p for p in project.platforms if any(p in b.platforms for b in project.backends.values())]
    out = [AptTarget(p, "system", project.system_packages) for p in built if project.system_packages]
    for svc in project.services.values():
        if svc.system_packages:
            out += [AptTarget(p, f"service-{svc.name}", svc.system_packages) for p in built
                    if any(p in project.backends[b].platforms for b in svc.backends)]
    return out


def apt_sources(project: Project) -> tuple[archive.Source, ...]:
    """The Debian archive the base was bootstrapped from: its suite, -updates and -security."""
    return archive.default_sources(project.base.suite)


def base_packages(project: Project, platform: str) -> dict[str, str] | None:
    """The base's Debian packages (name -> version) from locks/base.json; None when it has no list."""
    pin = basepin.read_pins(project).get(platform)
    return aptlock.installed_from_base(pin.packages) if pin is not None and pin.packages else None


def _no_base_packages(project: Project, platform: str) -> UserError:
    pin = basepin.read_pins(project).get(platform)
    if pin is None:
        return UserError(f"system packages are resolved against the base's Debian packages, and "
                         f"{basepin.PIN_FILE} has no base pinned for {platform}",
                         "run `invoke engine.up` (it pins the base), then `invoke lock`")
    return UserError(f"the base for {platform} was pulled from {pin.pinned_in.split('@')[0]}, so "
                     f"{basepin.PIN_FILE} does not list its Debian packages, which system packages are resolved "
                     "against", "set base.bootstrap.when: always in the project file (a bootstrapped base records "
                     "its packages), run `invoke engine.up`, then `invoke lock`")


def apt_installed(project: Project, target: AptTarget, system: aptlock.AptLock | None) -> dict[str, str] | None:
    """What is installed below the target's layer: the base's packages, and for a service layer the
    project-level pins too (system: that platform's project-level lock). None: the base lists none."""
    installed = base_packages(project, target.platform)
    if installed is None:
        return None
    if target.layer != "system" and system is not None:
        installed = {**installed, **{p.name: p.version for p in system.pins}}
    return installed


def _apt_stale(target: AptTarget, lk, sources, installed) -> str | None:
    why = aptlock.stale_reason(lk, target.requests, sources, target.platform, installed)
    if why == "the base image's packages changed" and target.layer != "system":
        return "the packages below it changed: the base's, or the project-level system lock's"
    return why


def apt_check(project: Project) -> list[Stale]:
    """Every apt lock that is missing, edited or resolved from other inputs, with aptlock.stale_reason's words,
    and every apt lock file no target uses any more."""
    out: list[Stale] = []
    sources = apt_sources(project)
    system: dict[str, aptlock.AptLock | None] = {}
    for target in apt_targets(project):
        path = target.path(project.root)
        lk = aptlock.read_apt_lock(path)
        if target.layer == "system":
            system[target.platform] = lk
        rel = Path(os.path.relpath(path, project.root))
        installed = apt_installed(project, target, system.get(target.platform))
        if installed is None:
            out.append(Stale(rel, "cannot be checked: " + _no_base_packages(project, target.platform).message))
            continue
        why = _apt_stale(target, lk, sources, installed)
        if why is not None:
            out.append(Stale(rel, "missing" if lk is None and not path.exists() else why))
    wanted = {t.path(project.root) for t in apt_targets(project)}
    for path in sorted((project.root / LOCK_DIR).glob("apt-*/*.txt")):
        if path not in wanted:
            out.append(Stale(Path(os.path.relpath(path, project.root)), "no longer used by the project file"))
    return out


def resolve_apt(project: Project, upgrade: bool = False, log=print) -> list[Path]:
    """Resolve every stale apt lock (every one with upgrade), project level first; returns changed paths.

    A plain re-lock keeps the previous versions where the archive still
    offers them (adding a package moves nothing else); upgrade starts from
    scratch. An upgrade that moves no pin leaves the file alone, so the
    sources' dates in it do not churn.
    """
    changed: list[Path] = []
    sources = apt_sources(project)
    system: dict[str, aptlock.AptLock] = {}
    for target in apt_targets(project):
        path = target.path(project.root)
        rel = os.path.relpath(path, project.root)
        previous = aptlock.read_apt_lock(path)
        installed = apt_installed(project, target, system.get(target.platform))
        if installed is None:
            raise _no_base_packages(project, target.platform)
        why = _apt_stale(target, previous, sources, installed)
        if why is None and not upgrade:
            log(f"{rel}: up to date")
            if target.layer == "system" and previous is not None:
                system[target.platform] = previous
            continue
        why = "missing" if why and not path.exists() else why
        log(f"locking {rel} ({why or 'upgrade'}): {' '.join(target.requests)}")
        lk, res = aptlock.make_lock(target.requests, target.platform, installed, sources=sources,
                                suite=project.base.suite, previous=None if upgrade else previous, log=log)
        for note in res.notes:
            log(f"  note: {note}")
        log(f"  {len(lk.pins)} packages, {sum(p.size for p in lk.pins) / 1e6:.1f} MB of .debs")
        if target.layer == "system":
            system[target.platform] = lk
        if previous is not None and why is None and previous.pins == lk.pins:
            continue  # --upgrade moved nothing: keep the file (and its sources' dates) as it is
        path.parent.mkdir(parents=True, exist_ok=True)
        aptlock.write_apt_lock(path, lk)
        changed.append(path)
    return changed


def load_apt_locks(project: Project, platforms=None) -> dict[tuple[str, str], aptlock.AptLock]:
    """(platform, layer) -> the apt lock; raises naming a missing or hand-edited one."""
    out = {}
    for target in apt_targets(project):
        if platforms and target.platform not in platforms:
            continue
        path = target.path(project.root)
        lk = aptlock.read_apt_lock(path)
        if lk is None:
            why = "missing" if not path.exists() else "unreadable or edited by hand (its lock-sha256 does not match)"
            raise UserError(f"lock {os.path.relpath(path, project.root)} is {why}", "run `invoke lock`")
        out[(target.platform, target.layer)] = lk
    return out
