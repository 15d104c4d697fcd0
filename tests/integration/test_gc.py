"""engine.gc on a private docker-registry (its own port and storage, never the shared 127.0.0.1:5000):
the retention policy deletes old unreferenced content tags, keeps what human tags and backend
manifests name (and the newest of each image line, and the images those are built on), frees their
blobs, and waits for pushes that hold the registry's push lock."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest

from orchestrator.oci import backends
from orchestrator import flow
from orchestrator.machine import registry_server
from orchestrator.release import gc as gc_mod
from orchestrator.oci.image import OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, canonical
from orchestrator.oci.registry import Registry

from ..conftest import ROOT, unavailable
from .conftest import _free_port

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DAY = 86400.0


@pytest.fixture
def private_registry(tmp_path):
    """docker-registry serving plain HTTP on a free loopback port from tmp_path (the embedded config's shape)."""
    if not shutil.which("docker-registry"):
        unavailable("Debian's docker-registry is not installed (ci/setup.sh installs it)")
    host = f"127.0.0.1:{_free_port()}"
    config = tmp_path / "registry.yml"
    config.write_text(registry_server.REGISTRY_CONFIG.format(root=tmp_path / "data", addr=host))
    registry_server.serve(config, host, tmp_path / "registry.log")
    try:
        yield types.SimpleNamespace(host=host, config=config, storage=tmp_path / "data", state=tmp_path / "state")
    finally:
        registry_server.stop(config)  # the one gc restarted, if it did


class Pusher:
    """Tiny images pushed the way build and publish push them (the tool's registry client)."""

    def __init__(self, registry):
        self.reg = Registry(registry.host)
        self.storage = registry.storage
        self.now = time.time()

    def blob(self, repo: str, name: str, size: int) -> dict:
        data = name.encode().ljust(size, b"\0")  # distinct bytes per name, any size
        digest, _ = self.reg.upload_blob(repo, data)
        return {"mediaType": LAYER, "digest": digest, "size": len(data)}

    def image(self, repo: str, tag: str, layers: list[tuple[str, int]], days_ago: float, ours: bool = True,
              arch: str = "amd64") -> dict:
        descs = [self.blob(repo, name, size) for name, size in layers]
        labels = {"io.orchestrator.backend": "cpu"} if ours else {}
        config = canonical({"architecture": arch, "os": "linux", "config": {"Labels": labels},
                            "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]}})
        cfg_digest, _ = self.reg.upload_blob(repo, config)
        body = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                          "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": len(config)},
                          "layers": descs})
        digest, _ = self.reg.put_manifest_if_changed(repo, tag, body, OCI_MANIFEST)
        self.age(repo, tag, days_ago)
        return {"repo": repo, "tag": tag, "digest": digest, "layers": [d["digest"] for d in descs],
                "size": len(body) + len(config) + sum(d["size"] for d in descs)}

    def index(self, repo: str, tag: str, children: list[dict]) -> str:
        body = canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": c["digest"], "size": len(self.reg.get_manifest(repo, c["digest"]).body),
             "platform": {"architecture": "amd64", "os": "linux"}} for c in children]})
        digest, _ = self.reg.put_manifest_if_changed(repo, tag, body, OCI_INDEX)
        return digest

    def age(self, repo: str, tag: str, days_ago: float) -> None:
        """Date the tag's push (the registry's tag link), as if it had been pushed days_ago."""
        link = self.storage / "docker/registry/v2/repositories" / repo / "_manifests/tags" / tag / "current/link"
        os.utime(link, (self.now - days_ago * DAY, self.now - days_ago * DAY))


def pullable(reg: Registry, image: dict) -> bool:
    m = reg.get_manifest(image["repo"], image["digest"])
    if m is None:
        return False
    body = m.json
    for d in [body["config"], *body["layers"]]:
        reg.get_blob(image["repo"], d["digest"])  # checks the digest
    return True


