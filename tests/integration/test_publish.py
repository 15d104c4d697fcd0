"""Publishing, selection and the launcher against the real registry and engine.

The mini fixture publishes a cpu index for linux/amd64 + linux/arm64 and a
cuda index for linux/amd64, then one backend manifest per service.
"""

from __future__ import annotations

import json
import uuid

import pytest

from orchestrator import flow
from orchestrator.build import export
from orchestrator.oci import backends
from orchestrator.machine import daemon
from orchestrator.host import launch
from orchestrator.host import probe
from orchestrator.release import publish
from orchestrator.host import select
from orchestrator.common.errors import EnvironmentProblem
from orchestrator.oci.registry import OCI_INDEX, Registry

from ..conftest import release_kept

pytestmark = pytest.mark.engine


def index_platforms(reg, name, tag) -> list[str]:
    m = reg.get_manifest(name, tag)
    assert m.media_type == OCI_INDEX
    return sorted(f"{d['platform']['os']}/{d['platform']['architecture']}" for d in m.json["manifests"])


def test_the_registry_holds_an_index_per_backend_over_the_platforms_each_supports(mini_project, published):
    reg = Registry(mini_project.registry)
    name = f"{mini_project.name}/echo"
    platforms = {b: index_platforms(reg, name, f"0.1.0-{b}") for b in ("cpu", "cuda", "cuda13")}
    assert platforms == {"cpu": ["linux/amd64", "linux/arm64"], "cuda": ["linux/amd64"],
                         "cuda13": ["linux/amd64", "linux/arm64"]}


def test_each_cuda_line_has_its_own_cuda_libs_image_shared_as_one_blob(mini_project, published):
    reg = Registry(mini_project.registry)
    libs = f"{mini_project.name}/cuda-libs"
    assert index_platforms(reg, libs, "cu124-v1") == ["linux/amd64"]
    assert index_platforms(reg, libs, "cu130-v1") == ["linux/amd64", "linux/arm64"]
    manifest = json.loads(published.manifests["echo"].read_text())
    amd64 = manifest["platforms"]["linux/amd64"]["backends"]
    for backend, tag in (("cuda", "cu124-v1"), ("cuda13", "cu130-v1")):
        assert amd64[backend]["cuda_libs"]["tag"] == tag
        libs_layers = [d["digest"] for d in reg.get_manifest(libs, amd64[backend]["cuda_libs"]["digest"]).json["layers"]]
        repo, digest = amd64[backend]["image"].split("@")
        echo_layers = [d["digest"] for d in reg.get_manifest(repo.split("/", 1)[1], digest).json["layers"]]
        assert echo_layers[: len(libs_layers)] == libs_layers  # the service image stacks on the line's libs
    assert amd64["cuda"]["cuda_libs"]["digest"] != amd64["cuda13"]["cuda_libs"]["digest"]


