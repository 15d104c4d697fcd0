"""A Packages index: its stanzas, their relations (Depends, Pre-Depends, Provides), and `Index`,
every version each source offers for one architecture, highest first."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator

from orchestrator.debian.versions import _VersionKey

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1


@dataclass(frozen=True)
class Relation:
    name: str
    op: str | None = None  # << <= = >= >>
    version: str | None = None

    def __str__(self) -> str:
        return self.name if self.op is None else f"{self.name} ({self.op} {self.version})"


_REL_RE = re.compile(r"^\s*([a-z0-9][a-z0-9+.\-]*)(?::[a-z0-9-]+)?\s*"
                     r"(?:\(\s*(<<|<=|=|>=|>>|<|>)\s*([^)\s]+)\s*\))?\s*(?:\[[^\]]*\])?\s*(?:<[^>]*>\s*)*$")


_OLD_OPS = {"<": "<=", ">": ">="}  # obsolete spellings, still legal


@lru_cache(maxsize=65536)
def parse_relations(text: str) -> tuple[tuple[Relation, ...], ...]:
    """`a (>= 1) | b, c:any` -> ((a>=1, b), (c,)): an AND of OR groups. Arch qualifiers are dropped."""
    groups = []
    for group in text.split(","):
        if not group.strip():
            continue
        alts = []
        for alt in group.split("|"):
            m = _REL_RE.match(alt)
            if not m:
                raise ValueError(f"unparsable relation {alt.strip()!r}")
            op = _OLD_OPS.get(m.group(2), m.group(2))
            alts.append(Relation(m.group(1), op, m.group(3)))
        groups.append(tuple(alts))
    return tuple(groups)


PRIORITY_RANK = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}


@dataclass(frozen=True)
class Package:
    """One stanza of a Packages index (the fields resolution and pinning need)."""

    name: str
    version: str
    architecture: str
    filename: str  # pool path, relative to archive
    size: int
    sha256: str
    depends: str = ""
    pre_depends: str = ""
    provides: str = ""
    priority: str = "optional"
    essential: bool = False
    archive: str = ""  # the source's URL: where `filename` is

    @property
    def url(self) -> str:
        return f"{self.archive.rstrip('/')}/{self.filename}"

    def relations(self) -> tuple[tuple[Relation, ...], ...]:
        return parse_relations(self.pre_depends) + parse_relations(self.depends)

    def provided(self) -> tuple[Relation, ...]:
        return tuple(g[0] for g in parse_relations(self.provides))


_WANTED = {"Package", "Version", "Architecture", "Filename", "Size", "SHA256", "Depends", "Pre-Depends",
           "Provides", "Priority", "Essential"}


def paragraphs(text: str) -> Iterator[dict[str, str]]:
    """deb822 stanzas as {field: value}; continuation lines are joined (only Description has them here)."""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for line in block.split("\n"):
            if not line or line.startswith("#"):
                continue
            if line[0] in " \t":
                if last is not None:
                    fields[last] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            last = key
            fields[key] = value.strip()
        if fields:
            yield fields


def parse_packages(text: str, archive: str = "") -> list[Package]:
    """The stanzas of a Packages file (archive: the URL its Filename fields are relative to)."""
    out = []
    for block in text.split("\n\n"):
        f: dict[str, str] = {}
        for line in block.split("\n"):
            if line and line[0] not in " \t#":
                key, _, value = line.partition(":")
                if key in _WANTED:
                    f[key] = value.strip()
        if "Package" not in f:
            continue
        out.append(Package(f["Package"], f["Version"], f.get("Architecture", ""), f.get("Filename", ""),
                           int(f.get("Size", 0)), f.get("SHA256", ""), f.get("Depends", ""),
                           f.get("Pre-Depends", ""), f.get("Provides", ""), f.get("Priority", "optional"),
                           f.get("Essential", "") == "yes", archive))
    return out


class Index:
    """Every package version the sources offer for one architecture."""

    def __init__(self, packages: Iterable[Package]):
        by_name: dict[str, dict[str, Package]] = {}
        for p in packages:
            by_name.setdefault(p.name, {}).setdefault(p.version, p)  # the first source listing a version wins
        self._by_name = {n: sorted(vs.values(), key=lambda p: _VersionKey(p.version), reverse=True)
                         for n, vs in by_name.items()}
        self._providers: dict[str, list[tuple[Package, Relation]]] = {}
        for versions in self._by_name.values():
            for p in versions:
                if p.provides:
                    for rel in p.provided():
                        self._providers.setdefault(rel.name, []).append((p, rel))

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())

    def names(self) -> list[str]:
        return list(self._by_name)

    def versions(self, name: str) -> list[Package]:
        """The versions of a real package, highest first."""
        return self._by_name.get(name, [])

    def get(self, name: str, version: str) -> Package | None:
        return next((p for p in self.versions(name) if p.version == version), None)

    def providers(self, name: str) -> list[tuple[Package, Relation]]:
        """(package, the Provides entry) for a virtual name."""
        return self._providers.get(name, [])
