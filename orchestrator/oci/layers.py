"""Layer blobs: deterministic tars, compressed on every core, cached by diffID.

A layer arrives as a tar stream (a BuildKit stage exported with
`--output type=tar`, or mmdebstrap's rootfs). It is rewritten entry by entry
into a normalized tar: names without "./", every time SOURCE_DATE_EPOCH,
no user/group names, no PAX time records, hard links pointing at the first
name, entries in depth-first sorted order. The sha256 of that tar is the
diffID, so the same files give the same diffID whatever built them.

The tar is compressed while it is written: it is cut into fixed-size chunks
and each chunk becomes one gzip member, compressed by ISA-L on a pool of
threads (multi-member gzip is plain gzip to every engine; ISA-L releases the
GIL). The blob digest depends on the library, level and chunk size, so all
three are pinned in `Codec` and part of the cache key.

Compressed blobs are cached by (diffID, codec), so a re-push, a second
registry or a second image sharing the layer never compresses again.
"""

from __future__ import annotations

import collections
import copy
import errno
import gzip
import hashlib
import itertools
import json
import os
import struct
import tarfile
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from orchestrator.common import meter, places
from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import atomic_write


def tarinfo_replace(info: tarfile.TarInfo, **changes) -> tarfile.TarInfo:
    """A copy of `info` with `changes` applied: TarInfo.replace() without it.

    TarInfo.replace() is Python 3.11.4+ (PEP 706); Debian 12's python3 is
    3.11.2 and lacks it.
    """
    new = copy.copy(info)
    new.pax_headers = dict(info.pax_headers)
    for k, v in changes.items():
        setattr(new, k, v)
    return new

SOURCE_DATE_EPOCH = 315532800  # 1980-01-01: the earliest time zip (wheels) can hold
TAR_MEDIA = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class Codec:
    name: str  # gzip | zstd
    media_type: str
    library: str  # name and version: the output bytes depend on it
    level: int
    chunk: int  # bytes of tar per independently compressed member/frame

    @property
    def key(self) -> str:
        return f"{self.name}-{self.library}-l{self.level}-c{self.chunk}"


def codec(name: str) -> Codec:
    if name == "gzip":
        import isal

        # Level 2: as fast as 1 on the nvidia libraries here and 1-2 % smaller (bench/publish_speed.py).
        return Codec("gzip", TAR_MEDIA + "+gzip", f"isal-{isal.__version__}", 2, 4 << 20)
    if name == "zstd":
        import zstandard

        return Codec("zstd", TAR_MEDIA + "+zstd", f"zstandard-{zstandard.__version__}", 3, 4 << 20)
    raise UserError(f"unknown compression {name!r}", "use gzip or zstd")


# A gzip member header with mtime 0, no name, OS "unknown": the same bytes every time.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_compressors = threading.local()


def _compress_chunk(c: Codec, data: bytes) -> bytes:
    if c.name == "gzip":
        from isal import isal_zlib

        # isal's private _ParallelCompress (what isal.igzip_threaded uses) kept on purpose: every
        # blob digest already pushed is made of its bytes. One call compresses the whole chunk with
        # SYNC_FLUSH, GIL released; we close the raw deflate with an empty final block. No public
        # call gives these bytes (isal 1.9.1, read and measured): compressobj(2, DEFLATED, -15)
        # also releases the GIL, but compress() then flush(Z_SYNC_FLUSH) cuts blocks elsewhere (11
        # of 25 4 MiB chunks of /usr/lib differ), and isal_zlib.compress() ends in a final block.
        # isal is pinned exactly (pyproject.toml, requirements/tool.lock) and
        # tests/unit/test_layers.py holds a golden digest, so an upgrade that changes the bytes
        # (or drops this class) fails loudly instead of changing every layer digest.
        # Reusing one per thread is safe: compress_and_crc resets the stream (isal_deflate_reset)
        # and clears the match history at offset 0, so a chunk's bytes do not depend on the chunk
        # before. Checked: 100 4 MiB chunks through one object in shuffled order gave what fresh
        # objects give; 9000 chunks of 1 B-4 MiB gave the same bytes whatever followed them in memory.
        comp = getattr(_compressors, "gzip", None)
        if comp is None or _compressors.key != (c.level, c.chunk):  # its output buffer fits one chunk
            comp = _compressors.gzip = isal_zlib._ParallelCompress(buffersize=c.chunk + c.chunk // 10 + 500,
                                                                   level=c.level)
            _compressors.key = (c.level, c.chunk)
        deflate, crc = comp.compress_and_crc(data, b"")
        return (_GZIP_HEADER + deflate + b"\x03\x00"
                + struct.pack("<II", crc & 0xFFFFFFFF, len(data) & 0xFFFFFFFF))
    import zstandard

    # One frame per chunk, with its size: frames concatenate like gzip members.
    return zstandard.ZstdCompressor(level=c.level, write_content_size=True).compress(data)


