"""Debian system packages: resolve names to pinned .debs, and the apt lock.

Resolution is pure: `resolve` takes a parsed `Index` (the Packages stanzas
of every source for one architecture), the packages already installed (the
base image, name -> version) and the requested names, and returns the
closure of Depends/Pre-Depends as sorted `AptPin`s. It works the way
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

The thin effectful part, `fetch_index`, downloads InRelease (checked with
gpgv against the Debian keyring where both exist), then each Packages.xz by
hash, checked against the SHA256 list of the signed Release; everything it
downloads is cached by sha256 under `<cache>/apt/sha256/`.

The lock is text, one line per package (`name=version arch sha256 size url`)
under a header holding the hash of the inputs (so `lock --check` needs no
network) and the snapshot of every source (Release date and hash).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from orchestrator.common import hostinfo, places
from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import atomic_write, sha256_file

APT_LOCK_FORMAT = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1
DEBIAN_ARCHES = {"amd64": "amd64", "arm64": "arm64"}  # platform arch -> Debian architecture


# --- versions (dpkg's algorithm, deb-version(7)) ----------------------------

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


# --- relations (Depends, Pre-Depends, Provides) -----------------------------

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


# --- the Packages index -----------------------------------------------------

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


# --- resolution (pure) ------------------------------------------------------

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
    prefer = prefer or {}
    chosen: dict[str, Package] = {}
    why: dict[str, str] = {}
    notes: list[str] = []
    installed_provides: dict[str, list[tuple[str, Relation]]] = {}
    for name, version in sorted(installed.items()):
        # The base's Provides come from the index entry of its exact version (the
        # newest one when the archive has moved on: Provides rarely change).
        entry = index.get(name, version) or next(iter(index.versions(name)), None)
        if entry is not None:
            for rel in entry.provided():
                installed_provides.setdefault(rel.name, []).append((name, rel))

    def provides_ok(rel: Relation, provided: Relation) -> bool:
        if rel.op is None:
            return True
        return provided.op == "=" and version_satisfies(provided.version, rel.op, rel.version)

    def satisfied(rel: Relation) -> bool:
        p = chosen.get(rel.name)
        if p is not None and version_satisfies(p.version, rel.op, rel.version):
            return True
        if rel.name in installed and rel.name not in chosen and \
                version_satisfies(installed[rel.name], rel.op, rel.version):
            return True
        if any(provides_ok(rel, prov) for _, prov in installed_provides.get(rel.name, ())):
            return True
        return any(provides_ok(rel, prov) for p, prov in index.providers(rel.name)
                   if chosen.get(p.name) is p)

    def best(rel: Relation) -> Package | None:
        kept = index.get(rel.name, prefer[rel.name]) if rel.name in prefer else None
        if kept is not None and version_satisfies(kept.version, rel.op, rel.version):
            return kept
        return next((p for p in index.versions(rel.name) if version_satisfies(p.version, rel.op, rel.version)), None)

    def candidate(rel: Relation) -> Package | None:
        if rel.name in chosen:
            return None  # a version is already taken: another one cannot be installed beside it
        p = best(rel)
        if p is not None:
            return p
        providers = [(p, prov) for p, prov in index.providers(rel.name) if provides_ok(rel, prov)
                     and (p.name not in chosen or chosen[p.name] is p)
                     and p is index.versions(p.name)[0]]  # a provider's candidate is its newest version
        providers.sort(key=lambda pp: (PRIORITY_RANK.get(pp[0].priority, 5), pp[0].name))
        return providers[0][0] if providers else None

    def take(p: Package, chain: str) -> None:
        chosen[p.name] = p
        why[p.name] = chain
        if p.name in installed:
            notes.append(f"{p.name} {p.version} replaces the base's {installed[p.name]} ({chain} needs it)")
        queue.append(p)

    queue: deque[Package] = deque()
    for req in sorted(set(requests)):
        rel = parse_request(req)
        if rel.name in installed and version_satisfies(installed[rel.name], rel.op, rel.version):
            notes.append(f"{rel.name} is already in the base image ({installed[rel.name]})")
            continue
        if rel.name in chosen:
            continue
        found = best(rel)
        if found is not None:
            take(found, rel.name)
            continue
        _raise_unknown(index, rel, suite, platform)
        if satisfied(rel):  # a virtual name the base or an earlier request already provides
            continue
        providers = sorted({p.name for p, prov in index.providers(rel.name)})
        if len(providers) > 1:
            raise UserError(f"system package {rel.name!r} is virtual in {_where(suite, platform)}: "
                            f"{', '.join(providers)} provide it",
                            f"name the one to install instead of {rel.name}")
        take(index.versions(providers[0])[0], rel.name)

    while queue:
        pkg = queue.popleft()
        chain = why[pkg.name]
        for group in pkg.relations():
            if any(satisfied(rel) for rel in group):
                continue
            for rel in group:
                p = candidate(rel)
                if p is not None:
                    take(p, f"{chain} -> {p.name}")
                    break
            else:
                raise UserError(
                    f"cannot install system packages for {platform}: {pkg.name} {pkg.version} needs "
                    f"{' | '.join(map(str, group))}, which {_where(suite, platform)} cannot satisfy "
                    f"({_offered(index, group, chosen, installed)}); pulled in by {chain}",
                    "drop or change the package that needs it, or add the source that has it "
                    "(e.g. the -updates or -security archive)")
    pins = tuple(AptPin.from_package(chosen[n]) for n in sorted(chosen))
    return Resolution(pins, tuple(notes), tuple(sorted(why.items())))


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


# --- sources and fetching the indexes (effects) -----------------------------

@dataclass(frozen=True)
class Source:
    """One `deb URL SUITE COMPONENTS` line."""

    url: str
    suite: str
    components: tuple[str, ...] = ("main",)

    def __str__(self) -> str:
        return f"{self.url.rstrip('/')} {self.suite} {' '.join(self.components)}"


def default_sources(suite: str = "bookworm", mirror: str = DEFAULT_MIRROR,
                    security: str = DEFAULT_SECURITY, components: tuple[str, ...] = ("main",)) -> tuple[Source, ...]:
    """The release, its -updates and its security archive: what a Debian image's sources.list has."""
    return (Source(mirror, suite, components), Source(mirror, f"{suite}-updates", components),
            Source(security, f"{suite}-security", components))


