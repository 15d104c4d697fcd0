"""The system-package layer: locked .debs, unpacked without maintainer scripts, as one normalized layer.

Every pinned .deb is downloaded (or taken from the cache) and checked by
size and sha256 against the lock. Its data tar is read in Python (a .deb is
an ar archive: no dpkg, no chroot, no emulation, so an arm64 layer unpacks
the same way on an amd64 host) and merged, in lock order, into one tar:

* paths are moved under /usr the way a merged-/usr base (Debian 12's
  default) has them: `lib/x86_64-linux-gnu/libz.so.1` becomes
  `usr/lib/...`. A layer holding a real `lib/` directory would replace the
  base's `lib -> usr/lib` symlink and take the dynamic loader with it;
* documentation, man and info pages, translations and lintian overrides
  are dropped; each package's copyright file is kept (the licences of what
  the image ships travel with it: GPL/LGPL/BSD notices ask for that);
* what maintainer scripts would have done that the image needs is done
  declaratively: `update-alternatives --install` links are created (e.g.
  libblas.so.3 -> the reference BLAS); everything else the scripts do is
  reported, not run (see `ScriptReport`);
* each package gets a `var/lib/dpkg/status.d/<name>` stanza (its control
  file) and `<name>.md5sums`: what distroless images do, so SBOM and CVE
  scanners (syft, trivy, grype) see the packages. dpkg's own status file
  belongs to the base layer and is left alone, so `dpkg -l` does not list
  them.

The merged tar is written in sorted order into a pipe that
layers.write_layer reads (normalized: times SOURCE_DATE_EPOCH, no user
names), so the fragment never lands on disk; only the decompressed data
tars do, while the layer is made. Nothing in the result depends on the
machine, the time or the download: the same lock gives the same diffID and
blob digest, and the layer cache (BlobCache.remember/recall) is keyed by
the pins (`layer_key`), so a rebuild downloads nothing.
"""

from __future__ import annotations

import bz2
import copy
import gzip
import hashlib
import io
import lzma
import os
import re
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.debian.aptlock import AptLock
from orchestrator.debian.archive import Downloader, cache_root
from orchestrator.debian.resolve import AptPin
from orchestrator.oci import layers as layers_mod
from orchestrator.oci.layers import clean_name

LAYER_FORMAT = 1  # bump when the unpacking rules change: it is part of the layer cache key
DROPPED = ("usr/share/doc/", "usr/share/man/", "usr/share/info/", "usr/share/lintian/", "usr/share/locale/",
           "usr/share/doc-base/", "usr/share/bug/")
# A merged-/usr base has these as symlinks; entries under them are written to the target.
MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib32": "usr/lib32", "lib64": "usr/lib64",
              "libx32": "usr/libx32", "var/run": "run", "var/lock": "run/lock"}
SCRIPT_NAMES = ("preinst", "postinst", "prerm", "postrm", "config")


# --- reading a .deb (an ar archive) ----------------------------------------

class DebError(EnvironmentProblem):
    """A file that the lock's sha256 matched but that is not a .deb this reader understands."""


def _ar_members(fh: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """(name, offset, size) of each member of an ar archive."""
    if fh.read(8) != b"!<arch>\n":
        raise DebError("not an ar archive")
    pos = 8
    while True:
        fh.seek(pos)
        head = fh.read(60)
        if len(head) < 60:
            return
        name = head[:16].decode().strip().rstrip("/")
        size = int(head[48:58].decode().strip())
        yield name, pos + 60, size
        pos += 60 + size + (size & 1)


class _Window(io.RawIOBase):
    """A read-only view of size bytes of fh from offset."""

    def __init__(self, fh: BinaryIO, offset: int, size: int):
        self.fh, self.pos, self.end = fh, offset, offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.end - self.pos)
        if n <= 0:
            return 0
        self.fh.seek(self.pos)
        data = self.fh.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _decompressed(name: str, raw: BinaryIO) -> BinaryIO:
    buffered = io.BufferedReader(raw, 1 << 20)
    if name.endswith(".xz"):
        return lzma.LZMAFile(buffered)
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=buffered)
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    if name.endswith(".bz2"):
        return bz2.BZ2File(buffered)
    if name.endswith(".tar"):
        return buffered
    raise DebError(f"unknown member compression {name}")