def _metered_compress(c: Codec, data: bytes) -> bytes:
    """_compress_chunk, its CPU seconds counted against the "compress" phase when a meter records."""
    if not meter.recording():
        return _compress_chunk(c, data)
    start = time.thread_time()
    out = _compress_chunk(c, data)
    meter.add("compress", time.thread_time() - start, len(data))
    return out


@dataclass(frozen=True)
class Layer:
    """One layer as an image needs it: uncompressed identity and the compressed blob."""

    diff_id: str
    size: int  # uncompressed tar bytes
    digest: str  # compressed blob
    blob_size: int
    media_type: str
    path: Path | None = None  # the blob in the cache, when it is here

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.blob_size}


class BlobCache:
    """Compressed blobs by digest, and an index (diffID, codec) -> blob."""

    def __init__(self, root: Path):
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "index").mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.root / "sha256" / digest.split(":", 1)[1]

    def _index(self, diff_id: str, c: Codec) -> Path:
        return self.root / "index" / f"{diff_id.split(':', 1)[1]}.{c.key}.json"

    def lookup(self, diff_id: str, c: Codec) -> Layer | None:
        try:
            data = json.loads(self._index(diff_id, c).read_text())
        except (OSError, ValueError):
            return None
        path = self.blob_path(data["digest"])
        if not path.exists() or path.stat().st_size != data["blob_size"]:
            return None
        return Layer(diff_id, data["size"], data["digest"], data["blob_size"], c.media_type, path)

    def record(self, layer: Layer, c: Codec) -> None:
        atomic_write(self._index(layer.diff_id, c), json.dumps(
            {"size": layer.size, "digest": layer.digest, "blob_size": layer.blob_size}, sort_keys=True))

    def key_path(self, key: str) -> Path:
        """Where a layer made from inputs with this hash is remembered (see `remember`)."""
        return self.root / "index" / f"inputs-{key}.json"

    def remember(self, key: str, layer: Layer) -> None:
        atomic_write(self.key_path(key), json.dumps({"diff_id": layer.diff_id, "size": layer.size}))

    def remember_groups(self, key: str, groups: list[tuple[str, Layer]]) -> None:
        """Like remember, for a stage split into several layers (orchestrator/layer_split.py)."""
        atomic_write(self.key_path(key), json.dumps({"groups": [
            {"group": g, "diff_id": layer.diff_id, "size": layer.size} for g, layer in groups]}))

    def recall_groups(self, key: str, c: Codec) -> list[tuple[str, Layer]] | None:
        """The layers made earlier from the same inputs, compressed with c, if every blob is still here."""
        try:
            groups = json.loads(self.key_path(key).read_text())["groups"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        out = []
        for g in groups:
            layer = self.lookup(g["diff_id"], c)
            if layer is None:
                return None
            out.append((g["group"], layer))
        return out

    def recall(self, key: str, c: Codec) -> Layer | None:
        """The layer built earlier from the same inputs, compressed with c, if its blob is still here."""
        try:
            data = json.loads(self.key_path(key).read_text())
        except (OSError, ValueError):
            return None
        return self.lookup(data["diff_id"], c)


def default_cache() -> BlobCache:
    return BlobCache(places.cache_root("blobs"))


# --- the writer: tar bytes in, diffID and compressed blob out --------------

class _CompressingSink:
    """A file-like sink for the tar writer: hashes what it gets (diffID) and compresses it in chunks.

    The main thread only cuts chunks. Compression runs on a pool (ISA-L
    releases the GIL); one "finisher" thread takes the chunks in order,
    hashes them (diffID), writes their compressed form and hashes that (blob
    digest); hashlib and file writes release the GIL too, so all of it
    overlaps the tar work on the main thread.
    """

    def __init__(self, c: Codec, out: BinaryIO, threads: int, progress: Callable[[int], None] | None):
        self.codec, self.out, self.progress = c, out, progress
        self.raw = hashlib.sha256()
        self.packed = hashlib.sha256()
        self.size = self.blob_size = 0
        self.pieces: list[bytes] = []
        self.pending_bytes = 0
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="compress")
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish")
        self.inflight: "collections.deque[Future]" = collections.deque()
        self.window = threads * 3  # chunks in flight: bounds memory

    def tell(self) -> int:  # TarFile asks where it starts
        return self.size

    def write(self, data) -> int:
        n = len(data)
        self.size += n
        self.pieces.append(bytes(data))
        self.pending_bytes += n
        if self.pending_bytes >= self.codec.chunk:
            joined = b"".join(self.pieces)
            cut = len(joined) - len(joined) % self.codec.chunk
            for i in range(0, cut, self.codec.chunk):
                self._submit(joined[i:i + self.codec.chunk])
            rest = joined[cut:]
            self.pieces = [rest] if rest else []
            self.pending_bytes = len(rest)
        return n

    def _submit(self, chunk: bytes) -> None:
        while len(self.inflight) >= self.window:
            self.inflight.popleft().result()
        packed = self.pool.submit(_metered_compress, self.codec, chunk)
        self.inflight.append(self.finisher.submit(self._finish, chunk, packed))

    def _finish(self, chunk: bytes, packed: Future) -> None:
        # Runs in submission order on one thread: the order of members is part of the digest.
        # Each byte is hashed once: the tar for the diffID, the blob for its digest (uploads do not hash again).
        start = time.thread_time()
        self.raw.update(chunk)
        hashed = time.thread_time() - start
        data = packed.result()
        self.out.write(data)
        start = time.thread_time()
        self.packed.update(data)
        meter.add("hash", hashed + time.thread_time() - start, len(chunk) + len(data))
        self.blob_size += len(data)
        if self.progress:
            self.progress(len(chunk))

    def close(self) -> None:
        try:
            if self.pieces:
                self._submit(b"".join(self.pieces))
                self.pieces, self.pending_bytes = [], 0
            while self.inflight:
                self.inflight.popleft().result()
        finally:  # a failed write (a full disk) leaves no chunk queued and no thread behind
            self.pool.shutdown(cancel_futures=True)
            self.finisher.shutdown(cancel_futures=True)


