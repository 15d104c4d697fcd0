"""Layer blobs: the same files give the same diffID and blob digest, whatever
order and times the producer wrote them with."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import pytest

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