def test_the_backend_manifest_is_an_artifact_naming_only_digests_that_exist(mini_project, published):
    reg = Registry(mini_project.registry)
    name = f"{mini_project.name}/echo"
    artifact = reg.get_manifest(name, "0.1.0-backends").json
    assert artifact["artifactType"] == backends.ARTIFACT_TYPE
    assert artifact["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
    manifest = backends.fetch_manifest(f"{mini_project.repository('echo')}:0.1.0-backends")
    on_disk = json.loads(published.manifests["echo"].read_text())
    assert manifest == on_disk
    amd64 = manifest["platforms"]["linux/amd64"]
    assert manifest["schemaVersion"] == 2
    # Newest CUDA line first, then older lines, then cpu.
    assert amd64["default"] == "cuda13" and amd64["fallback"] == ["cuda13", "cuda", "cpu"]
    assert amd64["backends"]["cuda"]["requires"] == {"cuda": "12.4", "driver": ">=525.60.13"}  # no torch: no archs
    assert amd64["backends"]["cuda13"]["requires"] == {"cuda": "13.0", "driver": ">=580.65.06"}
    assert manifest["platforms"]["linux/arm64"]["fallback"] == ["cuda13", "cpu"]
    assert manifest["smoke"] == {"ran": True, "variants": 5}
    for entry in manifest["platforms"].values():
        for spec in entry["backends"].values():
            for ref in (spec["image"], spec["index"]):
                repo, digest = ref.split("@")
                assert reg.has_manifest(repo.split("/", 1)[1], digest), ref
            if "cuda_libs" in spec:
                assert reg.has_manifest(f"{mini_project.name}/cuda-libs", spec["cuda_libs"]["digest"])


def test_a_second_publish_with_nothing_changed_uploads_zero_bytes(mini_project, published):
    again = flow.publish(mini_project, log=lambda *_: None)
    assert again.uploaded_bytes == 0
    assert again.artifacts == published.artifacts


def test_select_on_this_gpu_less_host_picks_cpu_by_digest_and_says_why(mini_project, published, tmp_path):
    manifest = backends.fetch_manifest(f"{mini_project.repository('echo')}:0.1.0-backends")
    choice = select.select(manifest, probe.probe(tmp_path, machine="x86_64"))
    assert choice.backend == "cpu" and "@sha256:" in choice.image
    assert choice.image == manifest["platforms"]["linux/amd64"]["backends"]["cpu"]["image"]
    assert choice.reasons[0].startswith("cuda13: skipped, no NVIDIA driver")
    assert choice.reasons[1].startswith("cuda: skipped, no NVIDIA driver")
    arm = select.select(manifest, probe.probe(tmp_path, machine="aarch64"))
    assert arm.platform == "linux/arm64" and arm.backend == "cpu"


def test_run_starts_the_first_backend_this_host_can_serve(mini_project, published):
    from orchestrator.release import smoke

    manifest = backends.fetch_manifest(f"{mini_project.repository('echo')}:0.1.0-backends")
    name = f"orch-test-run-{uuid.uuid4().hex[:6]}"
    try:
        result = launch.launch(daemon.docker_client(), manifest, "linux/amd64", 8080, name, log=lambda *_: None)
        if smoke.host_has_gpu(daemon.docker_client()):  # the default, cuda13, serves at once
            assert [(a.backend, a.outcome) for a in result.attempts] == [("cuda13", "serving")]
            return
        first, older, second = result.attempts
        assert (first.backend, first.outcome) == ("cuda13", "exit 78")
        assert (older.backend, older.outcome) == ("cuda", "exit 78")
        assert "libcuda.so.1 not found" in first.detail
        assert (second.backend, second.outcome, result.backend) == ("cpu", "serving", "cpu")
        assert first.exit_code == 78
        # The engine's own clock: the first container had exited before the second started.
        assert None not in (first.container_started, first.container_finished, second.container_started)
        assert first.container_started <= first.container_finished <= second.container_started
        assert second.serving_since is not None and second.serving_since >= second.container_started
        # Real fallback latency: first container's start -> second serving /health. Bounded, not timed:
        # without the exit-78 handover it would be a health timeout (180 s).
        assert result.fallback_latency == second.serving_since - first.container_started
        assert 0 < result.fallback_latency < 30, result.fallback_latency
        assert 0 <= result.restart_gap < 30, result.restart_gap
    finally:
        try:
            daemon.docker_client().containers.get(name).remove(force=True)
        except Exception:  # noqa: BLE001
            pass


def test_a_publish_that_fails_midway_leaves_the_previous_backend_manifest(mini_project, published, monkeypatch):
    reg = Registry(mini_project.registry)
    name = f"{mini_project.name}/echo"
    before = {t: reg.get_manifest(name, t).digest for t in ("0.1.0-backends", "0.1.0-cpu", "0.1.0-cuda")}
    app = mini_project.services["echo"].path / "app.py"
    original = app.read_text()
    app.write_text(original + f"\n# release {uuid.uuid4()}\n")
    real = export.export_stage

    def fail_on_arm64(image, *args, **kwargs):
        if image.platform == "linux/arm64":
            raise EnvironmentProblem("simulated failure: the arm64 builder died")
        return real(image, *args, **kwargs)

    monkeypatch.setattr(export, "export_stage", fail_on_arm64)
    try:
        with release_kept(mini_project), pytest.raises(EnvironmentProblem, match="arm64 builder died"):
            flow.publish(mini_project, log=lambda *_: None)
    finally:
        app.write_text(original)
    after = {t: reg.get_manifest(name, t).digest for t in before}
    assert after == before


def test_a_release_whose_service_crashes_at_start_promotes_nothing(mini_project, published, local_images):
    reg = Registry(mini_project.registry)
    name = f"{mini_project.name}/echo"
    before = {t: reg.get_manifest(name, t).digest for t in ("0.1.0-backends", "0.1.0-cpu", "0.1.0-cuda")}
    app = mini_project.services["echo"].path / "app.py"
    original = app.read_text()
    app.write_text("import no_such_module_in_this_image  # crashes at start\n" + original)
    try:
        with release_kept(mini_project), pytest.raises(publish.SmokeFailed, match="nothing was promoted") as failure:
            flow.publish(mini_project, log=lambda *_: None)
    finally:
        app.write_text(original)
    assert {r.variant.backend for r in failure.value.failed} >= {"cpu"}
    assert any("no_such_module_in_this_image" in r.logs for r in failure.value.failed)
    assert {t: reg.get_manifest(name, t).digest for t in before} == before  # nothing promoted


def test_publish_without_smoke_says_so_in_the_manifest(mini_project, published):
    reg = Registry(mini_project.registry)
    name = f"{mini_project.name}/echo"
    with release_kept(mini_project):  # back to the smoke-tested release for later tests: the old manifests re-pushed
        report = flow.publish(mini_project, log=lambda *_: None, smoke=False)
        manifest = json.loads(report.manifests["echo"].read_text())
        assert manifest["smoke"] == {"ran": False, "variants": 0}
        served = backends.fetch_manifest(f"{mini_project.repository('echo')}:0.1.0-backends")
        assert served["smoke"] == {"ran": False, "variants": 0}
        assert report.artifacts["echo"] != published.artifacts["echo"]
    assert reg.get_manifest(name, "0.1.0-backends").digest == published.artifacts["echo"].split("@")[1]
    assert json.loads(published.manifests["echo"].read_text())["smoke"] == {"ran": True, "variants": 5}