class Deb:
    """A .deb on disk: its control files, and its data tar as a stream."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = open(path, "rb")
        try:
            self._members = {n: (o, s) for n, o, s in _ar_members(self._fh)}
        except (DebError, ValueError, UnicodeDecodeError) as e:
            self._fh.close()
            raise DebError(f"{path.name}: not a .deb ({e})") from None
        self.control = self._control_files()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def member(self, prefix: str) -> tuple[str, BinaryIO]:
        for name, (off, size) in self._members.items():
            if name.startswith(prefix):
                return name, _decompressed(name, _Window(self._fh, off, size))
        raise DebError(f"{self.path.name}: no {prefix}* member")

    def _control_files(self) -> dict[str, bytes]:
        name, stream = self.member("control.tar")
        out = {}
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                if m.isreg():
                    out[m.name.lstrip("./")] = tf.extractfile(m).read()
        return out

    def data(self) -> tarfile.TarFile:
        """The data tar, in stream mode (members in the .deb's order)."""
        name, stream = self.member("data.tar")
        return tarfile.open(fileobj=stream, mode="r|")


# --- what maintainer scripts would do ----------------------------------------

_ALT_RE = re.compile(r"update-alternatives\b[^\n]*?--install\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)")
_TRIVIAL = re.compile(r"^\s*(#.*|set -e|exit 0|fi|then|esac|;;|\S+\)|if .*|case .*|\s*)$")


@dataclass(frozen=True)
class Alternative:
    link: str  # e.g. /usr/lib/x86_64-linux-gnu/libblas.so.3
    name: str  # e.g. libblas.so.3-x86_64-linux-gnu
    path: str  # e.g. /usr/lib/x86_64-linux-gnu/blas/libblas.so.3
    priority: int
    package: str


@dataclass(frozen=True)
class ScriptReport:
    """The maintainer scripts and triggers of one package, and what was done about them."""

    package: str
    scripts: tuple[str, ...]  # preinst, postinst, ...
    triggers: tuple[str, ...]  # lines of the triggers file
    alternatives: tuple[Alternative, ...]
    other: tuple[str, ...]  # commands in postinst/preinst this layer does not reproduce

    @property
    def matters(self) -> bool:
        return bool(self.alternatives or self.other)


def scan_scripts(package: str, control: dict[str, bytes], multiarch: str) -> ScriptReport:
    """What the package's scripts do at install time, read from their text (nothing is run)."""
    scripts = tuple(n for n in SCRIPT_NAMES if n in control)
    triggers = tuple(line.strip() for line in control.get("triggers", b"").decode("utf-8", "replace").splitlines()
                     if line.strip() and not line.lstrip().startswith("#"))
    alts, other = [], []
    for n in ("preinst", "postinst"):
        text = control.get(n, b"").decode("utf-8", "replace")
        # Debhelper's generated snippets, with the multiarch triplet they substitute.
        text = text.replace("${DEB_HOST_MULTIARCH}", multiarch).replace("$DEB_HOST_MULTIARCH", multiarch)
        text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
        for m in _ALT_RE.finditer(text):
            link, name, path, prio = m.groups()
            if "$" in link + name + path or not prio.lstrip("-").isdigit():
                other.append(f"{n}: update-alternatives with shell variables: {m.group(0).strip()}")
                continue
            alts.append(Alternative(link, name, path, int(prio), package))
        for line in text.splitlines():
            stripped = line.strip()
            for cmd in ("adduser", "useradd", "addgroup", "groupadd", "systemd-sysusers", "dpkg-trigger",
                        "update-mime-database", "glib-compile-schemas", "gdk-pixbuf-query-loaders",
                        "fc-cache", "update-ca-certificates", "ucf ", "dpkg-statoverride", "setcap",
                        "systemctl", "deb-systemd-helper", "update-rc.d", "invoke-rc.d", "ldconfig",
                        "py3compile", "pycompile", "dpkg-maintscript-helper", "db_get", "ln"):
                if re.search(rf"(^|[\s;&|(]){re.escape(cmd.strip())}(\s|$)", stripped) and \
                        not stripped.startswith("#"):
                    other.append(f"{n}: {cmd.strip()}")
                    break
    return ScriptReport(package, scripts, triggers, tuple(alts), tuple(sorted(set(other))))


# --- merging the packages into one tar ----------------------------------------

def _usr_merged(name: str) -> str:
    for old, new in MERGED_USR.items():
        if name == old or name.startswith(old + "/"):
            return new + name[len(old):]
    return name


def _dropped(name: str) -> bool:
    if not name.startswith(DROPPED):
        return False
    # Keep usr/share/doc/<pkg> (a directory, or a symlink to a sibling's) and its copyright file.
    parts = name.split("/")
    if parts[:3] == ["usr", "share", "doc"] and (len(parts) == 4 or (len(parts) == 5 and parts[4] == "copyright")):
        return False
    return True


@dataclass(frozen=True)
class Fragment:
    """What went into the layer, for the report and the tests."""

    packages: tuple[str, ...]
    entries: int  # tar entries in the layer (files, directories, links)
    unpacked_bytes: int
    downloaded_bytes: int
    scripts: tuple[ScriptReport, ...]
    notes: tuple[str, ...]

    def maintainer_scripts_that_matter(self) -> dict[str, list[str]]:
        out = {}
        for r in self.scripts:
            if r.matters:
                out[r.package] = [f"alternative {a.link} -> {a.path}" for a in r.alternatives] + list(r.other)
        return out


@dataclass(frozen=True)
class AptLayer:
    layer: layers_mod.Layer
    fragment: Fragment | None  # None when the layer came from the cache
    key: str
    seconds: float


def layer_key(lk: AptLock) -> str:
    """The layer cache key: the pins and the unpacking rules (not the sources' dates)."""
    return hashlib.sha256(f"apt-layer v{LAYER_FORMAT} {lk.platform}\n{lk.body()}".encode()).hexdigest()


def multiarch_triplet(platform: str) -> str:
    return {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}[platform.split("/")[-1]]


def download(pins: tuple[AptPin, ...], dl: Downloader, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Each pinned .deb, from the cache or the mirror, checked by size and sha256."""
    def one(p: AptPin) -> Path:
        return dl.fetch([p.url], p.sha256, p.size, p.filename,
                        "the mirror served a different file than the lock pins; re-run `invoke lock --upgrade`",
                        missing=f"the archive no longer has {p.name} {p.version} (Debian drops superseded "
                                "versions): re-run `invoke lock --upgrade`, or lock against snapshot.debian.org")

    # A few connections at once: most .debs are small, so latency, not bandwidth, bounds a serial fetch.
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="deb") as pool:
        out = dict(zip((p.name for p in pins), pool.map(one, pins)))
    if log:
        log(f"[apt] {len(pins)} packages: {sum(p.size for p in pins) / 1e6:.1f} MB of .debs, "
            f"{dl.downloaded / 1e6:.1f} MB downloaded")
    return out


def _unpack_raw(deb_path: Path, dest: Path) -> dict[str, bytes]:
    """Decompress a .deb's data tar to dest; returns its control files. Runs on a thread (lzma drops the GIL)."""
    with Deb(deb_path) as deb:
        name, stream = deb.member("data.tar")
        with open(dest, "wb") as out:
            while chunk := stream.read(1 << 20):
                out.write(chunk)
        return deb.control


def merge(pins: tuple[AptPin, ...], debs: dict[str, Path], platform: str, out: BinaryIO, work: Path) -> Fragment:
    """Write the fragment (every package's files, merged in lock order) to out as a sorted tar stream.

    work: a scratch directory for the decompressed data tars.
    """
    triplet = multiarch_triplet(platform)
    work.mkdir(parents=True, exist_ok=True)
    raws = [work / f"{i:04d}.tar" for i in range(len(pins))]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="unpack") as pool:
        controls = list(pool.map(_unpack_raw, [debs[p.name] for p in pins], raws))

    entries: dict[str, _Item] = {}  # name -> what to write; later packages win, as with dpkg
    owner: dict[str, str] = {}
    notes: list[str] = []
    reports: list[ScriptReport] = []

    def add(name: str, package: str, item: _Item) -> None:
        prev = entries.get(name)
        if prev is not None:
            if prev.info.isdir() and item.info.isdir():
                return  # the first package's directory stays: the same in every Debian package
            if owner[name] != package:
                notes.append(f"{name}: shipped by {owner[name]} and {package}; {package}'s is kept")
        entries[name] = item
        owner[name] = package

    for p, raw, control in zip(pins, raws, controls):
        reports.append(scan_scripts(p.name, control, triplet))
        with tarfile.open(raw, "r:") as tf:
            members = tf.getmembers()
        for m in members:
            name = _usr_merged(clean_name(m.name))
            if not name or name in MERGED_USR or _dropped(name):
                continue  # the base has bin, lib, ... as symlinks: leave them
            if m.uname not in ("", "root") or m.gname not in ("", "root"):
                notes.append(f"{p.name}: {name} is owned by {m.uname}:{m.gname} (uid {m.uid}, gid {m.gid} kept)")
            if name.startswith("etc/ld.so.conf.d/") and m.isreg():
                notes.append(f"{p.name}: {name} adds a library directory that only ldconfig would make known; "
                             "set LD_LIBRARY_PATH for it in the image")
            info = layers_mod.tarinfo_replace(m, name=name)
            if m.islnk():
                info.linkname = _usr_merged(clean_name(m.linkname))
            add(name, p.name, _Item(info, raw, m.offset_data))
        for fname, data in ((f"var/lib/dpkg/status.d/{p.name}", control.get("control")),
                            (f"var/lib/dpkg/status.d/{p.name}.md5sums", control.get("md5sums"))):
            if data is not None:
                add(fname, p.name, _Item(_file_info(fname, len(data)), blob=data))
    for alt in _chosen_alternatives(reports):
        # What update-alternatives leaves behind: link -> /etc/alternatives/name -> path.
        link, managed = clean_name(alt.link), f"etc/alternatives/{alt.name}"
        add(link, alt.package, _Item(_symlink_info(link, "/" + managed)))
        add(managed, alt.package, _Item(_symlink_info(managed, alt.path)))
    for d in ("etc", "etc/alternatives", "var", "var/lib", "var/lib/dpkg", "var/lib/dpkg/status.d"):
        if d not in entries and any(n.startswith(d + "/") for n in entries):
            add(d, "", _Item(_dir_info(d)))
    size = _write_sorted(entries, out, notes)
    return Fragment(tuple(p.name for p in pins), len(entries), size, 0, tuple(reports), tuple(notes))


@dataclass(frozen=True)
class _Item:
    """One entry of the fragment: its header, and where its bytes are (a decompressed data tar, or here)."""

    info: tarfile.TarInfo
    raw: Path | None = None
    offset: int = 0
    blob: bytes | None = None

    def open(self) -> BinaryIO:
        if self.blob is not None:
            return io.BytesIO(self.blob)
        fh = open(self.raw, "rb")  # closed by the caller; one at a time, so a large closure needs few fds
        fh.seek(self.offset)
        return fh


def _write_sorted(entries: dict[str, _Item], out: BinaryIO, notes: list[str]) -> int:
    """Write the entries depth-first sorted (write_layer then streams it in one pass); returns the file bytes."""
    names = sorted(entries, key=_key)
    # A hard link must follow the file it names: the first name of each group (in
    # output order) carries the data, the others link to it.
    lead: dict[str, str] = {}
    for n in names:
        info = entries[n].info
        if info.islnk():
            target = entries.get(info.linkname)
            if target is not None and target.info.isreg():
                lead.setdefault(info.linkname, n if _key(n) < _key(info.linkname) else info.linkname)
    size = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=1 << 20) as tf:
        def write(info: tarfile.TarInfo, item: _Item | None = None) -> None:
            if item is None:
                tf.addfile(info)
                return
            with item.open() as fh:
                tf.addfile(info, fh)  # reads exactly info.size bytes

        for n in names:
            info = entries[n].info
            if info.islnk():
                if info.linkname not in lead:
                    notes.append(f"{n}: hard link to {info.linkname}, which is not in the layer; dropped")
                    continue
                first = lead[info.linkname]
                if first == n:  # this name sorts first: it carries the target's data
                    target = entries[info.linkname]
                    write(layers_mod.tarinfo_replace(target.info, name=n), target)
                    size += target.info.size
                else:
                    write(layers_mod.tarinfo_replace(info, linkname=first))
                continue
            if info.isreg() and lead.get(n, n) != n:
                link = copy.copy(info)
                link.type, link.linkname, link.size = tarfile.LNKTYPE, lead[n], 0
                write(link)
                continue
            if info.isreg():
                size += info.size
                write(info, entries[n])
            else:
                write(info)
    return size