def test_gc_keeps_what_is_referenced_and_the_newest_and_frees_the_rest(private_registry, tmp_path):
    p = Pusher(private_registry)
    KB = 1024
    base = p.image("p/base", "amd64-2252b38e9e8bcc5d-gzip", [("base", 50 * KB)], 30, ours=False)
    libs = {n: p.image("p/cuda-libs", f"cu124-{n * 12}", [("base", 50 * KB), (f"cudart-{n}", 200 * KB)], days)
            for n, days in (("0", 9), ("1", 8), ("2", 7), ("3", 1))}
    cpu_old = p.image("p/svc", "0.1.0-cpu-" + "a" * 12, [("base", 50 * KB), ("app-a", 300 * KB)], 6)
    cpu_pub = p.image("p/svc", "0.1.0-cpu-" + "b" * 12, [("base", 50 * KB), ("app-b", 300 * KB)], 5)
    cpu_new = p.image("p/svc", "0.1.0-cpu-" + "c" * 12, [("base", 50 * KB), ("app-c", 300 * KB)], 2)
    cuda_old = p.image("p/svc", "0.1.0-cuda-" + "d" * 12, [("base", 50 * KB), ("cudart-0", 200 * KB),
                                                             ("app-d", 300 * KB)], 6)
    cuda_pub = p.image("p/svc", "0.1.0-cuda-" + "e" * 12, [("base", 50 * KB), ("cudart-1", 200 * KB),
                                                             ("app-e", 300 * KB)], 5)
    cuda_new = p.image("p/svc", "0.1.0-cuda-" + "f" * 12, [("base", 50 * KB), ("cudart-2", 200 * KB),
                                                             ("app-f", 300 * KB)], 2)
    foreign = p.image("other/app", "v1-0123456789ab", [("foreign", 100 * KB)], 40, ours=False)
    cpu_index = p.index("p/svc", "0.1.0-cpu", [cpu_pub])
    cuda_index = p.index("p/svc", "0.1.0-cuda", [cuda_pub])
    manifest = {"schemaVersion": 2, "project": "p", "service": "svc", "version": "0.1.0", "smoke": {"ran": False},
                "platforms": {"linux/amd64": {"default": "cuda", "fallback": ["cuda", "cpu"], "backends": {
                    "cuda": {"image": f"{p.reg.host}/p/svc@{cuda_pub['digest']}",
                             "index": f"{p.reg.host}/p/svc@{cuda_index}", "size": cuda_pub["size"],
                             "requires": {"cuda": "12.4"},
                             "cuda_libs": {"tag": "cu124-v1", "digest": libs["1"]["digest"]}},
                    "cpu": {"image": f"{p.reg.host}/p/svc@{cpu_pub['digest']}",
                            "index": f"{p.reg.host}/p/svc@{cpu_index}", "size": cpu_pub["size"]}}}}}
    backends.validate(manifest, "test manifest")
    backends.push_artifact(p.reg, "p/svc", backends.artifact_tag("0.1.0"), backends.manifest_bytes(manifest), "m.json")

    kept = [base, libs["1"], libs["2"], libs["3"], cpu_pub, cpu_new, cuda_pub, cuda_new, foreign]
    gone = [libs["0"], cpu_old, cuda_old]
    host, config = private_registry.host, private_registry.config
    tags_before = {r: p.reg.tags(r) for r in ("p/base", "p/cuda-libs", "p/svc", "other/app")}

    # A dry run says what would go, and changes nothing.
    lines: list[str] = []
    dry = flow.gc(host, keep=1, dry_run=True, log=lines.append, config=config, state=private_registry.state)
    print("\n".join(lines + [dry.summary()]))
    assert {(d.repository, t) for d in dry.plan.delete for t in d.tags} == {(g["repo"], g["tag"]) for g in gone}
    assert dry.summary().startswith("dry run: would delete 3 content tag(s)")
    assert {r: p.reg.tags(r) for r in tags_before} == tags_before

    # A push holds the registry's push lock: gc waits for it, and deletes nothing meanwhile.
    held, release, said = threading.Event(), threading.Event(), queue.Queue()
    pusher_project = types.SimpleNamespace(root=tmp_path / "pusher", registry=host)

    def push():
        with flow.run_lock(pusher_project, "publish", state=private_registry.state):
            held.set()
            release.wait()

    def collect():
        try:
            said.put(flow.gc(host, keep=1, log=lambda m: said.put(m), config=config,
                                 state=private_registry.state))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            said.put(e)

    pushing = threading.Thread(target=push)
    pushing.start()
    assert held.wait(60)
    collecting = threading.Thread(target=collect)
    collecting.start()
    first = said.get(timeout=60)
    assert isinstance(first, str) and first.startswith(f"waiting for pushes to {host} to finish (publish, pid "), first
    assert {r: p.reg.tags(r) for r in tags_before} == tags_before
    release.set()
    pushing.join()
    collecting.join()
    messages = []
    while not said.empty():
        messages.append(said.get())
    report = messages[-1]
    assert not isinstance(report, BaseException), report
    print("\n".join(str(m) for m in messages[:-1]) + "\n" + report.summary())

    reg = Registry(host)  # the registry was stopped for garbage-collect and is back
    assert reg.ping()
    for image in kept:
        assert image["tag"] in reg.tags(image["repo"]), image["tag"]
        assert pullable(reg, image), image["tag"]
    for image in gone:
        assert image["tag"] not in reg.tags(image["repo"])
        assert reg.get_manifest(image["repo"], image["digest"]) is None
    # What only deleted images held is gone from the storage, and the space with it.
    kept_layers = {layer for image in kept for layer in image["layers"]}
    for image in gone:
        for layer in set(image["layers"]) - kept_layers:
            assert not reg.has_blob(image["repo"], layer)
    assert report.plan.deleted_tags == 3
    assert report.freed >= 200 * KB + 300 * KB + 300 * KB  # cudart-0, app-a, app-d
    assert report.summary().startswith("deleted 3 content tag(s) (3 manifests in 2 repositories)")
    # The backend manifest still reads, and everything it names is there.
    assert json.loads(reg.get_blob("p/svc", reg.get_manifest("p/svc", "0.1.0-backends").json["layers"][0]["digest"])) \
        == manifest