@dataclass(frozen=True)
class Snapshot:
    """What one source said when it was resolved: the lock records it."""

    source: Source
    date: str  # the Release file's Date
    release_sha256: str  # of the InRelease file
    signature: str  # "gpgv <fingerprints>" or "not verified: <why>"

    def line(self) -> str:
        return f"{self.source} date={self.date!r} inrelease-sha256={self.release_sha256} signature={self.signature!r}"


def cache_root() -> Path:
    return places.cache_root("apt")


def ca_verify() -> str | bool:
    return hostinfo.ca_bundle() or True  # True: requests' own bundle


class Downloader:
    """HTTP GETs (the system CA bundle, a session per thread), and a cache of files by sha256."""

    # A name-resolution or connection blip lasts seconds: 5 tries, 2+4+8+16 s apart (30 s in all).
    def __init__(self, cache_dir: Path | None = None, session=None, retries: int = 5, timeout: float = 60,
                 backoff: float = 2.0):
        self.cache = (cache_dir or cache_root()) / "sha256"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._session = session  # a given session is used as is (tests); otherwise one per thread
        self._local = threading.local()
        self._lock = threading.Lock()
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.downloaded = 0  # bytes fetched from the network (not the cache)

    @property
    def session(self):
        if self._session is not None:
            return self._session
        s = getattr(self._local, "session", None)
        if s is None:
            import requests

            s = self._local.session = requests.Session()
            s.verify = ca_verify()
            s.headers["User-Agent"] = "orchestrator-apt/1"
        return s

    def get(self, url: str, missing_ok: bool = False) -> bytes | None:
        import requests

        for attempt in range(self.retries):
            try:
                r = self.session.get(url, timeout=self.timeout)
            except requests.RequestException as e:
                if attempt + 1 == self.retries:
                    raise EnvironmentProblem(f"cannot download {url}: {type(e).__name__}: {e}",
                                             "check the network, proxy and CA bundle (SSL_CERT_FILE), or point "
                                             "the sources at a reachable mirror") from None
                time.sleep(self.backoff * 2 ** attempt)
                continue
            if r.status_code == 404 and missing_ok:
                return None
            if r.status_code >= 500 and attempt + 1 < self.retries:
                time.sleep(1 + attempt)
                continue
            if r.status_code != 200:
                raise EnvironmentProblem(f"cannot download {url}: HTTP {r.status_code}",
                                         "check the sources (URL, suite, component) and the mirror")
            with self._lock:
                self.downloaded += len(r.content)
            return r.content
        raise AssertionError("unreachable")

    def cached(self, sha256: str) -> Path:
        return self.cache / sha256

    def fetch(self, urls: Iterable[str], sha256: str, size: int | None, what: str, fix: str,
              missing: str | None = None) -> Path:
        """The file with this sha256, from the cache or the first URL that serves it; verified either way.

        fix: what to do when a mirror serves other bytes; missing: when no URL has the file.
        """
        path = self.cached(sha256)
        if path.is_file() and (size is None or path.stat().st_size == size) and sha256_file(path) == sha256:
            return path
        urls = list(urls)
        problem = None
        for url in urls:
            data = self.get(url, missing_ok=True)
            if data is None:
                continue
            if size is not None and len(data) != size:
                problem = (f"{what}: size mismatch (expected {size}, got {len(data)}): {fix}", url)
                continue
            got = hashlib.sha256(data).hexdigest()
            if got != sha256:
                problem = (f"{what}: sha256 mismatch (expected {sha256}, got {got}): {fix}", url)
                continue
            atomic_write(path, data)
            return path
        if problem:
            raise EnvironmentProblem(problem[0], f"downloaded from {problem[1]}")
        raise EnvironmentProblem(f"{what}: not found at {', '.join(urls)}", missing or fix)


