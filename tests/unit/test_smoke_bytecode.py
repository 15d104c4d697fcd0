"""Smoke's bytecode cache (orchestrator/release/smoke/bytecode.py): shared only where sources cannot differ."""

from __future__ import annotations

import gzip
import io
import tarfile
from types import SimpleNamespace

import docker.errors
import zstandard

from orchestrator.release import smoke
from orchestrator.release.smoke import bytecode, runner

BASE, TORCH, APP, APP2 = ("sha256:" + c * 64 for c in "abcd")


def layer(*names: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                data = b"x = 1\n"
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


def test_the_key_is_every_layer_but_the_app_on_top():
    assert bytecode.key([BASE, TORCH, APP]) == bytecode.key([BASE, TORCH, APP2])  # an app-only change reuses it
    assert bytecode.key([BASE, TORCH, APP]) != bytecode.key([BASE, APP2, APP])  # other dependencies: another cache
    assert bytecode.key([APP]) is None  # nothing below the top layer: nothing to share


def test_the_top_layers_sources_are_found_by_their_outermost_directories():
    tar = layer("opt/", "opt/app/", "opt/app/app.py", "./opt/app/pkg/util.py", "opt/runtime/contract.py",
                "opt/app/model.bin", "opt/site/x/.wh.gone.py", "etc/hosts")
    assert bytecode.source_dirs(io.BytesIO(tar)) == ["/opt/app", "/opt/runtime"]


def test_the_volume_gets_a_writable_prefix_and_the_parents_of_the_tmpfs_mounts():
    with tarfile.open(fileobj=io.BytesIO(bytecode.skeleton(["/opt/app", "/opt/runtime"]))) as tar:
        dirs = {m.name: m.mode for m in tar}
    assert dirs == {"pyc": 0o1777, "pyc/opt": 0o1777}


def test_a_container_gets_the_volume_a_tmpfs_over_the_apps_part_and_python_told_where():
    m = bytecode.Mounts("orchestrator-pyc-abc", ("/opt/app",), created=False)
    c = runner._container(smoke.Variant("echo", "cpu", "linux/amd64", "img", 8080, "0.1.0", "2.5.1", None, (), (), ""),
                          {}, runner.gpu_mod.decide(None, cuda=False), mounts=m)
    assert c.volumes == {"orchestrator-pyc-abc": {"bind": bytecode.MOUNT, "mode": "rw"}}
    assert c.tmpfs[bytecode.PREFIX + "/opt/app"].startswith("rw,mode=1777")
    assert c.env["PYTHONPYCACHEPREFIX"] == bytecode.PREFIX and c.env["PYTHONDONTWRITEBYTECODE"] == ""
    assert "/tmp" in c.tmpfs  # the contract's own tmpfs are still there


class FakeVolumes:
    def __init__(self):
        self.made: dict[str, dict] = {}
        self.removed: list[str] = []

    def get(self, name):
        if name not in self.made:
            raise docker.errors.NotFound(name)
        return SimpleNamespace(name=name)

    def create(self, name, labels):
        self.made[name] = labels

    def list(self, filters):
        def vol(name, labels):
            return SimpleNamespace(name=name, attrs={"Labels": labels},
                                   remove=lambda: self.removed.append(name))
        return [vol(n, lab) for n, lab in self.made.items()]


class FakeContainers:
    def __init__(self):
        self.archives = []

    def create(self, image, **kw):
        return SimpleNamespace(put_archive=lambda path, data: self.archives.append((image, path, data)),
                               remove=lambda force: None)


def fake_client(images=()):
    return SimpleNamespace(volumes=FakeVolumes(), containers=FakeContainers(),
                           images=SimpleNamespace(list=lambda all: [SimpleNamespace(attrs={"RootFS": {"Layers": x}})
                                                                    for x in images]))


def layers(*blobs: bytes):
    """(sizes, open_layer) for Cache.mounts."""
    return [len(b) for b in blobs], lambda i: io.BytesIO(blobs[i])


def test_one_volume_per_dependency_layers_made_once_and_prepared_once_per_image():
    client = fake_client()
    cache = bytecode.Cache(client)
    base, top = layer("usr/lib/python3.11/__pycache__/os.cpython-311.pyc"), layer("opt/app/app.py")
    first = cache.mounts("sha256:img1", [BASE, TORCH, APP], *layers(base, b"", top))
    again = cache.mounts("sha256:img1", [BASE, TORCH, APP], *layers(base, b"", top))
    app_change = bytecode.Cache(client).mounts("sha256:img2", [BASE, TORCH, APP2], *layers(base, b"", top))
    assert first is again and first.created and not app_change.created
    assert first.volume == app_change.volume == bytecode.volume_name(bytecode.key([BASE, TORCH, APP]))
    assert first.top_dirs == ("/opt/app",)
    # The new volume got the skeleton and the base's bytecode; the image after the app change, the skeleton.
    assert [a[0] for a in client.containers.archives] == ["sha256:img1", "sha256:img1", "sha256:img2"]
    assert client.volumes.made[first.volume] == {bytecode.LABEL: bytecode.key([BASE, TORCH, APP])}


def test_a_new_volume_is_seeded_with_the_bases_own_bytecode_where_the_prefix_looks_for_it():
    base = layer("usr/lib/python3.11/os.py", "usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
                 "./usr/lib/python3/dist-packages/pip/__pycache__/__init__.cpython-311.opt-1.pyc",
                 "usr/lib/python3.11/__pycache__/notes.txt")
    with tarfile.open(fileobj=io.BytesIO(bytecode.seed(io.BytesIO(base)))) as tar:
        entries = {m.name: (m.isdir(), m.mode) for m in tar}
    assert entries["pyc/usr/lib/python3.11/os.cpython-311.pyc"] == (False, 0o644)
    assert entries["pyc/usr/lib/python3/dist-packages/pip/__init__.cpython-311.opt-1.pyc"] == (False, 0o644)
    assert entries["pyc/usr/lib/python3.11"] == (True, 0o1777)  # the service adds its own beside them
    assert not any(name.endswith((".txt", ".py")) or "__pycache__" in name for name in entries)


def test_no_cache_where_the_top_layer_cannot_be_read_cheaply():
    cache = bytecode.Cache(fake_client())
    sizes, open_layer = layers(b"", b"")
    assert cache.mounts("sha256:i", [BASE, APP], [0, bytecode.MAX_TOP_LAYER + 1], open_layer) is None
    assert cache.mounts("sha256:i", [APP], sizes[:1], open_layer) is None  # one layer: nothing below the app
    assert not cache.used


def test_volumes_no_image_in_the_engine_uses_are_pruned():
    client = fake_client(images=[[BASE, TORCH, APP2]])
    kept, gone = bytecode.key([BASE, TORCH, APP]), bytecode.key([BASE, APP])
    client.volumes.create(bytecode.volume_name(kept), {bytecode.LABEL: kept})
    client.volumes.create(bytecode.volume_name(gone), {bytecode.LABEL: gone})
    assert bytecode.prune(client) == [bytecode.volume_name(gone)]


def test_it_can_be_turned_off():
    assert bytecode.enabled({}) and bytecode.enabled({bytecode.ENV: "1"})
    assert not bytecode.enabled({bytecode.ENV: "0"}) and not bytecode.enabled({bytecode.ENV: "off"})


def test_layers_are_read_whole_whether_several_gzip_members_or_zstd():
    raw = gzip.decompress(layer("opt/app/app.py", "opt/runtime/contract.py"))
    half = len(raw) // 2  # the tool's blobs are gzip members of fixed-size chunks, one after the other
    members = gzip.compress(raw[:half]) + gzip.compress(raw[half:])
    assert bytecode.source_dirs(io.BytesIO(members)) == ["/opt/app", "/opt/runtime"]
    assert bytecode.source_dirs(io.BytesIO(zstandard.ZstdCompressor().compress(raw))) == ["/opt/app", "/opt/runtime"]
