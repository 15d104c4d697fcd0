"""The tool writes the Python dependency layers itself from the tree uv installed: one layer per
layer_split group, normalized so the digest depends on the files alone, with the installer's
machine-specific bytes (uv's lock file, the interpreter in console scripts) fixed first."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import sys
import tarfile
from pathlib import Path

import pytest

from orchestrator.build import pydeps
from orchestrator.build.plan import LayerStage
from orchestrator.oci import layers
from orchestrator.project.lockfile import Lock, parse_pins
from orchestrator.project.spec import LayerSplit, Sources

LOCK = """six==1.16.0 \\
    --hash=sha256:1e61c37477a1626458e36f7b1d82aa5c9b094fa4802892072e49de9c60c4c926
    # via -r requirements/echo.in
"""


def b64(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def uv_tree(root: Path, interpreter: str = sys.executable, mode: int = 0o644) -> Path:
    """What `uv pip install --target` leaves: packages, dist-infos with RECORD, a console script, uv's .lock."""
    root.mkdir(parents=True)
    (root / ".lock").write_text("")
    (root / "big").mkdir()
    (root / "big" / "lib.so").write_bytes(b"\x7fELF" + bytes(300_000))
    (root / "six.py").write_text("# six\n")
    script = f"#!{interpreter}\n# -*- coding: utf-8 -*-\nimport sys\nfrom big import main\nsys.exit(main())\n".encode()
    (root / "bin").mkdir()
    (root / "bin" / "big").write_bytes(script)
    (root / "bin" / "portable").write_bytes(b"#!/usr/bin/env python3\nprint(1)\n")
    for script_file in (root / "bin").iterdir():
        os.chmod(script_file, 0o755)
    for dist, files in (("big-1.0", ["big/lib.so", "bin/big", "bin/portable"]), ("six-1.16.0", ["six.py"])):
        info = root / f"{dist}.dist-info"
        info.mkdir()
        (info / "INSTALLER").write_text("uv\n")
        rows = [f"{f},{b64((root / f).read_bytes())},{(root / f).stat().st_size}" for f in files]
        rows += [f"{info.name}/INSTALLER,,", f"{info.name}/RECORD,,"]
        (info / "RECORD").write_text("\n".join(rows) + "\n")
    for p in root.rglob("*"):
        if p.is_file() and p.parent.name != "bin":
            os.chmod(p, mode)
    return root


def stage(split: LayerSplit = LayerSplit(own_mb=0.2, max_layers=12), backend: str = "cpu") -> LayerStage:
    return LayerStage("service-echo", Lock(backend, "linux/amd64", "service-echo", "0" * 64, parse_pins(LOCK)), split)


def entries(layer: layers.Layer) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.path.read_bytes()))) as tf:
        return [(m.name, oct(m.mode), m.uid, m.gid, m.mtime, m.type) for m in tf.getmembers()]


def contents(layer: layers.Layer, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.path.read_bytes()))) as tf:
        return tf.extractfile(name).read()


@pytest.fixture
def cache(tmp_path):
    return layers.BlobCache(tmp_path / "blobs")


def test_each_group_is_one_layer_of_its_files_under_the_site_dir_with_every_parent(tmp_path, cache):
    tree = uv_tree(tmp_path / "site")
    groups = pydeps.write_groups(tree, stage(), cache, layers.codec("gzip"))
    assert [g for g, _ in groups] == ["00-big", "01-small"]
    big, small = (entries(layer) for _, layer in groups)
    site = "opt/site/service-echo"
    assert [e[0] for e in big] == ["opt", "opt/site", site, f"{site}/big", f"{site}/big/lib.so",
                                   f"{site}/big-1.0.dist-info", f"{site}/big-1.0.dist-info/INSTALLER",
                                   f"{site}/big-1.0.dist-info/RECORD", f"{site}/bin", f"{site}/bin/big",
                                   f"{site}/bin/portable"]
    assert f"{site}/six.py" in [e[0] for e in small] and f"{site}/.lock" not in [e[0] for e in small]
    # Normalized: root-owned, one time, 0755 for directories and executables, 0644 for the rest.
    for name, mode, uid, gid, mtime, kind in big + small:
        assert (uid, gid, mtime) == (0, 0, layers.SOURCE_DATE_EPOCH)
        assert mode == ("0o755" if kind == tarfile.DIRTYPE or "/bin/" in name else "0o644"), name