@dataclass(frozen=True)
class Release:
    fields: dict
    sha256: dict  # path -> (hash, size)


def parse_release(text: str) -> Release:
    fields = next(paragraphs(text), {})
    sums = {}
    for line in fields.get("SHA256", "").splitlines():
        parts = line.split()
        if len(parts) == 3:
            sums[parts[2]] = (parts[0], int(parts[1]))
    return Release(fields, sums)


def _clearsigned_body(text: str) -> str:
    """The signed text of an InRelease file, without checking the signature."""
    head, sep, rest = text.partition("\n\n")
    if not text.startswith("-----BEGIN PGP SIGNED MESSAGE-----") or not sep:
        return text
    body = rest.split("\n-----BEGIN PGP SIGNATURE-----", 1)[0]
    return "\n".join(line[2:] if line.startswith("- ") else line for line in body.split("\n")) + "\n"


def verify_inrelease(data: bytes, keyring: str | None, url: str) -> tuple[str, str]:
    """(the signed Release text, a description of the signature check)."""
    text = data.decode("utf-8", "replace")
    gpgv = shutil.which("gpgv")
    if not keyring or not Path(keyring).is_file() or not gpgv:
        missing = "gpgv is not installed" if not gpgv else f"no keyring at {keyring}"
        return _clearsigned_body(text), f"not verified: {missing}"
    with tempfile.TemporaryDirectory(prefix="orch-gpgv-") as tmp:
        src, out = Path(tmp) / "InRelease", Path(tmp) / "Release"
        src.write_bytes(data)
        proc = subprocess.run([gpgv, "--keyring", keyring, "--status-fd", "1", "--output", str(out), str(src)],
                              capture_output=True, text=True)
        status = proc.stdout
        valid = sorted({line.split()[2] for line in status.splitlines() if line.startswith("[GNUPG:] VALIDSIG")})
        if not valid or "[GNUPG:] BADSIG" in status:
            raise EnvironmentProblem(f"{url}: the signature does not verify against {keyring}:\n"
                                     + (proc.stderr.strip()[-800:] or status[-800:]),
                                     "the mirror or a proxy changed the index; use another mirror, or update "
                                     "debian-archive-keyring if the archive rotated its keys")
        return out.read_text(), "gpgv " + ",".join(valid)


def _packages_entry(rel: Release, component: str, arch: str) -> tuple[str, str, int]:
    base = f"{component}/binary-{arch}/Packages"
    for ext in (".xz", ".gz", ""):
        if base + ext in rel.sha256:
            return (base + ext, *rel.sha256[base + ext])
    return ("", "", 0)


def _decompress(name: str, data: bytes) -> bytes:
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def fetch_index(sources: Iterable[Source], platform: str, *, cache_dir: Path | None = None,
                keyring: str | None = DEFAULT_KEYRING, downloader: Downloader | None = None,
                log: Callable[[str], None] | None = None) -> tuple[Index, tuple[Snapshot, ...]]:
    """Download (or reuse) every source's Packages index for the platform; verified and parsed."""
    arch = debian_arch(platform)
    dl = downloader or Downloader(cache_dir)
    packages: list[Package] = []
    snapshots = []
    for src in sources:
        base = src.url.rstrip("/")
        url = f"{base}/dists/{src.suite}/InRelease"
        raw = dl.get(url)
        text, signature = verify_inrelease(raw, keyring, url)
        rel = parse_release(text)
        names = {rel.fields.get("Suite"), rel.fields.get("Codename")}
        if src.suite not in names:
            raise UserError(f"{url} is for {' / '.join(sorted(n for n in names if n))}, not {src.suite}",
                            "check the suite in the sources")
        _check_valid_until(rel, url)
        for comp in src.components:
            name, sha, size = _packages_entry(rel, comp, arch)
            if not name:
                offered = rel.fields.get("Architectures", "?")
                raise UserError(f"{src}: no {comp} packages for {platform} (the archive has: {offered})",
                                "remove the platform or the component, or use a source that has it")
            urls = [f"{base}/dists/{src.suite}/{name}"]
            if rel.fields.get("Acquire-By-Hash") == "yes":
                # By hash: the file cannot change between reading InRelease and fetching it.
                urls.insert(0, f"{base}/dists/{src.suite}/{name.rsplit('/', 1)[0]}/by-hash/SHA256/{sha}")
            path = dl.fetch(urls, sha, size, f"{src} {name}", "the mirror does not match its signed Release "
                            "file (it may be updating); re-run, or use another mirror")
            packages += _parse_cached(path, name, base)
        snapshots.append(Snapshot(src, rel.fields.get("Date", "?"), hashlib.sha256(raw).hexdigest(), signature))
        if log:
            log(f"[apt] {src}: {rel.fields.get('Date', '?')} ({signature})")
    return Index(packages), tuple(snapshots)


