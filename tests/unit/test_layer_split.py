"""Finer dependency layers: big packages get layers of their own, small ones share one,
so adding a small package re-sends only the shared layer. (How the tool writes them: test_pydeps.py.)"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from orchestrator.build import layer_split
from orchestrator.oci import layers
from tests.unit.test_layers import make_tar

MB = 1_000_000


def test_packages_over_the_threshold_get_their_own_layer_and_the_rest_share_one():
    sizes = {"torch": 900 * MB, "sympy": 30 * MB, "six": 50_000, "idna": 400_000}
    assert layer_split.plan_groups(sizes, 8 * MB, 12) == [
        ("00-sympy", ("sympy",)), ("01-torch", ("torch",)), ("02-small", ("idna", "six"))]


def test_the_budget_keeps_the_largest_own_layers_and_sends_the_others_to_the_shared_one():
    sizes = {f"p{i}": (i + 1) * 10 * MB for i in range(5)} | {"tiny": 1}
    groups = layer_split.plan_groups(sizes, 8 * MB, 3)
    assert groups == [("00-p3", ("p3",)), ("01-p4", ("p4",)), ("02-small", ("p0", "p1", "p2", "tiny"))]
    assert layer_split.plan_groups(sizes, 8 * MB, 1) == [("00-small", tuple(sorted(sizes)))]


def test_adding_a_small_package_moves_no_big_package_to_another_layer():
    before = {"ctranslate2": 40 * MB, "onnxruntime": 25 * MB, "av": 60 * MB, "tqdm": 300_000}
    after = before | {"requests": 200_000}
    own = [g for g in layer_split.plan_groups(before, 8 * MB, 12) if not g[0].endswith("small")]
    assert [g for g in layer_split.plan_groups(after, 8 * MB, 12) if not g[0].endswith("small")] == own


def _install(site: Path, dist: str, version: str, files: dict[str, bytes], scripts: tuple[str, ...] = ()):
    """A distribution as pip --target leaves it: files, a dist-info with RECORD (scripts as ../../bin/...)."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    record = []
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        record.append(f"{rel},sha256=x,{len(data)}")
    for name in scripts:
        (site / "bin").mkdir(exist_ok=True)
        (site / "bin" / name).write_text("#!/usr/bin/python3\n")
        record.append(f"../../bin/{name},sha256=x,20")
    (info / "METADATA").write_text(f"Name: {dist}\nVersion: {version}\n")
    record.append(f"{info.name}/METADATA,,")
    record.append(f"{info.name}/RECORD,,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


@pytest.fixture
def installed(tmp_path) -> Path:
    root = tmp_path / "out"
    site = root / "opt" / "site" / "service-x"
    _install(site, "big-pkg", "1.0", {"big_pkg/__init__.py": b"", "big_pkg/lib.so": os.urandom(300_000),
                                       "big_pkg.libs/dep.so": os.urandom(100_000)}, scripts=("big",))
    _install(site, "six", "1.16.0", {"six.py": b"# six\n" * 100})
    _install(site, "tiny", "0.1", {"tiny/__init__.py": b"x = 1\n", "nvidia/__init__.py": b""})
    _install(site, "other", "0.1", {"other/__init__.py": b"", "nvidia/__init__.py": b""})  # claimed twice
    (site / "stray.txt").write_text("no RECORD lists me\n")
    (site / "empty").mkdir()
    os.chmod(site, 0o750)
    return root


def _files(tree: Path) -> set[str]:
    return {p.relative_to(tree).as_posix() for p in tree.rglob("*") if not p.is_dir() or not any(p.iterdir())}


def test_place_puts_each_file_in_its_package_layer_and_everything_else_in_the_shared_one(installed):
    placed = layer_split.place(str(installed), "opt/site/service-x", 200_000, 12)
    assert [(g, d) for g, d, _ in placed] == [("00-big-pkg", ("big-pkg",)), ("01-small", ("other", "six", "tiny"))]
    site = "opt/site/service-x/"
    big, small = ({p.removeprefix(site) for p in paths} for _, _, paths in placed)
    assert big == {"big_pkg/__init__.py", "big_pkg/lib.so", "big_pkg.libs/dep.so", "bin/big",
                   "big_pkg-1.0.dist-info/METADATA", "big_pkg-1.0.dist-info/RECORD"}
    assert {"six.py", "tiny/__init__.py", "stray.txt", "empty", "nvidia/__init__.py"} <= small
    # Together they are the whole tree, each file once.
    assert big.isdisjoint(small)
    assert {f"{site}{f}" for f in big | small} == _files(installed)


def test_files_of_no_package_get_a_shared_layer_even_when_every_package_has_its_own(installed):
    placed = layer_split.place(str(installed), "opt/site/service-x", 1, 12)
    assert [g for g, _, _ in placed] == ["00-big-pkg", "01-other", "02-six", "03-tiny", "04-small"]
    assert "opt/site/service-x/stray.txt" in placed[-1][2]


def test_place_can_leave_out_top_level_names(installed):
    site = installed / "opt/site/service-x"
    (site / ".lock").write_text("")
    placed = layer_split.place(str(site), ".", 200_000, 12, skip=(".lock",))
    assert ".lock" not in {p for _, _, paths in placed for p in paths} and "stray.txt" in placed[-1][2]


# --- the tool's side: one export, cut into layers ---------------------------

GROUPED = [("00-big", "dir", None), ("00-big/opt", "dir", None), ("00-big/opt/site", "dir", None),
           ("00-big/opt/site/big.so", "file", os.urandom(50_000)),
           ("01-small", "dir", None), ("01-small/opt", "dir", None), ("01-small/opt/site", "dir", None),
           ("01-small/opt/site/six.py", "file", b"# six\n"),
           ("01-small/opt/site/six2.py", "link", "01-small/opt/site/six.py")]


@pytest.fixture
def cache(tmp_path):
    return layers.BlobCache(tmp_path / "blobs")


def _names(layer: layers.Layer) -> list[str]:
    import gzip

    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.path.read_bytes()))) as tf:
        return [(m.name, m.linkname) if m.islnk() else m.name for m in tf.getmembers()]