def _key(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))  # depth-first sorted order, as layers.py writes it


def _chosen_alternatives(reports: list[ScriptReport]) -> list[Alternative]:
    # update-alternatives in auto mode: the highest priority wins, then the first by path.
    best: dict[str, Alternative] = {}
    for r in reports:
        for a in r.alternatives:
            cur = best.get(a.name)
            if cur is None or (a.priority, cur.path) > (cur.priority, a.path):
                best[a.name] = a
    return [best[n] for n in sorted(best)]


def _file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def _symlink_info(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
    return info


def _merge_into_layer(lk: AptLock, debs: dict[str, Path], work: Path, cache: layers_mod.BlobCache,
                      c: layers_mod.Codec) -> tuple[Fragment, layers_mod.Layer]:
    """merge() writes the sorted tar into a pipe that write_layer reads: the fragment never lands on disk."""
    r, w = os.pipe()
    result: dict = {}

    def produce() -> None:
        try:
            with open(w, "wb", buffering=1 << 20) as fh:
                result["fragment"] = merge(lk.pins, debs, lk.platform, fh, work)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = e

    thread = threading.Thread(target=produce, name="apt-merge")
    thread.start()
    try:
        with open(r, "rb", buffering=1 << 20) as src:
            layer = layers_mod.write_layer(src, cache, c)
    except BaseException:
        thread.join()
        if "error" in result:
            raise result["error"] from None
        raise
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["fragment"], layer


def build_layer(lk: AptLock, cache: layers_mod.BlobCache, c: layers_mod.Codec, *,
                apt_cache: Path | None = None, downloader: Downloader | None = None,
                log: Callable[[str], None] | None = None, reuse: bool = True) -> AptLayer:
    """The layer holding exactly the locked packages; from the layer cache when it was built before."""
    started = time.monotonic()
    key = layer_key(lk)
    if reuse:
        found = cache.recall(key, c)
        if found is not None:
            return AptLayer(found, None, key, time.monotonic() - started)
    if not lk.pins:
        raise UserError(f"the apt lock for {lk.platform} pins no packages", "remove the empty system_packages layer")
    dl = downloader or Downloader(apt_cache or cache_root())
    debs = download(lk.pins, dl, log)
    with tempfile.TemporaryDirectory(prefix="orch-apt-", dir=cache.root) as tmp:
        frag, layer = _merge_into_layer(lk, debs, Path(tmp) / "debs", cache, c)
    frag = Fragment(frag.packages, frag.entries, frag.unpacked_bytes, dl.downloaded, frag.scripts, frag.notes)
    cache.remember(key, layer)
    if log:
        log(f"[apt] {lk.platform}: layer {layer.digest[:19]} ({layer.blob_size / 1e6:.1f} MB, "
            f"{frag.unpacked_bytes / 1e6:.0f} MB unpacked, {frag.entries} entries) "
            f"in {time.monotonic() - started:.0f} s")
    return AptLayer(layer, frag, key, time.monotonic() - started)