def _parse_cached(path: Path, name: str, archive: str) -> list[Package]:
    # Parsing a 9 MB Packages.xz takes seconds; the parsed stanzas are kept next
    # to it, keyed by the same (verified) sha256 and the parser's format.
    parsed = path.with_name(path.name + ".parsed-v1.json")
    try:
        rows = json.loads(parsed.read_text())
        return [Package(*row[:-1], archive=archive) for row in rows]
    except (OSError, ValueError, TypeError):
        pass
    pkgs = parse_packages(_decompress(name, path.read_bytes()).decode("utf-8", "replace"), archive)
    atomic_write(parsed, json.dumps([[p.name, p.version, p.architecture, p.filename, p.size, p.sha256, p.depends,
                                      p.pre_depends, p.provides, p.priority, p.essential, ""] for p in pkgs]))
    return pkgs


def _check_valid_until(rel: Release, url: str) -> None:
    until = rel.fields.get("Valid-Until")
    if not until or "snapshot.debian.org" in url:  # snapshots are old on purpose (apt: Check-Valid-Until=no)
        return
    try:
        expired = parsedate_to_datetime(until).timestamp() < time.time()
    except (TypeError, ValueError):
        return
    if expired:
        raise EnvironmentProblem(f"{url} expired at {until}: the mirror serves a stale index",
                                 "use another mirror, or check this machine's clock")


def debian_arch(platform: str) -> str:
    arch = platform.split("/")[1] if "/" in platform else platform
    if arch not in DEBIAN_ARCHES:
        raise UserError(f"system packages are not supported for platform {platform}",
                        f"use one of {', '.join('linux/' + a for a in DEBIAN_ARCHES)}")
    return DEBIAN_ARCHES[arch]


# --- the lock ---------------------------------------------------------------

@dataclass(frozen=True)
class AptLock:
    suite: str
    platform: str
    inputs_hash: str
    requests: tuple[str, ...]
    snapshots: tuple[Snapshot, ...]
    pins: tuple[AptPin, ...]

    def body(self) -> str:
        return "".join(p.line() + "\n" for p in self.pins)

    def sources_text(self) -> str:
        return "".join(f"# source: {s.line()}\n" for s in self.snapshots)

    def text(self) -> str:
        return (f"# orchestrator apt lock v{APT_LOCK_FORMAT}: suite={self.suite} platform={self.platform}\n"
                f"# inputs-sha256: {self.inputs_hash}\n"
                f"# lock-sha256: {_body_hash(self.sources_text() + self.body())}\n"
                f"# requests: {' '.join(self.requests)}\n"
                + self.sources_text()
                + "# Generated by `invoke lock`; do not edit. Each .deb is checked by size and sha256, "
                  "then unpacked without maintainer scripts.\n"
                + "# name=version architecture sha256 size url\n"
                + self.body())

    def names(self) -> set[str]:
        return {p.name for p in self.pins}


def _body_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def apt_inputs_hash(requests: Iterable[str], sources: Iterable[Source], platform: str,
                    installed: Mapping[str, str]) -> str:
    """What a resolution depends on: the requests, the sources, the platform and what is installed below."""
    return hashlib.sha256(json.dumps({
        "format": APT_LOCK_FORMAT,
        "platform": platform,
        "requests": sorted(set(r.strip() for r in requests)),
        "sources": [str(s) for s in sources],
        "installed": sorted(f"{n}={v}" for n, v in installed.items()),
    }, sort_keys=True).encode()).hexdigest()


