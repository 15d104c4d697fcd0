"""Debian system packages in real images (mini fixture): jq for every service, ffmpeg for echo.

Reads as the contract of `system_packages:`: every variant of echo, on
every backend and platform (arm64 under QEMU), decodes an uploaded Ogg
Vorbis file with its own ffmpeg; the layers sit where the README says and
are shared blobs; the same lock gives the same layer from cold caches; and
changing one service's packages re-sends that one layer.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests

from orchestrator.debian import locks as apt_locks
from orchestrator.debian import archive
from orchestrator.debian import layer as apt_layer
from orchestrator.machine import daemon
from orchestrator.oci import layers
from orchestrator.oci.registry import Registry
from orchestrator.project import lock
from orchestrator import flow
from orchestrator.release import smoke

from ..conftest import release_kept, unavailable

pytestmark = pytest.mark.engine

VARIANTS = [("cuda13", "linux/amd64"), ("cuda13", "linux/arm64"), ("cuda", "linux/amd64"),
            ("cpu", "linux/amd64"), ("cpu", "linux/arm64")]


@pytest.fixture(scope="module")
def built(mini_project, first_build):
    """Every image of the fixture, all platforms (a no-op build: first_build pushed them)."""
    return flow.build(mini_project, log=lambda *_: None)


@pytest.fixture(scope="module")
def variants(mini_project, built, local_images):
    """The variants by digest, pulled into the engine (tests/conftest.py local_images)."""
    return {(v.backend, v.platform): v for v in smoke.variants_from_builds(mini_project, built)}


def _pulled(variant) -> str:
    client = daemon.docker_client()
    try:
        client.images.get(variant.image)
    except Exception:  # noqa: BLE001 - not local yet
        client.images.pull(variant.image, platform=variant.platform)
    return variant.image


@pytest.fixture(scope="module")
def ogg(variants, tmp_path_factory) -> bytes:
    """One second of a 440 Hz tone as Ogg Vorbis, made by the ffmpeg inside the amd64 image.

    Not by an arm64 one: under qemu-user, arm64 ffmpeg crashes encoding Vorbis (decoding works).
    Written to a mounted directory: the engine's log stream of a container that exits at once is
    sometimes empty.
    """
    out = tmp_path_factory.mktemp("ogg")
    out.chmod(0o777)  # the image runs as uid 10001
    daemon.docker_client().containers.run(
        _pulled(variants[("cpu", "linux/amd64")]), entrypoint=["ffmpeg"], remove=True,
        volumes={str(out): {"bind": "/out", "mode": "rw"}},
        command=["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                 "-c:a", "libvorbis", "/out/tone.ogg"])
    data = (out / "tone.ogg").read_bytes()
    assert data.startswith(b"OggS") and b"vorbis" in data[:64]
    return data


@pytest.mark.parametrize("backend,platform", VARIANTS, ids=[f"{b}-{p.split('/')[1]}" for b, p in VARIANTS])
def test_every_echo_variant_decodes_an_uploaded_ogg_with_its_own_ffmpeg(variants, ogg, backend, platform):
    variant = variants[(backend, platform)]
    assert variant.system_packages == ("jq", "ffmpeg")
    native = platform == daemon.host_platform()
    container = daemon.docker_client().containers.run(
        _pulled(variant), detach=True, ports={f"{variant.port}/tcp": ("127.0.0.1", None)},
        **({} if native else {"platform": platform}))
    try:
        url = None
        deadline = time.monotonic() + (60 if native else 180)
        while time.monotonic() < deadline:
            container.reload()
            assert container.status not in ("exited", "dead"), container.logs()[-2000:]
            ports = container.attrs["NetworkSettings"]["Ports"].get(f"{variant.port}/tcp")
            if ports:
                url = f"http://127.0.0.1:{ports[0]['HostPort']}"
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
            time.sleep(0.5)
        r = requests.post(f"{url}/decode", data=ogg, timeout=120)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["rate"] == 16000 and 0.9 < got["seconds"] <= 1.05
        assert abs(got["pitch_hz"] - 440) < 10, got  # the tone that went in, decoded on this platform's CPU
        bad = requests.post(f"{url}/decode", data=b"OggS not really", timeout=60)
        assert bad.status_code == 400 and "ffmpeg cannot decode" in bad.json()["error"]
    finally:
        container.remove(force=True)


def test_the_smoke_runs_ffmpeg_and_jq_in_every_variant(published, variants):
    # The session's publish smoke-tested every variant (tests/conftest.py `published`): its results, not a re-run.
    results = {(r.variant.backend, r.variant.platform): r for r in published.smoke if r.variant.service == "echo"}
    assert {k: r.variant.image for k, r in results.items()} == {k: v.image for k, v in variants.items()}
    for key in VARIANTS:
        checks = {c.name: c for c in results[key].checks}
        assert checks["system packages"].ok, checks["system packages"].detail
        assert "ffmpeg: ffmpeg version 5.1" in checks["system packages"].detail
        assert "jq: jq-1.6" in checks["system packages"].detail


def _history(result) -> list[str]:
    """One entry per layer (base, cuda-libs and the image's own), as the tool writes configs."""
    history = [h["created_by"] for h in json.loads(result.assembled.config)["history"]]
    assert len(history) == len(result.assembled.layers)
    return history


def _layer(result, name: str) -> str:
    """The digest of the image's `name` layer (system, system-echo, shared, ...)."""
    i = next(i for i, h in enumerate(_history(result)) if h.startswith(f"orchestrator: {name} layer"))
    return result.assembled.layers[i].digest


def test_the_layers_sit_where_the_readme_says_and_are_one_blob_per_platform(mini_project, built):
    echo = [r for r in built if r.image.key == "echo"]
    for r in echo:
        own = [h.split(": ", 1)[1].split(" layer")[0] for h in _history(r)[-5:]]
        assert own == ["system", "shared", "system-echo", "service-echo", "app"], (r.image.backend.name, own)
        if r.image.backend.is_cuda:  # right above the CUDA libraries, which stay free of any project's packages
            libs = next(x for x in built if x.image.key == "cuda-libs" and x.image.backend.cuda == r.image.backend.cuda
                        and x.image.platform == r.image.platform)
            assert r.assembled.layers[:-5] == libs.assembled.layers
            assert not any("system" in h for h in _history(libs))
        else:
            assert len(r.assembled.layers) == 6  # the base, then its own
    for platform in ("linux/amd64", "linux/arm64"):
        # cuda13, cuda and cpu share both Debian layers of their platform: one blob each.
        assert len({(_layer(r, "system"), _layer(r, "system-echo")) for r in echo if r.image.platform == platform}) == 1


def test_two_cold_builds_of_a_system_layer_give_the_pushed_digest(mini_project, built, tmp_path):
    # Empty apt caches (every .deb downloaded again) and empty layer caches, twice. The 130 MB
    # ffmpeg layer gets the same treatment in test_apt_layer.py.
    lk = apt_locks.load_apt_locks(mini_project)[("linux/arm64", "system")]
    digests = []
    for run in ("one", "two"):
        cache = layers.BlobCache(tmp_path / run / "blobs")
        got = apt_layer.build_layer(lk, cache, layers.codec(mini_project.compression), apt_cache=tmp_path / run / "apt")
        assert got.fragment is not None and got.fragment.downloaded_bytes == sum(p.size for p in lk.pins)
        digests.append((got.layer.diff_id, got.layer.digest))
    shutil.rmtree(tmp_path)
    assert digests[0] == digests[1]
    pushed = next(r for r in built if r.image.key == "echo" and r.image.platform == "linux/arm64")
    assert digests[0][1] == _layer(pushed, "system")


@pytest.fixture
def registry_kept(mini_project):
    """The shared fixture's tags as they were: the images built here are deleted afterwards."""
    with release_kept(mini_project):
        yield


def test_changing_one_services_packages_re_sends_that_layer_only(mini_project, built, registry_kept):
    """echo gains `file`: its system-echo layer is new on each platform; jq, Python, app and CUDA layers
    are not sent again (the registry has them)."""
    import requests as rq

    try:
        rq.head(f"{archive.DEFAULT_MIRROR}/dists/bookworm/InRelease", timeout=15, verify=archive.ca_verify())
    except rq.RequestException as e:
        unavailable(f"the Debian archive is not reachable ({type(e).__name__})")
    pf = mini_project.file
    saved = {p: p.read_bytes() for p in [pf, *(mini_project.root / "locks").glob("apt-*/*.txt")]}
    try:
        pf.write_text(pf.read_text().replace("system_packages: [ffmpeg]", "system_packages: [ffmpeg, file]"))
        project = flow.load_project(str(pf))
        flow.lock(project, log=lambda *_: None)
        flow.render(project)
        before = {(r.image.key, r.image.backend.name, r.image.platform): r for r in built}
        after = flow.build(project, log=lambda *_: None)
        for r in after:
            old = before[(r.image.key, r.image.backend.name, r.image.platform)]
            if r.image.key == "cuda-libs":
                assert not r.built
                continue
            changed = [i for i, (a, b) in enumerate(zip(r.assembled.layers, old.assembled.layers))
                       if a.digest != b.digest]
            assert changed == [len(r.assembled.layers) - 3], r.image.backend.name  # system-echo only
        # Each platform's new layer is sent at most once (the other backends mount or find it; another
        # project on this machine may have sent the same layer to this registry already: then it is mounted
        # from there); nothing else is sent, and each new layer is in the project's repository.
        new = {r.assembled.layers[-3].digest: r.assembled.layers[-3].blob_size for r in after
               if r.image.key == "echo"}
        sent = sum(r.uploaded_bytes for r in after)
        assert len(new) == 2 and sent < sum(new.values()) + 200_000, (sent, new)
        reg = Registry(project.registry)
        assert all(reg.has_blob(f"{project.name}/echo", d) for d in new)
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
        for p in (mini_project.root / "locks").glob("apt-*/*.txt"):
            if p not in saved:
                p.unlink()
        flow.render(flow.load_project(str(pf)))
    assert lock.check(flow.load_project(str(pf))) == []