def _sort_key(name: str) -> tuple[str, ...]:
    # Component-wise order is depth-first sorted order: a directory, then
    # everything under it, then its next sibling (what a sorted walk gives).
    return tuple(name.split("/"))


def clean_name(name: str) -> str:
    """A tar member's name as layers hold it: no leading '/' or './', no trailing '/'."""
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def normalize(members, out: tarfile.TarFile, epoch: int) -> None:
    """Copy (TarInfo, fileobj) pairs into out with normalized metadata.

    Hard links are rewritten to point at the first name of their group in
    the output order, so the result does not depend on which name the
    producer wrote first.
    """
    links: dict[str, str] = {}  # name as written by the producer -> name in the output
    for info, data in members:
        name = clean_name(info.name)
        if not name or name == ".":
            continue
        new = tarfile.TarInfo(name)
        new.mode = info.mode & 0o7777
        new.uid, new.gid = info.uid, info.gid
        new.uname = new.gname = ""
        new.mtime = epoch
        new.type = info.type
        if info.islnk():
            new.linkname = links.get(clean_name(info.linkname), clean_name(info.linkname))
            new.size = 0
        elif info.issym():
            new.linkname = info.linkname
        elif info.ischr() or info.isblk():
            new.devmajor, new.devminor = info.devmajor, info.devminor
        elif info.isreg():
            new.size = info.size
        links[name] = name
        out.addfile(new, data if info.isreg() else None)


def _stream_members(tf: tarfile.TarFile):
    """Members of a stream-mode tar with their data, refusing an unsorted stream."""
    last: tuple[str, ...] | None = None
    for info in tf:
        key = _sort_key(clean_name(info.name))
        if last is not None and key < last:
            raise _Unsorted()
        last = key
        yield info, (tf.extractfile(info) if info.isreg() else None)


class _Unsorted(Exception):
    pass