def test_an_export_of_groups_becomes_one_layer_per_group_without_the_group_directory(cache):
    c = layers.codec("gzip")
    groups = layers.write_layers(io.BytesIO(make_tar(GROUPED, 5)), cache, c)
    assert [g for g, _ in groups] == ["00-big", "01-small"]
    assert _names(groups[0][1]) == ["opt", "opt/site", "opt/site/big.so"]
    assert _names(groups[1][1]) == ["opt", "opt/site", "opt/site/six.py", ("opt/site/six2.py", "opt/site/six.py")]
    # The same files alone give the same layer: a group's layer does not depend on its neighbours.
    alone = layers.write_layer(io.BytesIO(make_tar([(n.split("/", 1)[1], k, p) for n, k, p in GROUPED[1:4]], 9)),
                               cache, c)
    assert alone.digest == groups[0][1].digest


def test_an_unsorted_export_of_groups_is_cut_the_same_from_a_file(cache, tmp_path):
    c = layers.codec("gzip")
    shuffled = GROUPED[4:] + GROUPED[:4]
    with pytest.raises(layers.UnsortedStream):
        layers.write_layers(io.BytesIO(make_tar(GROUPED, 5, shuffled)), cache, c)
    path = tmp_path / "export.tar"
    path.write_bytes(make_tar(GROUPED, 5, shuffled))
    from_file = layers.write_layers_from_file(path, cache, c)
    assert from_file == layers.write_layers(io.BytesIO(make_tar(GROUPED, 5)), cache, c)


def test_split_layers_are_remembered_by_their_inputs(cache):
    c = layers.codec("gzip")
    groups = layers.write_layers(io.BytesIO(make_tar(GROUPED, 5)), cache, c)
    cache.remember_groups("k", groups)
    assert cache.recall_groups("k", c) == groups
    assert cache.recall_groups("k", layers.codec("zstd")) is None
    groups[1][1].path.unlink()  # one blob gone: build again
    assert cache.recall_groups("k", c) is None