def test_a_console_script_names_the_images_python_and_its_record_row_says_so(tmp_path, cache):
    tree = uv_tree(tmp_path / "site", interpreter=sys.executable)
    groups = dict(pydeps.write_groups(tree, stage(), cache, layers.codec("gzip")))
    script = contents(groups["00-big"], "opt/site/service-echo/bin/big")
    assert script.startswith(b"#!/usr/bin/python3\n# -*- coding: utf-8 -*-\n") and sys.executable.encode() not in script
    record = contents(groups["00-big"], "opt/site/service-echo/big-1.0.dist-info/RECORD").decode()
    assert f"bin/big,{b64(script)},{len(script)}\n" in record
    # A script that names no machine's interpreter is the wheel's business: left as it is.
    assert contents(groups["00-big"], "opt/site/service-echo/bin/portable") == b"#!/usr/bin/env python3\nprint(1)\n"
    assert (tree / "bin" / "big").read_bytes().startswith(f"#!{sys.executable}".encode())  # the tree is not touched


def test_the_same_files_give_the_same_layers_whatever_machine_installed_them(tmp_path, cache):
    one = uv_tree(tmp_path / "one", interpreter=sys.executable, mode=0o644)
    other_python = "/opt/some/other/python3.11"
    two = uv_tree(tmp_path / "two", interpreter=other_python, mode=0o664)  # another umask, interpreter, time
    os.utime(two / "six.py", (0, 0))
    monkey = pytest.MonkeyPatch()
    try:
        first = pydeps.write_groups(one, stage(), cache, layers.codec("gzip"))
        monkey.setattr(pydeps, "_interpreters", lambda: {b"#!" + other_python.encode()})
        second = pydeps.write_groups(two, stage(), layers.BlobCache(tmp_path / "other-cache"), layers.codec("gzip"))
    finally:
        monkey.undo()
    assert [(g, lay.diff_id, lay.digest) for g, lay in first] == [(g, lay.diff_id, lay.digest) for g, lay in second]


def test_the_layer_key_follows_the_pins_platform_and_policy_not_the_backend_name(monkeypatch):
    monkeypatch.setattr(pydeps, "uv_version", lambda: "uv 0.test")
    c = layers.codec("gzip")
    key = pydeps.layer_key(stage(), "linux/amd64", "3.11", c)
    assert pydeps.layer_key(stage(backend="cuda"), "linux/amd64", "3.11", c) == key  # same pins, same layer
    assert pydeps.layer_key(stage(), "linux/arm64", "3.11", c) != key
    assert pydeps.layer_key(stage(), "linux/amd64", "3.12", c) != key
    assert pydeps.layer_key(stage(LayerSplit(own_mb=8, max_layers=12)), "linux/amd64", "3.11", c) != key
    monkeypatch.setattr(pydeps, "uv_version", lambda: "uv 0.other")
    assert pydeps.layer_key(stage(), "linux/amd64", "3.11", c) != key  # another installer, other files


def test_the_install_is_for_the_target_platform_with_hashes_and_no_dependencies(tmp_path):
    cmd = pydeps.install_command(stage(), "linux/arm64", "3.11", Sources(index_url="https://pypi.example/simple"),
                                 tmp_path / "t", tmp_path / "lock.txt", tmp_path / "wh", False)
    text = " ".join(cmd)
    for part in ("pip install --no-config", f"--target {tmp_path / 't'}", "--python-platform aarch64-manylinux_2_28",
                 "--python-version 3.11", "--no-deps", "--require-hashes", "--only-binary :all:",
                 "--index-url https://pypi.example/simple", f"--find-links {tmp_path / 'wh'}",
                 f"-r {tmp_path / 'lock.txt'}"):
        assert part in text, part