def _sorted_members(path: Path):
    tf = tarfile.open(path, "r:")
    members = sorted(tf.getmembers(), key=lambda m: _sort_key(clean_name(m.name)))
    # A hard link must follow its target: make the first name of each group the file.
    first: dict[str, tarfile.TarInfo] = {}
    for m in tf.getmembers():
        if m.isreg():
            first.setdefault(clean_name(m.name), m)
    out = []
    seen: dict[str, str] = {}
    for m in members:
        if m.islnk():
            target = clean_name(m.linkname)
            if target not in seen:  # the link sorts first: it carries the data
                src = first[target]
                seen[target] = clean_name(m.name)
                out.append((tarinfo_replace(src, name=m.name), tf.extractfile(src)))
                continue
            out.append((tarinfo_replace(m, linkname=seen[target]), None))
            continue
        if m.isreg():
            name = clean_name(m.name)
            if name in seen:  # already written under a link's name that sorted first
                link = copy.copy(m)
                link.type, link.linkname, link.size = tarfile.LNKTYPE, seen[name], 0
                out.append((link, None))
                continue
            seen[name] = name
        out.append((m, tf.extractfile(m) if m.isreg() else None))
    return tf, out


class UnsortedStream(Exception):
    """The producer's entries are not in sorted order: export to a file and use write_layer_from_file."""


def write_layer(source: BinaryIO, cache: BlobCache, c: Codec, epoch: int = SOURCE_DATE_EPOCH,
                progress: Callable[[int], None] | None = None, threads: int | None = None) -> Layer:
    """Normalize the tar read once from a stream, compress it, store the blob; returns the layer.

    Raises UnsortedStream (writing nothing) when the stream is not in sorted order.
    threads: compressing threads (default: one per core); the blob is the same for any number.
    """
    try:
        return _write_from(source, cache, c, epoch, progress, sort=False, threads=threads)
    except _Unsorted:
        raise UnsortedStream() from None


def write_layer_from_file(path: Path, cache: BlobCache, c: Codec, epoch: int = SOURCE_DATE_EPOCH,
                          progress: Callable[[int], None] | None = None) -> Layer:
    """Like write_layer, for a tar file on disk: sorted without spooling when needed."""
    with open(path, "rb") as fh:
        try:
            return _write_from(fh, cache, c, epoch, progress, sort=False)
        except _Unsorted:
            pass
    return _write_from(path, cache, c, epoch, progress, sort=True)


def _write_from(src, cache: BlobCache, c: Codec, epoch: int, progress, sort: bool,
                threads: int | None = None) -> Layer:
    if sort:
        stf, members = _sorted_members(Path(src))
        with stf:
            return _write_members(members, cache, c, epoch, progress, threads)
    with tarfile.open(fileobj=src, mode="r|", bufsize=1 << 20) as tf:
        return _write_members(_stream_members(tf), cache, c, epoch, progress, threads)


def write_members(members, cache: BlobCache, c: Codec, epoch: int = SOURCE_DATE_EPOCH,
                  progress: Callable[[int], None] | None = None, threads: int | None = None) -> Layer:
    """A layer from (TarInfo, data) pairs the caller gives in sorted order (a tree the tool walks itself)."""
    return _write_members(members, cache, c, epoch, progress, threads)


def _write_members(members, cache: BlobCache, c: Codec, epoch: int, progress, threads: int | None = None) -> Layer:
    """Normalize (TarInfo, data) pairs into one tar, compress it, store the blob; returns the layer."""
    threads = threads or os.cpu_count() or 2
    try:
        return _write_blob(members, cache, c, epoch, progress, threads)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(cache.root) from e
        raise


def _disk_full(directory: Path) -> EnvironmentProblem:
    """A full disk under the blob cache, named so that the user knows which one to free."""
    mount = directory.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return EnvironmentProblem(
        f"no space left on {mount} while writing a compressed layer into the blob cache {directory}",
        f"free space on {mount}, or point ORCH_CACHE_DIR at a disk with room (the cache can be deleted: it "
        "is made again), then re-run")


def _write_blob(members, cache: BlobCache, c: Codec, epoch: int, progress, threads: int) -> Layer:
    fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=cache.root)
    try:
        with os.fdopen(fd, "wb") as fh:
            sink = _CompressingSink(c, fh, threads, progress)
            out = tarfile.TarFile(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT)
            out.copybufsize = 1 << 20
            try:
                normalize(members, out, epoch)
                out.close()
            finally:
                sink.close()
            fh.flush()
            os.fsync(fh.fileno())
        diff_id = "sha256:" + sink.raw.hexdigest()
        # A tar this machine has compressed before keeps its first blob. ISA-L's output for the same
        # chunk is not always the same bytes: once, in a CI run, one gzip member in 107 of a 447 MB
        # layer came out one byte longer (both valid, same tar), and a second blob digest for the same
        # diffID gave two images two different layers. Its cause is not known: neither the thread
        # count, nor reusing a thread's compressor, nor the memory after a chunk changes the bytes
        # (tests/unit/test_layers.py, and the fuzzing noted at _compress_chunk); ISA-L picks its
        # code by CPU features, so a blob made on another CPU may differ.
        known = cache.lookup(diff_id, c)
        if known is not None:
            Path(tmp).unlink(missing_ok=True)
            return known
        digest = "sha256:" + sink.packed.hexdigest()
        layer = Layer(diff_id, sink.size, digest, sink.blob_size, c.media_type, cache.blob_path(digest))
        os.replace(tmp, layer.path)
        cache.record(layer, c)
        return layer
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- one export, several layers (orchestrator/layer_split.py) --------------

