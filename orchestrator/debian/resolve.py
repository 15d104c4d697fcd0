"""Resolution (pure): requested Debian package names to the closure of what they need, pinned.

`resolve` takes a parsed `Index` (the Packages stanzas of every source for
one architecture), the packages already installed (the base image, name ->
version) and the requested names, and returns the closure of
Depends/Pre-Depends as sorted `AptPin`s. It works the way
`apt-get install --no-install-recommends` does for a fresh install:

* an alternative group `a | b` is satisfied by any alternative already
  installed or chosen; otherwise the first alternative that can be
  satisfied is taken (a real package before the providers of a virtual);
* a real package's candidate is its highest version across all sources
  that meets the constraint (security and -updates win over the release);
* a virtual package is satisfied by a provider, versioned Provides only for
  versioned relations; with several providers the one with the highest
  Priority, then the first by name, is taken (deterministic);
* `:any`/`:native` qualifiers are dropped: one architecture is resolved;
* Recommends and Suggests are not followed, Essential packages are assumed
  to be in the base (Debian packages do not declare them).

Why not apt itself: ARCHITECTURE.md ("Debian packages").
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from orchestrator.common.errors import UserError
from orchestrator.debian.packages import NAME_RE, PRIORITY_RANK, Index, Package, Relation
from orchestrator.debian.versions import version_satisfies

@dataclass(frozen=True)
class AptPin:
    """One locked .deb: what the lock line says."""

    name: str
    version: str
    architecture: str  # amd64 | arm64 | all
    sha256: str
    size: int
    url: str  # archive URL + pool path

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def line(self) -> str:
        return f"{self.name}={self.version} {self.architecture} {self.sha256} {self.size} {self.url}"

    @classmethod
    def from_package(cls, p: Package) -> "AptPin":
        return cls(p.name, p.version, p.architecture, p.sha256, p.size, p.url)


@dataclass(frozen=True)
class Resolution:
    pins: tuple[AptPin, ...]  # sorted by name
    notes: tuple[str, ...] = ()  # what a user may want to know: base packages upgraded, requests already in the base
    why: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # (package, the chain that pulled it in)


def parse_request(req: str) -> Relation:
    """`ffmpeg` or `ffmpeg=7:5.1.6-0+deb12u1` (apt's spelling of an exact version)."""
    name, sep, version = req.strip().partition("=")
    name = name.strip()
    if not NAME_RE.match(name):
        raise UserError(f"system package {req!r} is not a Debian package name",
                        "use the binary package name as `apt-get install` takes it, e.g. ffmpeg or libsndfile1")
    return Relation(name, "=", version.strip()) if sep else Relation(name)


def _where(suite: str, platform: str) -> str:
    return f"Debian {suite} for {platform}"


def resolve(index: Index, requests: Iterable[str], installed: Mapping[str, str], *, suite: str,
            platform: str, prefer: Mapping[str, str] | None = None) -> Resolution:
    """The packages to add to an image holding `installed` (name -> version) so that `requests` work.

    Packages already installed at a version that satisfies a relation are not
    pinned; one whose installed version is too old is pinned at a newer one
    (it replaces the base's files in the layer), and a note says so.
    prefer (name -> version, the previous lock): kept where the archive still
    offers it and it satisfies, so adding a package moves nothing else.
    """
    r = _Resolver(index, installed, suite, platform, prefer or {})
    for req in sorted(set(requests)):
        r.request(parse_request(req))
    r.follow()
    pins = tuple(AptPin.from_package(r.chosen[n]) for n in sorted(r.chosen))
    return Resolution(pins, tuple(r.notes), tuple(sorted(r.why.items())))


def _provides_ok(rel: Relation, provided: Relation) -> bool:
    """A Provides entry satisfies rel: any for an unversioned relation, a versioned `=` one for a versioned."""
    if rel.op is None:
        return True
    return provided.op == "=" and version_satisfies(provided.version, rel.op, rel.version)


class _Resolver:
    """One resolution's state: what is chosen so far, why, and the queue of packages whose relations to follow."""

    def __init__(self, index: Index, installed: Mapping[str, str], suite: str, platform: str,
                 prefer: Mapping[str, str]):
        self.index, self.installed, self.suite, self.platform, self.prefer = index, installed, suite, platform, prefer
        self.chosen: dict[str, Package] = {}
        self.why: dict[str, str] = {}
        self.notes: list[str] = []
        self.queue: deque[Package] = deque()
        self.installed_provides: dict[str, list[tuple[str, Relation]]] = {}
        for name, version in sorted(installed.items()):
            # The base's Provides come from the index entry of its exact version (the
            # newest one when the archive has moved on: Provides rarely change).
            entry = index.get(name, version) or next(iter(index.versions(name)), None)
            if entry is not None:
                for rel in entry.provided():
                    self.installed_provides.setdefault(rel.name, []).append((name, rel))

    def satisfied(self, rel: Relation) -> bool:
        p = self.chosen.get(rel.name)
        if p is not None and version_satisfies(p.version, rel.op, rel.version):
            return True
        if rel.name in self.installed and rel.name not in self.chosen and \
                version_satisfies(self.installed[rel.name], rel.op, rel.version):
            return True
        if any(_provides_ok(rel, prov) for _, prov in self.installed_provides.get(rel.name, ())):
            return True
        return any(_provides_ok(rel, prov) for p, prov in self.index.providers(rel.name)
                   if self.chosen.get(p.name) is p)

    def best(self, rel: Relation) -> Package | None:
        kept = self.index.get(rel.name, self.prefer[rel.name]) if rel.name in self.prefer else None
        if kept is not None and version_satisfies(kept.version, rel.op, rel.version):
            return kept
        return next((p for p in self.index.versions(rel.name) if version_satisfies(p.version, rel.op, rel.version)),
                    None)

    def candidate(self, rel: Relation) -> Package | None:
        if rel.name in self.chosen:
            return None  # a version is already taken: another one cannot be installed beside it
        p = self.best(rel)
        if p is not None:
            return p
        providers = [(p, prov) for p, prov in self.index.providers(rel.name) if _provides_ok(rel, prov)
                     and (p.name not in self.chosen or self.chosen[p.name] is p)
                     and p is self.index.versions(p.name)[0]]  # a provider's candidate is its newest version
        providers.sort(key=lambda pp: (PRIORITY_RANK.get(pp[0].priority, 5), pp[0].name))
        return providers[0][0] if providers else None

    def take(self, p: Package, chain: str) -> None:
        self.chosen[p.name] = p
        self.why[p.name] = chain
        if p.name in self.installed:
            self.notes.append(f"{p.name} {p.version} replaces the base's {self.installed[p.name]} ({chain} needs it)")
        self.queue.append(p)

    def request(self, rel: Relation) -> None:
        """One name the project file asks for."""
        if rel.name in self.installed and version_satisfies(self.installed[rel.name], rel.op, rel.version):
            self.notes.append(f"{rel.name} is already in the base image ({self.installed[rel.name]})")
            return
        if rel.name in self.chosen:
            return
        found = self.best(rel)
        if found is not None:
            self.take(found, rel.name)
            return
        _raise_unknown(self.index, rel, self.suite, self.platform)
        if self.satisfied(rel):  # a virtual name the base or an earlier request already provides
            return
        providers = sorted({p.name for p, prov in self.index.providers(rel.name)})
        if len(providers) > 1:
            raise UserError(f"system package {rel.name!r} is virtual in {_where(self.suite, self.platform)}: "
                            f"{', '.join(providers)} provide it",
                            f"name the one to install instead of {rel.name}")
        self.take(self.index.versions(providers[0])[0], rel.name)

    def follow(self) -> None:
        """Every chosen package's Pre-Depends and Depends, until nothing new is needed."""
        while self.queue:
            pkg = self.queue.popleft()
            chain = self.why[pkg.name]
            for group in pkg.relations():
                if any(self.satisfied(rel) for rel in group):
                    continue
                for rel in group:
                    p = self.candidate(rel)
                    if p is not None:
                        self.take(p, f"{chain} -> {p.name}")
                        break
                else:
                    raise UserError(
                        f"cannot install system packages for {self.platform}: {pkg.name} {pkg.version} needs "
                        f"{' | '.join(map(str, group))}, which {_where(self.suite, self.platform)} cannot satisfy "
                        f"({_offered(self.index, group, self.chosen, self.installed)}); pulled in by {chain}",
                        "drop or change the package that needs it, or add the source that has it "
                        "(e.g. the -updates or -security archive)")


def _offered(index: Index, group: tuple[Relation, ...], chosen: Mapping[str, Package],
             installed: Mapping[str, str]) -> str:
    out = []
    for rel in group:
        have = chosen[rel.name].version if rel.name in chosen else installed.get(rel.name)
        offered = [p.version for p in index.versions(rel.name)]
        where = f"{rel.name}: " + (f"{have} already chosen/installed, " if have else "")
        out.append(where + (f"offers {', '.join(offered)}" if offered else "not in the archive"))
    return "; ".join(out)


def _raise_unknown(index: Index, rel: Relation, suite: str, platform: str) -> None:
    if rel.name not in index and not index.providers(rel.name):
        raise UserError(f"system package {rel.name!r} is not available in {_where(suite, platform)}",
                        f"check the name (https://packages.debian.org/{suite}/{rel.name}): some packages exist "
                        "on other architectures only, or under another name; remove it for this platform")
    if rel.op is not None and not index.versions(rel.name):
        raise UserError(f"system package {rel.name!r} is virtual in {_where(suite, platform)} and cannot be "
                        "pinned to a version", "request it without a version")
    if rel.op is not None:
        offered = ", ".join(p.version for p in index.versions(rel.name))
        raise UserError(f"system package {rel.name} {rel.version} is not available in {_where(suite, platform)} "
                        f"(offered: {offered})", f"request one of the offered versions, or just {rel.name}")
