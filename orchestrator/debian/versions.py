"""Debian version numbers compared as dpkg compares them (deb-version(7)): epoch, upstream, revision,
with `~` sorting before everything, even the end of the string."""

from __future__ import annotations

from functools import lru_cache

def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isascii() and c.isalpha():
        return ord(c)
    return ord(c) + 256


def _isdigit(c: str) -> bool:
    return "0" <= c <= "9"


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not _isdigit(a[i])) or (j < len(b) and not _isdigit(b[j])):
            ac = _order(a[i]) if i < len(a) and not _isdigit(a[i]) else 0
            bc = _order(b[j]) if j < len(b) and not _isdigit(b[j]) else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        first = 0
        while i < len(a) and _isdigit(a[i]) and j < len(b) and _isdigit(b[j]):
            if not first and a[i] != b[j]:
                first = -1 if a[i] < b[j] else 1
            i += 1
            j += 1
        if i < len(a) and _isdigit(a[i]):
            return 1
        if j < len(b) and _isdigit(b[j]):
            return -1
        if first:
            return first
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return int(epoch or 0), upstream, revision


@lru_cache(maxsize=65536)
def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version a sorts before, equal to or after b."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


def version_satisfies(version: str, op: str | None, wanted: str | None) -> bool:
    if op is None:
        return True
    c = compare_versions(version, wanted)
    return {"<<": c < 0, "<=": c <= 0, "=": c == 0, ">=": c >= 0, ">>": c > 0}[op]


class _VersionKey:
    """A sort key ordering Debian versions."""

    __slots__ = ("v",)

    def __init__(self, v: str):
        self.v = v

    def __lt__(self, other: "_VersionKey") -> bool:
        return compare_versions(self.v, other.v) < 0

    def __eq__(self, other) -> bool:
        return compare_versions(self.v, other.v) == 0