def _group_of(name: str) -> str:
    return clean_name(name).split("/", 1)[0]


def _in_group(members, group: str):
    """A group's members with the group directory taken off their names (and hard links' targets)."""
    prefix = group + "/"
    for info, data in members:
        name = clean_name(info.name)
        if name == group:
            continue  # the group directory itself: not part of the layer
        changes = {"name": name[len(prefix):]}
        if info.islnk():
            target = clean_name(info.linkname)
            if not target.startswith(prefix):
                raise UserError(f"{name} is a hard link to {target}, in another layer",
                                "this is a bug in the layer split; please report it")
            changes["linkname"] = target[len(prefix):]
        yield tarinfo_replace(info, **changes), data


def _write_groups(members, cache: BlobCache, c: Codec, epoch: int, progress) -> list[tuple[str, Layer]]:
    return [(group, _write_members(_in_group(entries, group), cache, c, epoch, progress))
            for group, entries in itertools.groupby(members, key=lambda m: _group_of(m[0].name))]


def write_layers(source: BinaryIO, cache: BlobCache, c: Codec, epoch: int = SOURCE_DATE_EPOCH,
                 progress: Callable[[int], None] | None = None) -> list[tuple[str, Layer]]:
    """A tar whose top-level directories are layer groups ("00-torch", "01-small"): one layer per group, in order.

    Read once from a stream; raises UnsortedStream when the stream is not in
    sorted order (then export to a file and use write_layers_from_file).
    """
    try:
        with tarfile.open(fileobj=source, mode="r|", bufsize=1 << 20) as tf:
            return _write_groups(_stream_members(tf), cache, c, epoch, progress)
    except _Unsorted:
        raise UnsortedStream() from None


def write_layers_from_file(path: Path, cache: BlobCache, c: Codec, epoch: int = SOURCE_DATE_EPOCH,
                           progress: Callable[[int], None] | None = None) -> list[tuple[str, Layer]]:
    """Like write_layers, for a tar file on disk, sorted first."""
    stf, members = _sorted_members(path)
    with stf:
        return _write_groups(iter(members), cache, c, epoch, progress)


class Rate:
    """Bytes and MB/s for progress lines, printed at most every `every` seconds."""

    def __init__(self, label: str, log, every: float = 5.0):
        self.label, self.log, self.every = label, log, every
        self.start = self.last = time.monotonic()
        self.bytes = 0

    def __call__(self, n: int) -> None:
        self.bytes += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log(f"  {self.label}: {self.bytes / 1e6:,.0f} MB ({self.mb_s():,.0f} MB/s)")

    def mb_s(self) -> float:
        return self.bytes / 1e6 / max(time.monotonic() - self.start, 1e-6)


def transcode(diff_id: str, cache: BlobCache, c: Codec) -> Layer | None:
    """The layer with this diffID compressed with c, made from a cached blob of another codec.

    The cached tar is already normalized, so re-normalizing changes nothing
    and the diffID is checked to be the same.
    """
    found = cache.lookup(diff_id, c)
    if found is not None:
        return found
    # Any cached blob of this diffID will do: another codec, or another level or library version.
    for index in sorted(cache.root.glob(f"index/{diff_id.split(':', 1)[1]}.*.json")):
        other = index.name.split(".", 1)[1].split("-", 1)[0]  # gzip | zstd
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        src = Layer(diff_id, data["size"], data["digest"], data["blob_size"], "", cache.blob_path(data["digest"]))
        if other not in ("gzip", "zstd") or not src.path.exists():
            continue
        with open(src.path, "rb") as fh:
            if other == "gzip":
                stream = gzip.GzipFile(fileobj=fh)
            else:
                import zstandard

                stream = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
            layer = write_layer(stream, cache, c)
        if layer.diff_id != diff_id:
            raise UserError(f"cached blob {src.digest} does not hold diffID {diff_id}",
                            f"the blob cache is corrupt; delete {cache.root} and re-run")
        return layer
    return None
