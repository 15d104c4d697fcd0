"""A bytecode cache for smoke containers: what one start compiled, the next start of the same layers reads.

Published images carry no .pyc files (they would grow every layer, and their bytes would depend on
the compiler), so Python compiles every module it imports at each start: torch and the service's web
framework take about 32 s to import under QEMU on this machine and 5 s natively, and half of it is
compiling. Smoke starts each container with PYTHONPYCACHEPREFIX on an engine volume, so the next start
on the same dependency layers (an app-only change, the torch probe after the service) reads the
bytecode the first one wrote: 17-24 s under QEMU, 3 s natively.

The image runs unchanged; only where Python keeps its bytecode moves. A cached .pyc is checked against
its source's mtime and size only, and every layer carries the same mtime, so a cache is shared only
where sources cannot differ: the volume is keyed by every layer of the image but the top one (the app,
which changes at each edit), and each directory holding the top layer's .py files gets a tmpfs over its
part of the cache, so that bytecode lives and dies with the container. A new volume is seeded with the
base layer's own `.pyc` files (Debian's, which the prefix would otherwise hide), read from the tool's blob,
so a first start costs no more than without the cache. A volume no image in the engine
uses any more is removed at the end of a run (`prune`), so it goes with the images the disk budget
untags. ORCH_SMOKE_BYTECODE_CACHE=0 turns it off.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import docker.errors
import zstandard

ENV = "ORCH_SMOKE_BYTECODE_CACHE"
MOUNT = "/var/cache/orchestrator-pyc"  # where the volume is mounted in a smoke container
PREFIX = MOUNT + "/pyc"  # PYTHONPYCACHEPREFIX (a world-writable directory: the service runs as its own user)
LABEL = "org.orchestrator.smoke-bytecode"  # on the volume: the key it was made for
VOLUME_PREFIX = "orchestrator-pyc-"
MAX_TOP_LAYER = 64 * 1000**2  # a top layer larger than this is not read for its .py files: no cache
MAX_BASE_LAYER = 512 * 1000**2  # a base layer larger than this is not read for its .pyc files (no seed)
TMPFS = "rw,mode=1777,size=256m"


def enabled(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def key(diff_ids: list[str] | tuple[str, ...]) -> str | None:
    """The cache key of an image: its layers but the top one, in order. None for a one-layer image."""
    if len(diff_ids) < 2:
        return None
    return hashlib.sha256("\n".join(diff_ids[:-1]).encode()).hexdigest()


def volume_name(cache_key: str) -> str:
    return VOLUME_PREFIX + cache_key[:24]


def decompressed(blob: IO[bytes]) -> IO[bytes]:
    """A layer blob's tar stream: gzip (the tool writes several members, which tarfile's own "r|gz" stops
    reading after the first) or zstd, told apart by their magic bytes."""
    raw = blob if hasattr(blob, "peek") else io.BufferedReader(blob)
    if raw.peek(4)[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return gzip.GzipFile(fileobj=raw)


def source_dirs(layer: IO[bytes]) -> list[str]:
    """The directories (absolute, outermost only) holding the .py files of a layer blob."""
    dirs = set()
    with tarfile.open(fileobj=decompressed(layer), mode="r|") as tar:
        for member in tar:
            name = member.name.removeprefix("./").lstrip("/")
            base = posixpath.basename(name)
            if base.startswith(".wh."):  # a whiteout: a deleted source has no bytecode to read
                continue
            if member.isfile() and name.endswith(".py"):
                dirs.add("/" + posixpath.dirname(name))
    outer = []
    for d in sorted(dirs):
        if not any(d == o or d.startswith(o.rstrip("/") + "/") for o in outer):
            outer.append(d)
    return outer


@dataclass(frozen=True)
class Mounts:
    """What a smoke container gets: the volume, the tmpfs over the top layer's part, the environment."""

    volume: str
    top_dirs: tuple[str, ...]
    created: bool  # the volume was made for this run (a first start compiles all but the base's)

    @property
    def environment(self) -> dict[str, str]:
        # The images set PYTHONDONTWRITEBYTECODE=1; an empty value lets Python write into the cache.
        return {"PYTHONPYCACHEPREFIX": PREFIX, "PYTHONDONTWRITEBYTECODE": ""}

    @property
    def volumes(self) -> dict[str, dict]:
        return {self.volume: {"bind": MOUNT, "mode": "rw"}}

    @property
    def tmpfs(self) -> dict[str, str]:
        return {PREFIX + d: TMPFS for d in self.top_dirs}

    def describe(self) -> str:
        tops = ", ".join(self.top_dirs) or "none"
        return (f"volume {self.volume} ({'new' if self.created else 'reused'}); the top layer's sources "
                f"({tops}) compiled per container")


