"""Layer blobs: the same files give the same diffID and blob digest, whatever
order and times the producer wrote them with."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import platform
import re
import tarfile
import threading
from pathlib import Path

import pytest

from orchestrator.common.errors import EnvironmentProblem
from orchestrator.oci import layers


def make_tar(entries, mtime, order=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, kind, payload in (order or entries):
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            info.uname = "builder"
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, payload
                tf.addfile(info)
            else:
                info.size, info.mode = len(payload), 0o644
                tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


ENTRIES = [("./opt", "dir", None), ("./opt/site", "dir", None), ("./opt/site/a.py", "file", b"print(1)\n" * 500),
           ("./opt/site/b", "file", bytes(range(256)) * 4000), ("./opt/site-x", "file", b"x")]


@pytest.fixture
def cache(tmp_path):
    return layers.BlobCache(tmp_path / "blobs")


def test_same_files_with_other_times_give_the_same_diff_id_and_blob(cache):
    c = layers.codec("gzip")
    one = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 1_700_000_000)), cache, c)
    two = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 1_600_000_000)), cache, c)
    assert (one.diff_id, one.digest) == (two.diff_id, two.digest)


def test_a_tar_compressed_again_keeps_its_first_blob_even_if_the_compressor_gives_other_bytes(cache, monkeypatch):
    c = layers.codec("gzip")
    first = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 1)), cache, c)
    compress = layers._compress_chunk
    # other, equally valid bytes for the same tar (an extra empty member), as ISA-L once gave
    monkeypatch.setattr(layers, "_compress_chunk", lambda codec, data: compress(codec, data) + gzip.compress(b"", mtime=0))
    again = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 2)), cache, c)
    assert again == first  # one diffID, one blob digest, on every image that has this layer
    assert sorted(p.name for p in (cache.root / "sha256").iterdir()) == [first.digest.split(":")[1]]


def test_the_blob_is_gzip_of_the_normalized_tar_whose_sha256_is_the_diff_id(cache):
    c = layers.Codec("gzip", layers.TAR_MEDIA + "+gzip", "isal", 1, 64 * 1024)  # small chunks: many members
    layer = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 1)), cache, c)
    raw = gzip.decompress(layer.path.read_bytes())
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == layer.diff_id and len(raw) == layer.size
    assert "sha256:" + hashlib.sha256(layer.path.read_bytes()).hexdigest() == layer.digest
    assert layer.path.read_bytes().count(b"\x1f\x8b\x08") >= 2  # several members
    names = [(m.name, m.mtime, m.uname) for m in tarfile.open(fileobj=io.BytesIO(raw))]
    assert names == [("opt", layers.SOURCE_DATE_EPOCH, ""), ("opt/site", layers.SOURCE_DATE_EPOCH, ""),
                     ("opt/site/a.py", layers.SOURCE_DATE_EPOCH, ""), ("opt/site/b", layers.SOURCE_DATE_EPOCH, ""),
                     ("opt/site-x", layers.SOURCE_DATE_EPOCH, "")]


def test_an_unsorted_stream_is_refused_and_a_file_is_sorted_to_the_same_result(cache, tmp_path):
    c = layers.codec("gzip")
    shuffled = [ENTRIES[0], ENTRIES[4], ENTRIES[1], ENTRIES[3], ENTRIES[2]]
    with pytest.raises(layers.UnsortedStream):
        layers.write_layer(io.BytesIO(make_tar(ENTRIES, 5, shuffled)), cache, c)
    path = tmp_path / "shuffled.tar"
    path.write_bytes(make_tar(ENTRIES, 5, shuffled))
    assert layers.write_layer_from_file(path, cache, c).diff_id == \
        layers.write_layer(io.BytesIO(make_tar(ENTRIES, 5)), cache, c).diff_id


def test_hard_links_point_at_the_first_name_in_output_order(cache, tmp_path):
    entries = [("z", "file", b"data"), ("a", "link", "z")]
    path = tmp_path / "links.tar"
    path.write_bytes(make_tar(entries, 5))
    layer = layers.write_layer_from_file(path, cache, layers.codec("gzip"))
    members = list(tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.path.read_bytes()))))
    assert [(m.name, m.isreg(), m.linkname) for m in members] == [("a", True, ""), ("z", False, "a")]


def test_blobs_are_found_again_by_diff_id_and_by_inputs(cache):
    c = layers.codec("gzip")
    layer = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 1)), cache, c)
    assert cache.lookup(layer.diff_id, c) == layer
    cache.remember("abc", layer)
    assert cache.recall("abc", c) == layer
    assert cache.recall("abc", layers.codec("zstd")) is None  # another codec: another blob


def test_zstd_frames_decompress_to_the_same_tar(cache):
    import zstandard

    gz = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 1)), cache, layers.codec("gzip"))
    zs = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 1)), cache, layers.codec("zstd"))
    assert zs.diff_id == gz.diff_id and zs.media_type.endswith("+zstd")
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(zs.path.read_bytes())
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == zs.diff_id


def test_a_cached_gzip_layer_is_transcoded_to_zstd_with_the_same_diff_id(cache):
    gz = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 1)), cache, layers.codec("gzip"))
    zs = layers.transcode(gz.diff_id, cache, layers.codec("zstd"))
    assert zs.diff_id == gz.diff_id and zs.media_type.endswith("+zstd") and zs.digest != gz.digest


def test_a_blob_cached_at_another_level_is_recompressed_with_the_pinned_codec(cache):
    old = layers.Codec("gzip", layers.TAR_MEDIA + "+gzip", "isal-old", 1, 4 << 20)
    first = layers.write_layer(io.BytesIO(make_tar(ENTRIES, 1)), cache, old)
    pinned = layers.codec("gzip")
    again = layers.transcode(first.diff_id, cache, pinned)
    assert again.diff_id == first.diff_id and cache.lookup(first.diff_id, pinned) == again


def mixed_bytes(n: int) -> bytes:
    """n bytes that are neither all text nor all noise, the same on every machine and Python."""
    words = [w.encode() for w in "the layer blob digest depends on every byte isal writes for each chunk of tar".split()]
    out, i = bytearray(), 0
    while len(out) < n:
        out += hashlib.sha256(i.to_bytes(8, "little")).digest()[: i % 9] + words[i % len(words)] + b" " * (i % 7)
        i += 1
    return bytes(out[:n])


@pytest.mark.parametrize("c", [
    layers.codec("gzip"),
    layers.Codec("gzip", layers.TAR_MEDIA + "+gzip", "isal", 2, 64 * 1024),  # many members in flight at once
    layers.Codec("zstd", layers.TAR_MEDIA + "+zstd", "zstandard", 3, 64 * 1024),
], ids=["gzip-4MiB", "gzip-64KiB", "zstd-64KiB"])
def test_the_blob_is_the_same_bytes_whatever_the_number_of_compressing_threads(tmp_path, c):
    entries = [("./opt", "dir", None)] + [(f"./opt/f{i:02d}", "file", mixed_bytes(700_000 + i * 4099))
                                          for i in range(14)]  # about 10 MB: several 4 MiB chunks
    tar = make_tar(entries, 1)
    blobs = {}
    for threads in (1, 2, 8):
        cache = layers.BlobCache(tmp_path / f"threads-{threads}")  # its own cache: nothing found again
        layer = layers.write_layer(io.BytesIO(tar), cache, c, threads=threads)
        blobs[threads] = (layer.diff_id, layer.digest, layer.path.read_bytes())
    assert blobs[1][2].count(b"\x1f\x8b\x08" if c.name == "gzip" else b"\x28\xb5\x2f\xfd") >= 3  # several members
    assert blobs[1] == blobs[2] == blobs[8]


# The bytes ISA-L gave on x86_64 for isal 1.9.1, level 2 (the pinned codec). Every blob digest the
# tool has pushed is made of such bytes: a new isal that compresses otherwise must be a deliberate
# change (a new pin, new digests for every layer), never a side effect of an upgrade.
GOLDEN_GZIP = {"x86_64": {4 << 20: "9a59544f0ea822f2a6dda1723f00e652bb7c8c40e6e1576a60b8225a2b7da63c", 1000: "4f678eb9d6335ac364a77a3e1e8ecb84599512b2daa2a96f6ab9b8bf3d8a6523"}}


def test_the_pinned_gzip_codec_still_gives_the_bytes_every_pushed_digest_is_made_of():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    pinned = re.search(r'"isal==([^"]+)"', pyproject)
    assert pinned, "pyproject.toml must pin isal exactly (isal==X.Y.Z): blob digests depend on its output"
    c = layers.codec("gzip")
    assert c.library == f"isal-{pinned.group(1)}", "the installed isal is not the pinned one: run bash ci/setup.sh"
    # Only x86_64's bytes are recorded (ISA-L has per-architecture code); elsewhere the pin is what is checked.
    for size, digest in GOLDEN_GZIP.get(platform.machine(), {}).items():
        data = mixed_bytes(size)
        member = layers._compress_chunk(c, data)
        assert gzip.decompress(member) == data
        assert hashlib.sha256(member).hexdigest() == digest, (
            f"isal {pinned.group(1)} compressed {size} bytes to other bytes than before: every layer's blob digest "
            "would change. If the upgrade is deliberate, record the new digests here and say so in the changelog")


def test_a_full_disk_under_the_blob_cache_is_named_and_leaves_no_compressing_thread(cache, monkeypatch):
    before = set(threading.enumerate())
    # Every write of the blob fails as on a full disk: /dev/full answers ENOSPC.
    monkeypatch.setattr(layers.tempfile, "mkstemp",
                        lambda prefix, dir: (os.open("/dev/full", os.O_WRONLY), str(cache.root / "partial")))
    entries = [(f"f{i}", "file", mixed_bytes(300_000 + i)) for i in range(8)]
    c = layers.Codec("gzip", layers.TAR_MEDIA + "+gzip", "isal", 2, 64 * 1024)
    with pytest.raises(EnvironmentProblem) as failed:
        layers.write_layer(io.BytesIO(make_tar(entries, 1)), cache, c, threads=2)
    mount = cache.root.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    assert failed.value.message.startswith(f"no space left on {mount} ")
    assert str(cache.root) in failed.value.message and "ORCH_CACHE_DIR" in failed.value.hint
    assert set(threading.enumerate()) <= before
