"""Smoke brings an image into the engine from the tool's own blobs, sends only the layers the engine
lacks, checks that the engine's image ID is the published config digest, and keeps what it loaded
within a disk budget, least recently used out first."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import pytest

from orchestrator.common.errors import UserError
from orchestrator.machine import kept as kept_mod
from orchestrator.oci import docker_archive as archive
from orchestrator.oci import layers as layers_mod
from orchestrator.release.smoke import images


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(name: str, content: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def config_for(diff_ids: list[str], marker: str = "") -> bytes:
    history = [{"created_by": f"layer {i}"} for i in range(len(diff_ids))]
    return json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids},
                       "history": history, "config": {"Labels": {"m": marker}}}, sort_keys=True).encode()


# --- the archive --------------------------------------------------------------

def test_chain_ids_follow_the_image_spec():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert archive.chain_ids([a, b]) == [a, sha(f"{a} {b}".encode())]


def make_image(blobs: list[bytes], marker: str = "") -> archive.ArchiveImage:
    lays = tuple(archive.ArchiveLayer(sha(gzip.decompress(b)), sha(b), len(b), lambda b=b: io.BytesIO(b))
                 for b in blobs)
    return archive.ArchiveImage(config_for([lay.diff_id for lay in lays], marker), lays, (f"reg/x:{marker}",))


def test_the_archive_leaves_out_what_the_engine_has_and_sends_a_shared_layer_once():
    base, libs, app1, app2 = (gzip.compress(layer_tar(n, n.encode() * 100)) for n in ("base", "libs", "app1", "app2"))
    one, two = make_image([base, libs, app1], "1"), make_image([base, libs, app2], "2")
    present = set(archive.chain_ids(one.diff_ids)[:1])  # the engine has the base only
    tar = tarfile.open(fileobj=io.BytesIO(b"".join(archive.stream([one, two], present))))
    names = tar.getnames()
    manifest = json.loads(tar.extractfile("manifest.json").read())
    assert [m["Config"] for m in manifest] == [f"{one.image_id[7:]}.json", f"{two.image_id[7:]}.json"]
    assert manifest[0]["RepoTags"] == ["reg/x:1"]
    # Every image lists all its layers; the archive holds only the missing ones, libs once for both.
    assert manifest[0]["Layers"][0] == f"{sha(base)[7:]}/layer.tar" and manifest[0]["Layers"][0] not in names
    assert sorted(n for n in names if n.endswith("layer.tar")) == sorted(
        f"{sha(b)[7:]}/layer.tar" for b in (libs, app1, app2))
    assert tar.extractfile(f"{sha(libs)[7:]}/layer.tar").read() == libs  # sent as it is (gzip): the engine unpacks
    assert tar.extractfile(f"{one.image_id[7:]}.json").read() == one.config  # the ID is its digest
    plan = archive.plan([one, two], present)
    assert plan.sent_bytes == len(libs) + len(app1) + len(app2) and [s.digest for s in plan.skipped] == [sha(base)]


def test_an_image_whose_layers_are_not_its_configs_diff_ids_is_refused():
    blob = gzip.compress(layer_tar("f", b"x"))
    img = make_image([blob])
    wrong = archive.ArchiveImage(config_for(["sha256:" + "0" * 64]), img.layers)
    with pytest.raises(ValueError, match="not the config's diffIDs"):
        archive.plan([wrong], set())


# --- the engine, faked: what a load sends and what the check says ----------------

class FakeEngine:
    """The parts of docker-py smoke uses: images by ID, their RootFS, load, history, tags."""

    def __init__(self):
        self.store: dict[str, dict] = {}  # id -> {"layers": diffIDs, "tags": set(), "sizes": [...]}
        self.loads: list[list[str]] = []  # the layer files each load carried
        self.api = self
        outer = self

        class Images:
            def get(self, ref):
                for i, e in outer.store.items():
                    if ref == i or ref in e["tags"]:
                        return type("Image", (), {"id": i})()
                raise LookupError(f"No such image: {ref}")

            def remove(self, tag):
                for i, e in list(outer.store.items()):
                    if tag in e["tags"]:
                        e["tags"].discard(tag)
                        if not e["tags"]:
                            del outer.store[i]
                        return
                raise LookupError(f"No such image: {tag}")

        self.images_api = Images()

    def info(self):
        return {"ID": "fake-engine"}

    def images(self, all=False):  # the API's image list: summaries
        return [{"Id": i} for i in self.store]

    def inspect_image(self, image_id):
        return {"RootFS": {"Layers": self.store[image_id]["layers"]}}

    def history(self, image_id):
        return [{"Size": s} for s in reversed(self.store[image_id]["sizes"])]

    def load_image(self, data, quiet=None):
        tar = tarfile.open(fileobj=io.BytesIO(b"".join(data)))
        manifest = json.loads(tar.extractfile("manifest.json").read())
        self.loads.append(sorted(n for n in tar.getnames() if n.endswith("layer.tar")))
        for m in manifest:
            config = tar.extractfile(m["Config"]).read()
            diff_ids = json.loads(config)["rootfs"]["diff_ids"]
            self.store[sha(config)] = {"layers": diff_ids, "tags": set(m["RepoTags"] or []),
                                        "sizes": [1000 * (i + 1) for i in range(len(diff_ids))]}
        yield {"stream": "Loaded image"}


def client_for(engine: FakeEngine):
    c = type("Client", (), {})()
    c.images = engine.images_api
    c.api = engine
    c.info = engine.info
    return c


def published_image(cache: layers_mod.BlobCache, marker: str, shared: list[bytes] = ()) -> images.Published:
    blobs = list(shared) + [gzip.compress(layer_tar("app", marker.encode()))]
    for b in blobs:
        path = cache.blob_path(sha(b))
        path.write_bytes(b)
    diff_ids = [sha(gzip.decompress(b)) for b in blobs]
    return images.Published(f"127.0.0.1:5000/ns/echo@{sha(marker.encode())}", "127.0.0.1:5000", "ns/echo",
                            config_for(diff_ids, marker),
                            tuple((d, {"digest": sha(b), "size": len(b)}) for d, b in zip(diff_ids, blobs)))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    cache = layers_mod.BlobCache(tmp_path / "blobs")
    engine = FakeEngine()
    record = kept_mod.Kept("fake-engine", 10**12, tmp_path / "kept.json")
    ei = images.EngineImages(client_for(engine), cache=cache, kept=record)
    pubs: dict[str, images.Published] = {}
    monkeypatch.setattr(ei, "published", lambda ref, platform: pubs[ref])
    return cache, engine, ei, pubs, record


def test_a_fresh_image_is_loaded_from_the_blob_cache_and_checked_against_its_config_digest(setup):
    cache, engine, ei, pubs, record = setup
    base = gzip.compress(layer_tar("base", b"b" * 1000))
    first = published_image(cache, "1", [base])
    pubs[first.ref] = first
    image_id, check = ei.ensure(first.ref, "linux/amd64")
    assert image_id == first.image_id == sha(first.config)
    assert check.name == "image" and check.ok
    assert check.detail.startswith(f"engine image ID {first.image_id[:19]} = the published config digest of ")
    assert "2 of 2 layers sent" in check.detail and "from the blob cache" in check.detail
    assert engine.store[image_id]["tags"] == {first.tag} and first.tag.endswith(f":smoke-{image_id[7:19]}")
    # An app-only change: the base is in the engine, so only the new app layer travels.
    second = published_image(cache, "2", [base])
    pubs[second.ref] = second
    image_id, check = ei.ensure(second.ref, "linux/amd64")
    assert check.ok and "1 of 2 layers sent" in check.detail and "1 already in the engine" in check.detail
    assert engine.loads[-1] == [f"{second.layers[-1][1]['digest'][7:]}/layer.tar"]
    # Asked again: already there, nothing loaded.
    loads = len(engine.loads)
    assert ei.ensure(second.ref, "linux/amd64")[1].ok and len(engine.loads) == loads
    assert set(record.images()) == {first.image_id, second.image_id}


def test_an_image_id_other_than_the_config_digest_fails_the_check(setup, monkeypatch):
    cache, engine, ei, pubs, _ = setup
    pub = published_image(cache, "1")
    pubs[pub.ref] = pub
    real_get = engine.images_api.get
    monkeypatch.setattr(engine.images_api, "get", lambda ref: type("I", (), {"id": "sha256:" + "f" * 64})()
                        if ref == pub.image_id and engine.store else real_get(ref))
    _, check = ei.ensure(pub.ref, "linux/amd64")
    assert not check.ok and "!= the published config digest" in check.detail


# --- the disk budget ------------------------------------------------------------

def test_the_budget_is_24_gb_unless_orch_smoke_keep_gb_says_otherwise():
    assert kept_mod.budget({}) == (24 * 10**9, "24 GB (the default; ORCH_SMOKE_KEEP_GB sets it)")
    assert kept_mod.budget({"ORCH_SMOKE_KEEP_GB": "40"})[0] == 40 * 10**9
    assert kept_mod.budget({"ORCH_SMOKE_KEEP_GB": "0"})[0] == 0
    for bad in ("lots", "-1", "inf"):
        with pytest.raises(UserError, match="ORCH_SMOKE_KEEP_GB"):
            kept_mod.budget({"ORCH_SMOKE_KEEP_GB": bad})


def test_a_shared_layer_counts_once():
    images_ = {"a": {"layers": [["c1", 100], ["c2", 50]]}, "b": {"layers": [["c1", 100], ["c3", 20]]}}
    assert kept_mod.Kept.usage(images_) == 170


def test_beyond_the_budget_the_least_recently_used_are_untagged_and_the_group_in_use_is_kept(setup, monkeypatch):
    cache, engine, ei, pubs, record = setup
    made = []
    for marker in "123":  # three images, each 1000 + 2000 bytes unpacked (a shared base layer counts once)
        pub = published_image(cache, marker, [gzip.compress(layer_tar("base", b"b" * 100))])
        pubs[pub.ref] = pub
        ei.ensure(pub.ref, "linux/amd64")
        made.append(pub)
    clock = iter(range(100, 200))
    monkeypatch.setattr(kept_mod.time, "time", lambda: next(clock))
    record.touch([made[1].image_id])  # used in this order: the second, the first, the third
    record.touch([made[0].image_id])
    record.touch([made[2].image_id])
    assert kept_mod.Kept.usage(record.images()) == 1000 + 3 * 2000
    record.budget = 4000
    # Over by 3000: the least recently used go first (2, then 1) until the rest fit; 3 is in use and kept anyway.
    removed = ei.trim(keep={made[2].image_id})
    assert removed == [made[1].tag, made[0].tag]
    assert set(engine.store) == {made[2].image_id} and set(record.images()) == {made[2].image_id}
    record.budget = 0
    assert ei.trim(keep={made[2].image_id}) == []  # in use: kept even above the budget
    assert ei.trim() == [made[2].tag] and engine.store == {}


def test_an_image_smoke_did_not_load_is_never_removed_by_it(setup):
    cache, engine, ei, pubs, record = setup
    pub = published_image(cache, "1")
    pubs[pub.ref] = pub
    engine.store[pub.image_id] = {"layers": [d for d, _ in pub.layers], "tags": {"users/own:tag"}, "sizes": [5]}
    image_id, check = ei.ensure(pub.ref, "linux/amd64")
    assert check.ok and "already in the engine" in check.detail and engine.loads == []
    record.budget = 0
    assert ei.trim() == [] and engine.store[image_id]["tags"] == {"users/own:tag"}
