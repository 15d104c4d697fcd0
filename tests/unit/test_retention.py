"""engine.gc's retention policy (orchestrator.retention), on fake registry inventories."""

from __future__ import annotations

import hashlib

import pytest

from orchestrator.release.retention import Inventory, ManifestInfo, Tag, is_built_here, manifest_references, plan

HOST = "127.0.0.1:5000"


def d(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


class Registry:
    """A fake registry: images (layers by name), indexes and tags, with push times."""

    def __init__(self):
        self.tags: list[Tag] = []
        self.manifests: dict[str, ManifestInfo] = {}
        self.backend_manifests: list[dict] = []
        self.clock = 1000.0

    def image(self, name: str, layers: list[str], platform: str = "linux/amd64", ours: bool = True,
              size: int = 100) -> str:
        digest = d("manifest " + name)
        blobs = tuple((d(layer), size) for layer in [f"config {name}", *layers])
        self.manifests[digest] = ManifestInfo(digest, tuple(d(layer) for layer in layers), (), blobs, platform, ours)
        return digest

    def index(self, name: str, children: list[str]) -> str:
        digest = d("index " + name)
        self.manifests[digest] = ManifestInfo(digest, children=tuple(children))
        return digest

    def tag(self, repo: str, tag: str, digest: str) -> None:
        self.clock += 10
        self.tags.append(Tag(repo, tag, digest, self.clock))

    def publish(self, project: str, service: str, version: str, images: dict[str, str], index: dict[str, str],
                cuda_libs: dict[str, str] | None = None) -> None:
        backends = {}
        for backend, digest in images.items():
            spec = {"image": f"{HOST}/{project}/{service}@{digest}", "index": f"{HOST}/{project}/{service}@{index[backend]}",
                    "size": 1}
            if cuda_libs and backend in cuda_libs:
                spec["cuda_libs"] = {"tag": "cu124-v1", "digest": cuda_libs[backend]}
            backends[backend] = spec
        self.backend_manifests.append({"schemaVersion": 2, "project": project, "service": service, "version": version,
                                       "platforms": {"linux/amd64": {"default": next(iter(images)),
                                                                     "fallback": list(images),
                                                                     "backends": backends}}})

    def inventory(self) -> Inventory:
        return Inventory(tuple(self.tags), dict(self.manifests), tuple(self.backend_manifests))


def deleted(p) -> set[tuple[str, str]]:
    return {(x.repository, t) for x in p.delete for t in x.tags}


def test_unreferenced_content_tags_beyond_the_newest_n_of_their_line_are_deleted():
    reg = Registry()
    for i in range(4):
        reg.tag("p/svc", f"0.1.0-cpu-{i:012x}", reg.image(f"cpu{i}", ["base", f"app{i}"]))
    p = plan(reg.inventory(), keep=2)
    assert deleted(p) == {("p/svc", "0.1.0-cpu-000000000000"), ("p/svc", "0.1.0-cpu-000000000001")}
    assert set(p.kept) == {("p/svc", "0.1.0-cpu-000000000002"), ("p/svc", "0.1.0-cpu-000000000003")}


def test_keep_zero_deletes_every_unreferenced_content_tag():
    reg = Registry()
    reg.tag("p/svc", "0.1.0-cpu-aaaaaaaaaaaa", reg.image("a", ["base", "a"]))
    assert deleted(plan(reg.inventory(), keep=0)) == {("p/svc", "0.1.0-cpu-aaaaaaaaaaaa")}


def test_newest_means_most_recently_pushed_not_the_name():
    reg = Registry()
    reg.tag("p/svc", "0.1.0-cpu-ffffffffffff", reg.image("old", ["base", "old"]))
    reg.tag("p/svc", "0.1.0-cpu-000000000000", reg.image("new", ["base", "new"]))
    assert deleted(plan(reg.inventory(), keep=1)) == {("p/svc", "0.1.0-cpu-ffffffffffff")}


def test_each_line_repository_prefix_and_platform_keeps_its_own_newest():
    reg = Registry()
    for i in range(2):
        reg.tag("p/svc", f"0.1.0-cpu-{i:012x}", reg.image(f"amd{i}", ["base", f"amd{i}"], "linux/amd64"))
        reg.tag("p/svc", f"0.1.0-cpu-{i + 10:012x}", reg.image(f"arm{i}", ["base", f"arm{i}"], "linux/arm64"))
        reg.tag("p/svc", f"0.1.0-cuda-{i:012x}", reg.image(f"cuda{i}", ["base", f"cuda{i}"]))
        reg.tag("q/svc", f"0.1.0-cpu-{i:012x}", reg.image(f"q{i}", ["base", f"q{i}"]))
    assert deleted(plan(reg.inventory(), keep=1)) == {
        ("p/svc", "0.1.0-cpu-000000000000"), ("p/svc", "0.1.0-cpu-00000000000a"),
        ("p/svc", "0.1.0-cuda-000000000000"), ("q/svc", "0.1.0-cpu-000000000000")}


def test_what_a_backend_manifest_names_is_kept_however_old():
    reg = Registry()
    libs = reg.image("libs", ["base", "cudart"])
    reg.tag("p/cuda-libs", "cu124-111111111111", libs)
    old = reg.image("old", ["base", "cudart", "app-old"])
    reg.tag("p/svc", "0.1.0-cuda-111111111111", old)
    reg.publish("p", "svc", "0.1.0", {"cuda": old}, {"cuda": reg.index("idx-old", [old])}, cuda_libs={"cuda": libs})
    for i in range(3):
        reg.tag("p/svc", f"0.1.0-cuda-{i:012x}", reg.image(f"new{i}", ["base", f"cudart{i}", f"app{i}"]))
    p = plan(reg.inventory(), keep=1)
    assert ("p/svc", "0.1.0-cuda-111111111111") in p.kept
    assert ("p/cuda-libs", "cu124-111111111111") in p.kept
    assert "backend manifest p/svc 0.1.0" in p.kept[("p/svc", "0.1.0-cuda-111111111111")]
    assert deleted(p) == {("p/svc", "0.1.0-cuda-000000000000"), ("p/svc", "0.1.0-cuda-000000000001")}


def test_a_human_tag_keeps_its_index_and_every_child():
    reg = Registry()
    amd = reg.image("amd", ["base", "amd"], "linux/amd64")
    arm = reg.image("arm", ["base", "arm"], "linux/arm64")
    reg.tag("p/svc", "0.1.0-cpu-aaaaaaaaaaaa", amd)
    reg.tag("p/svc", "0.1.0-cpu-bbbbbbbbbbbb", arm)
    reg.tag("p/svc", "0.1.0-cpu", reg.index("cpu", [amd, arm]))
    for i in range(2):
        reg.tag("p/svc", f"0.1.0-cpu-{i:012x}", reg.image(f"amd{i}", ["base", f"amd{i}"], "linux/amd64"))
        reg.tag("p/svc", f"0.1.0-cpu-{i + 10:012x}", reg.image(f"arm{i}", ["base", f"arm{i}"], "linux/arm64"))
    p = plan(reg.inventory(), keep=0)
    assert {("p/svc", "0.1.0-cpu-aaaaaaaaaaaa"), ("p/svc", "0.1.0-cpu-bbbbbbbbbbbb")} <= set(p.kept)
    assert len(deleted(p)) == 4
    assert all(x.digest not in (amd, arm) for x in p.delete)


def test_a_kept_image_keeps_the_parent_it_was_built_on():
    """A CUDA service built on a CUDA-libs content tag: keeping the service keeps that CUDA-libs image,
    so the next build finds its parent in the registry and rebuilds nothing."""
    reg = Registry()
    parent = reg.image("libs-a", ["base", "cudart-a"])
    reg.tag("p/cuda-libs", "cu124-aaaaaaaaaaaa", parent)
    reg.tag("p/cuda-libs", "cu124-bbbbbbbbbbbb", reg.image("libs-b", ["base", "cudart-b"]))
    reg.tag("p/svc", "0.1.0-cuda-cccccccccccc", reg.image("svc", ["base", "cudart-a", "system", "app"]))
    # The cuda-libs line's newest is libs-b, but svc (its line's newest) sits on libs-a.
    p = plan(reg.inventory(), keep=1)
    assert ("p/cuda-libs", "cu124-aaaaaaaaaaaa") in p.kept
    assert p.kept[("p/cuda-libs", "cu124-aaaaaaaaaaaa")] == "parent or child of a kept image"
    assert deleted(p) == set()


def test_human_tags_and_images_built_elsewhere_are_never_deleted():
    reg = Registry()
    base = reg.image("base", ["base"], ours=False)
    reg.tag("orchestrator/base-bookworm", "amd64-2252b38e9e8bcc5d-gzip", base)
    reg.tag("other/app", "v1-0123456789ab", reg.image("foreign", ["x"], ours=False))  # looks like a content tag
    reg.tag("p/svc", "latest", reg.image("human", ["base", "h"]))
    reg.tag("p/svc", "0.1.0-cpu-aaaaaaaaaaaa", reg.image("c1", ["base", "c1"]))
    reg.tag("p/svc", "0.1.0-cpu-bbbbbbbbbbbb", reg.image("c2", ["base", "c2"]))
    assert deleted(plan(reg.inventory(), keep=0)) == {("p/svc", "0.1.0-cpu-aaaaaaaaaaaa"),
                                                     ("p/svc", "0.1.0-cpu-bbbbbbbbbbbb")}


def test_a_digest_a_human_tag_names_is_not_deleted_through_its_content_tag():
    """DELETE by digest drops every tag naming it; a content tag sharing a digest with a human tag stays."""
    reg = Registry()
    same = reg.image("same", ["base", "same"])
    reg.tag("p/svc", "0.1.0-cpu-aaaaaaaaaaaa", same)
    reg.tag("p/svc", "stable", same)
    reg.tag("q/svc", "0.1.0-cpu-aaaaaaaaaaaa", same)  # the same bytes in another repository
    assert plan(reg.inventory(), keep=0).delete == ()


def test_tags_naming_one_digest_go_in_one_deletion():
    reg = Registry()
    img = reg.image("img", ["base", "img"])
    reg.tag("p/svc", "0.1.0-cpu-aaaaaaaaaaaa", img)
    reg.tag("p/svc", "0.2.0-cpu-bbbbbbbbbbbb", img)
    p = plan(reg.inventory(), keep=0)
    assert len(p.delete) == 1 and p.delete[0].tags == ("0.1.0-cpu-aaaaaaaaaaaa", "0.2.0-cpu-bbbbbbbbbbbb")
    assert p.deleted_tags == 2


def test_reclaimable_counts_blobs_only_deleted_manifests_name():
    reg = Registry()
    reg.tag("p/svc", "0.1.0-cpu-aaaaaaaaaaaa", reg.image("old", ["base", "old-app"], size=1000))
    reg.tag("p/svc", "0.1.0-cpu-bbbbbbbbbbbb", reg.image("new", ["base", "new-app"], size=1000))
    p = plan(reg.inventory(), keep=1)
    assert p.reclaimable == 2000  # the old config and app layer; the base layer is shared with the kept image


def test_keep_must_not_be_negative():
    with pytest.raises(ValueError):
        plan(Registry().inventory(), keep=-1)


def test_manifest_references_name_images_indexes_and_cuda_libs():
    reg = Registry()
    reg.publish("p", "svc", "0.1.0", {"cuda": d("img")}, {"cuda": d("idx")}, cuda_libs={"cuda": d("libs")})
    assert manifest_references(reg.backend_manifests[0]) == {d("img"), d("idx"), d("libs")}


def test_built_here_means_orchestrator_labels():
    assert is_built_here({"io.orchestrator.backend": "cpu"})
    assert not is_built_here({"org.opencontainers.image.title": "x"})
    assert not is_built_here(None)


def test_an_images_sbom_referrers_go_with_it_and_a_kept_images_stay():
    reg = Registry()
    old, new = reg.image("old", ["base", "a"]), reg.image("new", ["base", "b"])
    reg.tag("p/svc", "0.1.0-cpu-000000000000", old)
    reg.tag("p/svc", "0.1.0-cpu-000000000001", new)
    for image in (old, new):  # publish attached an SBOM to each: referrers tag schema
        sbom = reg.image("sbom of " + image, ["sbom json " + image], platform=None, ours=False)
        reg.tag("p/svc", "sha256-" + image[7:], reg.index("referrers of " + image, [sbom]))
    p = plan(reg.inventory(), keep=1)
    gone = {x.digest for x in p.delete}
    assert deleted(p) == {("p/svc", "0.1.0-cpu-000000000000"), ("p/svc", "sha256-" + old[7:])}
    assert {old, d("index referrers of " + old), d("manifest sbom of " + old)} == gone
    assert d("sbom json " + old) in {b for b, _ in reg.manifests[d("manifest sbom of " + old)].blobs}
    assert p.reclaimable >= 2 * 100  # the old SBOM's blobs are freed too
