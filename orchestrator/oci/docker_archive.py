"""Images as a docker-archive stream (what `docker save` writes and `docker load` reads), made from blobs.

The archive is `manifest.json`, each image's config as `<config hex>.json`
and its layers as `<blob hex>/layer.tar`. The layers may stay compressed:
the engine's load decompresses gzip itself. The engine gives a loaded image
the ID sha256(config bytes), the config digest, which is also the ID a pull
of the same manifest gives; it checks every layer it unpacks against the
config's diffIDs, so what it holds is exactly the image the config names.

A layer the engine already has need not be sent: moby's load
(image/tarexport/load.go) looks the layer's chain ID up in its layer store
(`lss.Get(chainID)`) and opens the layer's file only when it is missing.
So `stream()` leaves out every layer whose chain ID is in `present` (and
sends a layer shared by several images once), and a change of the app
layer alone sends that layer and the config: kilobytes, not gigabytes.

The stream is written as it is read (a generator of byte chunks), so
nothing is spooled to disk on this side.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator

BLOCK = 512
READ = 1 << 20


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """The chain ID of each layer (the image spec's ChainID: the layer and everything under it)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


@dataclass(frozen=True)
class ArchiveLayer:
    diff_id: str
    digest: str  # the blob's digest: names its file in the archive
    size: int  # bytes open() gives
    open: Callable[[], BinaryIO]  # the blob (compressed or a plain tar), read once


@dataclass(frozen=True)
class ArchiveImage:
    config: bytes
    layers: tuple[ArchiveLayer, ...]
    tags: tuple[str, ...] = ()

    @property
    def image_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()

    @property
    def diff_ids(self) -> list[str]:
        return list(json.loads(self.config)["rootfs"]["diff_ids"])


@dataclass
class Plan:
    """What a stream sends: the layers left out because the engine has them, and the bytes of those sent."""

    sent: list[ArchiveLayer]
    skipped: list[ArchiveLayer]

    @property
    def sent_bytes(self) -> int:
        return sum(lay.size for lay in self.sent)


def plan(images: list[ArchiveImage], present: set[str]) -> Plan:
    """Which layers go into the archive: each missing one once, in image order."""
    sent: dict[str, ArchiveLayer] = {}
    skipped: dict[str, ArchiveLayer] = {}
    for img in images:
        if [lay.diff_id for lay in img.layers] != img.diff_ids:
            raise ValueError(f"image {img.image_id[:19]}: its layers are not the config's diffIDs")
        for lay, chain in zip(img.layers, chain_ids(img.diff_ids)):
            if chain in present:
                skipped.setdefault(lay.digest, lay)
            else:
                sent.setdefault(lay.digest, lay)
    return Plan(list(sent.values()), [lay for d, lay in skipped.items() if d not in sent])


def _member(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def _file(name: str, data: bytes) -> Iterator[bytes]:
    yield _member(name, len(data)) + data + _padding(len(data))


def _layer_path(layer: ArchiveLayer) -> str:
    return f"{layer.digest.split(':', 1)[1]}/layer.tar"


def stream(images: list[ArchiveImage], present: set[str], progress: Callable[[int], None] | None = None
           ) -> Iterator[bytes]:
    """The docker-archive of images, as chunks, without the layers whose chain IDs are in present."""
    which = plan(images, present)
    manifest = [{"Config": f"{img.image_id.split(':', 1)[1]}.json", "RepoTags": list(img.tags) or None,
                 "Layers": [_layer_path(lay) for lay in img.layers]} for img in images]
    configs = {img.image_id: img.config for img in images}
    for image_id, config in configs.items():
        yield from _file(f"{image_id.split(':', 1)[1]}.json", config)
    for layer in which.sent:
        yield _member(_layer_path(layer), layer.size)
        written = 0
        with layer.open() as fh:
            while True:
                data = fh.read(READ)
                if not data:
                    break
                written += len(data)
                if written > layer.size:
                    break
                if progress:
                    progress(len(data))
                yield data
        if written != layer.size:
            raise OSError(f"blob {layer.digest[:19]} gave {written} bytes, not {layer.size}")
        yield _padding(layer.size)
    # manifest.json last: the engine reads the whole archive before it looks at it.
    yield from _file("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
    yield b"\0" * (2 * BLOCK)