def skeleton(top_dirs) -> bytes:
    """A tar of the prefix and every parent of a tmpfs mount point, world-writable (sticky), for the volume."""
    parents = {"pyc/" + d.strip("/").rsplit("/", 1)[0] for d in top_dirs if "/" in d.strip("/")}
    return _tree(parents | {"pyc"}, {})


def seed(layer: IO[bytes]) -> bytes:
    """The .pyc files a layer blob holds in `__pycache__` directories, as a tar at their places under the
    prefix (directories world-writable). The base's are Debian's, compiled at install and valid for its
    sources; the prefix hides `__pycache__`, so without them a first start would compile them again."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=decompressed(layer), mode="r|") as tar:
        for member in tar:
            name = member.name.removeprefix("./").lstrip("/")
            head, found, base = name.rpartition("/__pycache__/")
            if found and head and "/" not in base and base.endswith(".pyc") and member.isfile():
                files[f"pyc/{head}/{base}"] = tar.extractfile(member).read()
    return _tree({name.rsplit("/", 1)[0] for name in files}, files)


def _tree(dirs, files: dict[str, bytes]) -> bytes:
    """A tar of dirs (and each of their parents) world-writable and sticky, then files, readable by all."""
    names = set()
    for d in dirs:
        parts = d.split("/")
        names |= {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(names):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.mode, info.size = 0o644, len(files[name])
            tar.addfile(info, io.BytesIO(files[name]))
    return buf.getvalue()


@dataclass
class Cache:
    """The bytecode volumes of one engine for one smoke run (thread-safe: a group's checks ask at once)."""

    client: object
    _made: dict[str, Mounts] = field(default_factory=dict)  # image ID -> its mounts
    _seeds: dict[str, bytes] = field(default_factory=dict)  # base layer diffID -> seed()
    _locks: dict[str, threading.Lock] = field(default_factory=dict)  # one per cache key and per seed
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def used(self) -> bool:
        return bool(self._made)

    def mounts(self, image_id: str, diff_ids: list[str], sizes: list[int],
               open_layer: Callable[[int], IO[bytes]]) -> Mounts | None:
        """The mounts for a container of this image; None where there is no safe cache (see the module doc).

        sizes: each layer blob's size; open_layer(i): layer i's blob."""
        cache_key = key(diff_ids)
        if cache_key is None or sizes[-1] > MAX_TOP_LAYER:
            return None
        with self._lock:
            lock = self._locks.setdefault(cache_key, threading.Lock())
        with lock:  # images of one key one at a time (one makes and seeds the volume); other keys go on
            if image_id in self._made:
                return self._made[image_id]
            with open_layer(len(diff_ids) - 1) as fh:
                tops = tuple(source_dirs(fh))
            name = volume_name(cache_key)
            created = self._volume(name, cache_key)
            archives = [skeleton(tops)]
            if created and sizes[0] <= MAX_BASE_LAYER:
                archives.append(self._seed(diff_ids[0], open_layer))
            self._put(image_id, name, archives)
            self._made[image_id] = m = Mounts(name, tops, created)
            return m

    def _seed(self, base: str, open_layer: Callable[[int], IO[bytes]]) -> bytes:
        with self._lock:
            lock = self._locks.setdefault("seed " + base, threading.Lock())
        with lock:  # read once per run for all the volumes on this base
            if base not in self._seeds:
                with open_layer(0) as fh:
                    self._seeds[base] = seed(fh)
            return self._seeds[base]

    def _volume(self, name: str, cache_key: str) -> bool:
        try:
            self.client.volumes.get(name)
            return False
        except docker.errors.NotFound:
            self.client.volumes.create(name, labels={LABEL: cache_key})
            return True

    def _put(self, image_id: str, name: str, archives: list[bytes]) -> None:
        """Put tars into the volume without running anything: a created (never started) container of the
        image takes them (the prefix and the tmpfs mount points' parents writable by any user; the seed)."""
        c = self.client.containers.create(image_id, command=["true"], entrypoint=[], network_disabled=True,
                                          volumes={name: {"bind": MOUNT, "mode": "rw"}})
        try:
            for data in archives:
                c.put_archive(MOUNT, data)
        finally:
            c.remove(force=True)


def prune(client) -> list[str]:
    """Remove the bytecode volumes whose key no image in the engine has (one in use by a container stays);
    returns their names."""
    keys = set()
    for img in client.images.list(all=True):
        k = key(((img.attrs.get("RootFS") or {}).get("Layers")) or [])
        if k:
            keys.add(k)
    removed = []
    for vol in client.volumes.list(filters={"label": LABEL}):
        if (vol.attrs.get("Labels") or {}).get(LABEL) in keys:
            continue
        try:
            vol.remove()
            removed.append(vol.name)
        except Exception:  # noqa: BLE001 - in use by a running container: next time
            pass
    return removed
