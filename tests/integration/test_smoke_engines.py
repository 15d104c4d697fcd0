"""Smoke records against real containers: what ran, on which engine, and what publish promotes on them.

- A variant whose service cannot start under QEMU (a torch that crashes on
  import there; played here by the mini fixture's arm64 cuda13 image with
  an emulation blocker) runs what QEMU allows and is "partial", with why;
  no check claims the service.
- `smoke.engines` sends a platform to another engine: a second dockerd on
  this machine (the second_engine fixture) runs the linux/amd64 variants,
  and its own event stream shows their containers.
- publish refuses a partial variant the project does not name, promotes
  it where `smoke.allow_partial` names it (the backend manifest says so),
  and a re-run reuses the records and uploads nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time

import docker
import pytest

from orchestrator import flow
from orchestrator.machine import daemon
from orchestrator.oci import backends
from orchestrator.oci.registry import Registry, split_ref
from orchestrator.project import spec
from orchestrator.release import publish, smoke

from ..conftest import cleanup_namespace, ready_mini

pytestmark = pytest.mark.engine

ARM, AMD = "linux/arm64", "linux/amd64"
BLOCKER = "stand-in: this image's torch crashes on import under qemu-user"


def quiet(*_):
    pass


def blocked(variants):
    """The arm64 cuda13 variant as a torch that crashes under QEMU would be: the compat data's blocker set."""
    return [dataclasses.replace(v, emulation_blocker=BLOCKER) if (v.backend, v.platform) == ("cuda13", ARM) else v
            for v in variants]


@pytest.fixture(scope="module")
def variants(mini_project, first_build):
    return {(v.service, v.backend, v.platform): v for v in flow.variants(mini_project)}


def test_a_service_that_cannot_start_under_emulation_is_partial_and_says_why(variants):
    [arm] = blocked([variants[("echo", "cuda13", ARM)]])
    r = smoke.check_variant(arm, gpu=False, ready_timeout=60)
    checks = {c.name: c for c in r.checks}
    print(json.dumps(r.as_json(), indent=1)[:3000])
    assert r.ok, [(c.name, c.detail) for c in r.failures()]
    assert r.result == "partial" and not r.service_started and r.answered == []
    assert r.not_started.startswith(f"not started under emulation ({ARM} under QEMU on the default engine") \
        and BLOCKER in r.not_started
    # What QEMU allows ran in the real image: the entrypoint's probe of the arm64 CUDA-libs layer, strict exit 78.
    assert "13000" in checks["cuda-libs layer"].detail and checks["strict exits 78"].ok
    assert not any("not started" in name for name in checks)  # no passing stand-in for the service
    assert r.record()["service"] == {"started": False, "answered": [], "why_not": r.not_started}


def test_a_platform_named_in_smoke_engines_is_smoke_tested_on_that_engine(mini_project, first_build, second_engine):
    engines = {AMD: spec.Builder(second_engine.address, None, f"smoke.engines.{AMD}")}
    project = dataclasses.replace(mini_project, smoke=spec.SmokeSettings(engines))
    second = docker.DockerClient(base_url=second_engine.address)
    since = int(time.time()) - 1
    logged: list[str] = []
    results = flow.smoke(project, backends=["cpu"], platforms=[AMD], log=logged.append, ready_timeout=60)
    until = int(time.time()) + 1
    print("\n".join(logged))
    [r] = results
    assert r.ok, [(c.name, c.detail) for c in r.failures()]
    assert (r.result, r.engine, r.native) == ("ran", f"smoke.engines.{AMD}", True)
    assert r.answered == ["/health", "/ready", "/info"]
    assert any(line.startswith(f"smoke {AMD} on smoke.engines.{AMD}, a linux/amd64 engine") for line in logged)
    # The second engine got the image (loaded from the tool's blobs: it runs on this machine) and started the
    # service from it, by the image ID that is the published config digest.
    _, name, digest = split_ref(r.variant.image)
    config = Registry(mini_project.registry, login=mini_project.login).get_manifest(name, digest).json["config"]["digest"]
    started = [e for e in second.events(since=since, until=until, decode=True,
                                        filters={"type": "container", "event": "start"})]
    assert any(e.get("from") in (r.variant.image, config) for e in started), started
    # ... and the shared engine started none for it.
    default = [e for e in daemon.docker_client().events(since=since, until=until, decode=True,
                                                        filters={"type": "container", "event": "start"})
               if e.get("from") in (r.variant.image, config)]
    assert default == []


@pytest.fixture
def cuda13_project(engine_ready, tmp_path):
    """The mini fixture with its cuda13 line only, under its own namespace; its tags deleted afterwards."""
    def only_cuda13(d):
        pf = d / "project.yaml"
        text = pf.read_text()
        start, end = text.index("  cuda:\n"), text.index("layers:\n")
        text = text[:start] + text[end:]  # drops backends cuda and cpu, and the 12.4 line's CUDA-libs wheels
        pf.write_text(text.replace('    "12.4": [nvidia-cuda-runtime-cu12]\n', ""))

    project = ready_mini(tmp_path, "orch-partial", edit=only_cuda13)
    try:
        yield project
    finally:
        cleanup_namespace(project)


def test_publish_promotes_a_partial_variant_only_where_the_project_names_it(cuda13_project, monkeypatch):
    project = cuda13_project
    assert set(project.backends) == {"cuda13"}
    real = smoke.variants_from_builds
    monkeypatch.setattr(flow.smoke_mod, "variants_from_builds", lambda p, results: blocked(real(p, results)))
    reg = Registry(project.registry)
    name = f"{project.name}/echo"

    with pytest.raises(publish.PartialNotAllowed) as refused:
        flow.publish(project, log=quiet)
    print(refused.value.message, refused.value.hint, sep="\n")
    assert "echo/cuda13 linux/arm64" in refused.value.message and BLOCKER in refused.value.message
    assert "0.1.0-backends" not in reg.tags(name) and "0.1.0-cuda13" not in reg.tags(name)  # nothing promoted

    project.file.write_text(project.file.read_text() + 'smoke:\n  allow_partial: ["echo/cuda13 linux/arm64"]\n')
    allowed = spec.load(project.file)
    logged: list[str] = []
    report = flow.publish(allowed, log=logged.append)
    print("\n".join(logged))
    manifest = backends.fetch_manifest(f"{allowed.repository('echo')}:0.1.0-backends")
    assert manifest["smoke"] == {"ran": True, "variants": 2, "partial": ["echo/cuda13 linux/arm64"]}
    arm = manifest["platforms"][ARM]["backends"]["cuda13"]["smoke"]
    amd = manifest["platforms"][AMD]["backends"]["cuda13"]["smoke"]
    assert arm["result"] == "partial" and arm["allowed_by"] == "smoke.allow_partial" and arm["native"] is False
    assert arm["service"]["started"] is False and BLOCKER in arm["service"]["why_not"]
    assert "strict exits 78" in arm["checks"] and "cuda-libs layer" in arm["checks"]
    assert amd["result"] == "ran" and amd["service"] == {"started": True, "answered": ["/health", "/ready", "/info"]}
    assert any(line.startswith("smoke: echo/cuda13 linux/arm64 is partial") for line in logged)
    assert {r.result for r in report.smoke} == {"ran", "partial"}

    # Nothing changed: nothing is tested again, the records stand, and nothing is uploaded.
    again = flow.publish(allowed, log=quiet)
    assert again.smoke == [] and len(again.reused) == 2
    assert again.uploaded_bytes == 0 and again.artifacts == report.artifacts
    assert backends.fetch_manifest(f"{allowed.repository('echo')}:0.1.0-backends") == manifest