# `invoke smoke` builds and pushes what is missing before it runs anything: flow.smoke, in a process of
# its own, with the build (flow.variants) replaced by a wait the test ends.
SMOKE_THAT_BUILDS = textwrap.dedent("""
    import sys, types
    from pathlib import Path
    from orchestrator import flow

    def build_and_push(*args, **kwargs):
        print("building", flush=True)
        sys.stdin.readline()
        raise SystemExit(0)

    flow.variants = build_and_push
    flow.smoke(types.SimpleNamespace(root=Path(sys.argv[1]), registry=sys.argv[2]), log=lambda *_: None)
""")


def test_gc_waits_for_a_smoke_run_that_builds_in_another_process_and_says_so(private_registry, tmp_path):
    p = Pusher(private_registry)
    old = p.image("p/svc", "0.1.0-cpu-" + "a" * 12, [("app-a", 10 * 1024)], 6)
    new = p.image("p/svc", "0.1.0-cpu-" + "b" * 12, [("app-b", 10 * 1024)], 1)
    host, config, state = private_registry.host, private_registry.config, private_registry.state
    (tmp_path / "proj").mkdir()
    env = {**os.environ, "ORCH_STATE_DIR": str(state), "PYTHONPATH": str(ROOT)}
    smoke = subprocess.Popen([sys.executable, "-c", SMOKE_THAT_BUILDS, str(tmp_path / "proj"), host], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    said: queue.Queue = queue.Queue()

    def collect():
        try:
            said.put(flow.gc(host, keep=1, log=said.put, config=config, state=state))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            said.put(e)

    collecting = threading.Thread(target=collect)
    try:
        assert smoke.stdout.readline() == "building\n"
        collecting.start()
        first = said.get(timeout=60)
        assert isinstance(first, str) and first.startswith(
            f"waiting for pushes to {host} to finish (smoke, pid {smoke.pid} "), first
        assert old["tag"] in p.reg.tags("p/svc")  # nothing deleted while smoke may still push
        smoke.communicate("go\n", timeout=60)
    finally:
        if smoke.poll() is None:
            smoke.kill()
            smoke.wait()
        if collecting.ident is not None:
            collecting.join(120)  # gc restarts the registry: the fixture stops it only after that
    messages = [said.get() for _ in range(said.qsize())]
    report = messages[-1]
    assert not isinstance(report, BaseException), report
    assert report.plan.deleted_tags == 1
    assert p.reg.tags("p/svc") == [new["tag"]]


def test_gc_refuses_a_config_that_serves_another_address(private_registry, tmp_path):
    from orchestrator.common.errors import UserError

    other = tmp_path / "other.yml"
    other.write_text(registry_server.REGISTRY_CONFIG.format(root=tmp_path / "x", addr="127.0.0.1:1"))
    with pytest.raises(UserError, match="serves 127.0.0.1:1"):
        gc_mod.gc(private_registry.host, 1, dry_run=True, config=other)


def test_gc_of_a_registry_that_is_not_embedded_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_STATE_DIR", str(tmp_path))
    assert "not the embedded registry" in gc_mod.gc("ghcr.io/acme", 1, dry_run=True)


def test_gc_refuses_a_negative_keep():
    from orchestrator.common.errors import UserError

    with pytest.raises(UserError, match="--keep -1"):
        gc_mod.gc("127.0.0.1:5000", -1, dry_run=True)