_HEADER_RE = re.compile(
    r"^# orchestrator apt lock v(\d+): suite=(\S+) platform=(\S+)\n# inputs-sha256: ([0-9a-f]{64})\n"
    r"# lock-sha256: ([0-9a-f]{64})\n# requests: ?(.*)\n")
_SOURCE_RE = re.compile(r"^# source: (\S+) (\S+) ([^=]+?) date=('[^']*'|\"[^\"]*\") inrelease-sha256=([0-9a-f]{64}) "
                        r"signature=('[^']*'|\"[^\"]*\")$")
_PIN_RE = re.compile(r"^([a-z0-9][a-z0-9+.-]+)=(\S+) (\S+) ([0-9a-f]{64}) (\d+) (\S+)$")


def parse_apt_lock(text: str) -> AptLock | None:
    """The lock in text, or None when it is malformed or was edited by hand."""
    m = _HEADER_RE.match(text)
    if not m or int(m.group(1)) != APT_LOCK_FORMAT:
        return None
    snapshots, pins = [], []
    for line in text.splitlines():
        if line.startswith("# source: "):
            s = _SOURCE_RE.match(line)
            if not s:
                return None
            snapshots.append(Snapshot(Source(s.group(1), s.group(2), tuple(s.group(3).split())), s.group(4)[1:-1],
                                      s.group(5), s.group(6)[1:-1]))
        elif line and not line.startswith("#"):
            p = _PIN_RE.match(line)
            if not p:
                return None
            pins.append(AptPin(p.group(1), p.group(2), p.group(3), p.group(4), int(p.group(5)), p.group(6)))
    lk = AptLock(m.group(2), m.group(3), m.group(4), tuple(m.group(6).split()), tuple(snapshots), tuple(pins))
    return lk if _body_hash(lk.sources_text() + lk.body()) == m.group(5) else None


def read_apt_lock(path: Path) -> AptLock | None:
    try:
        return parse_apt_lock(Path(path).read_text())
    except (OSError, UnicodeDecodeError):
        return None


def write_apt_lock(path: Path, lk: AptLock) -> None:
    atomic_write(Path(path), lk.text())


def lock_path(root: Path, platform: str, layer: str = "system") -> Path:
    """locks/apt-<arch>/<layer>.txt, next to the Python locks."""
    return Path(root) / "locks" / f"apt-{debian_arch(platform)}" / f"{layer}.txt"


def stale_reason(lk: AptLock | None, requests: Iterable[str], sources: Iterable[Source], platform: str,
                 installed: Mapping[str, str]) -> str | None:
    """Why the lock must be resolved again, or None when it is current (no network)."""
    if lk is None:
        return "missing or edited by hand"
    if lk.platform != platform:
        return f"locked for {lk.platform}, not {platform}"
    if lk.inputs_hash == apt_inputs_hash(requests, sources, platform, installed):
        return None
    want = set(r.strip() for r in requests)
    have = set(lk.requests)
    if want != have:
        added, removed = sorted(want - have), sorted(have - want)
        return "requests changed: " + ", ".join(
            [f"+{r}" for r in added] + [f"-{r}" for r in removed])
    if [str(s) for s in sources] != [str(s.source) for s in lk.snapshots]:
        return "sources changed"
    return "the base image's packages changed"


def make_lock(requests: Iterable[str], platform: str, installed: Mapping[str, str], *,
              sources: tuple[Source, ...] | None = None, suite: str = "bookworm",
              cache_dir: Path | None = None, keyring: str | None = DEFAULT_KEYRING,
              previous: AptLock | None = None,
              log: Callable[[str], None] | None = None) -> tuple[AptLock, Resolution]:
    """Fetch the indexes and resolve: what `invoke lock` runs per platform for a stale lock.

    previous: the stale lock, whose versions are kept where still offered
    (`invoke lock`); None moves everything to the newest (`--upgrade`).
    """
    requests = tuple(sorted(set(r.strip() for r in requests)))
    sources = sources or default_sources(suite)
    index, snaps = fetch_index(sources, platform, cache_dir=cache_dir, keyring=keyring, log=log)
    prefer = {p.name: p.version for p in previous.pins} if previous is not None else None
    res = resolve(index, requests, installed, suite=suite, platform=platform, prefer=prefer)
    return AptLock(suite, platform, apt_inputs_hash(requests, sources, platform, installed), requests, snaps,
                   res.pins), res


def installed_from_base(entries: Iterable[str]) -> dict[str, str]:
    """locks/base.json's `packages` list (name=version) as a mapping."""
    out = {}
    for e in entries:
        name, _, version = e.partition("=")
        out[name.split(":")[0]] = version
    return out
