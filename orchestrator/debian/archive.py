"""The Debian archive (effects): its sources, downloads, and the signed indexes.

`fetch_index` downloads InRelease (checked with gpgv against the Debian
keyring where both exist), then each Packages.xz by hash, checked against
the SHA256 list of the signed Release; everything it downloads is cached by
sha256 under `<cache>/apt/sha256/`. `Downloader` fetches .debs the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Iterable

from orchestrator.common import hostinfo, places
from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import atomic_write, sha256_file
from orchestrator.debian.packages import Index, Package, paragraphs, parse_packages

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEBIAN_ARCHES = {"amd64": "amd64", "arm64": "arm64"}  # platform arch -> Debian architecture











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




