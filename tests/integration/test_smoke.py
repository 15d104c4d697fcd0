"""`invoke smoke` against real containers: passing variants, and images that
are broken in the ways users meet (a CUDA-libs layer without libcudart, a
service that never becomes ready) failing for the right reason."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
import uuid

import pytest

from orchestrator import flow
from orchestrator.machine import daemon
from orchestrator.oci.registry import Registry, split_ref
from orchestrator.release import smoke

from ..conftest import release_kept

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def all_variants(mini_project, first_build, local_images):
    """By (service, backend, platform); their images are in the engine (tests/conftest.py local_images)."""
    return {(v.service, v.backend, v.platform): v for v in flow.variants(mini_project)}


@pytest.fixture(scope="module")
def mini_variants(all_variants):
    """The native (amd64) variants by (service, backend)."""
    return {(s, b): v for (s, b, p), v in all_variants.items() if p == "linux/amd64"}


def smoked(published) -> dict:
    """The session's publish smoke-tested every variant before promoting (tests/conftest.py `published`):
    its results by (service, backend, platform), read here rather than run again."""
    return {(r.variant.service, r.variant.backend, r.variant.platform): r for r in published.smoke}


def test_every_variant_of_the_fixture_passes_the_smoke(mini_project, published, all_variants):
    results = list(smoked(published).values())
    assert len(results) == len(published.smoke) == len(all_variants)
    # What was smoked is what the fixture's current inputs build, by digest.
    assert {(r.variant.service, r.variant.backend, r.variant.platform): r.variant.image for r in results} == \
        {k: v.image for k, v in all_variants.items()}
    # Backend names are free-form: cuda13 and cuda are two CUDA lines, arm64 only for 13.0.
    assert {(r.variant.backend, r.variant.platform) for r in results} == {
        ("cuda13", "linux/amd64"), ("cuda13", "linux/arm64"), ("cuda", "linux/amd64"),
        ("cpu", "linux/amd64"), ("cpu", "linux/arm64")}
    for r in results:
        assert r.ok, (r.variant.backend, r.variant.platform, [(c.name, c.detail) for c in r.failures()])
    names = {c.name for r in results for c in r.checks}
    assert {"/health", "/ready", "/info", "non-root user", "labels", "env defaults", "cuda-libs layer"} <= names
    arm = next(r for r in results if (r.variant.backend, r.variant.platform) == ("cuda13", "linux/arm64"))
    checks = {c.name: c for c in arm.checks}
    # Under QEMU: import, probe (cudart 13 of the arm64 layer) and fallback; no GPU is ever handed to it.
    assert "13000" in checks["cuda-libs layer"].detail and "backend_effective='cpu'" in checks["/info"].detail
    assert checks["strict exits 78"].ok


@contextlib.contextmanager
def fresh_cpu_variant(project):
    """An app-only change built and pushed: a digest the engine has never seen; with its config digest.

    The shared fixture's app.py and registry tags are put back afterwards: later modules build from them.
    """
    app = project.services["echo"].path / "app.py"
    original = app.read_bytes()
    with release_kept(project):
        try:
            app.write_text(original.decode() + f"\n# release {uuid.uuid4()}\n")
            results = flow.build(project, backends=["cpu"], platforms=["linux/amd64"], log=lambda *_: None)
            variant = next(v for v in smoke.variants_from_builds(project, results))
            _, name, digest = split_ref(variant.image)
            yield variant, Registry(project.registry).get_manifest(name, digest).json["config"]["digest"]
        finally:
            app.write_bytes(original)


def test_smoke_runs_the_published_config_loaded_from_the_tools_blobs_not_pulled(mini_project, first_build):
    with fresh_cpu_variant(mini_project) as (variant, config):
        _smoke_runs_the_published_config(mini_project, variant, config)


def _smoke_runs_the_published_config(mini_project, variant, config):
    client = daemon.docker_client()
    with pytest.raises(Exception):  # not in the engine yet
        client.images.get(config)
    [result] = smoke.run([variant], client, log=lambda *_: None, ready_timeout=60)
    assert result.ok, [(c.name, c.detail) for c in result.failures()]
    image = {c.name: c for c in result.checks}["image"]
    # The engine names the image by its config digest, the one the registry serves for this manifest.
    assert image.detail.startswith(f"engine image ID {config[:19]} = the published config digest of "
                                   f"{variant.image.split('@')[1][:19]}"), image.detail
    # Only the new app layer travelled: the base, Debian and Python layers were in the engine already.
    layers = len(json.loads(Registry(mini_project.registry).get_blob(
        split_ref(variant.image)[1], config))["rootfs"]["diff_ids"])
    assert f"1 of {layers} layers sent" in image.detail and "from the blob cache" in image.detail, image.detail
    assert client.images.get(config).id == config
    assert not any(f"{variant.image.split('@')[0]}@" in d for d in client.images.get(config).attrs["RepoDigests"])
    # Python's bytecode came from the cache the session's publish filled for the same dependency layers;
    # the changed app's own was compiled in the container (a tmpfs over its part of the cache).
    assert result.bytecode.startswith("volume orchestrator-pyc-") and "(reused)" in result.bytecode, result.bytecode
    assert "/opt/app" in result.bytecode


def test_beyond_the_disk_budget_smoke_untags_what_it_loaded(mini_project, first_build, tmp_path, monkeypatch):
    with fresh_cpu_variant(mini_project) as (variant, config):
        _smoke_untags_beyond_the_budget(variant, config, tmp_path, monkeypatch)


def _smoke_untags_beyond_the_budget(variant, config, tmp_path, monkeypatch):
    client = daemon.docker_client()
    # A record of its own (nothing another run keeps is touched) and a budget of 0: keep nothing after a group.
    monkeypatch.setenv("ORCH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("ORCH_SMOKE_KEEP_GB", "0")
    lines: list[str] = []
    [result] = smoke.run([variant], client, log=lines.append, ready_timeout=60)
    assert result.ok and "loaded" in {c.name: c for c in result.checks}["image"].detail
    tag = f"{variant.image.split('@')[0]}:smoke-{config[7:19]}"
    assert any("untagged 1 image(s) least recently used beyond the disk budget (0 GB (ORCH_SMOKE_KEEP_GB))"
               in line and tag in line for line in lines), lines
    with pytest.raises(Exception):  # smoke's tag was its only name: the engine deleted the image
        client.images.get(config)


@pytest.mark.parametrize("backend,cudart", [("cuda13", "libcudart.so.13"), ("cuda", "libcudart.so.12")])
def test_the_cuda_image_serves_on_the_backend_this_host_can_run(published, backend, cudart):
    gpu = smoke.host_gpu_request(daemon.docker_client())  # what the publish's smoke handed its containers
    r = smoked(published)[("echo", backend, "linux/amd64")]
    checks = {c.name: c for c in r.checks}
    assert r.ok, [(c.name, c.detail) for c in r.failures()]
    assert cudart in checks["cuda-libs layer"].detail  # found through CUDA_RUNTIME_LIB
    if gpu.requested and "strict exits 78" not in checks:  # a GPU host this line can drive serves on cuda
        assert "backend_effective='cuda'" in checks["/info"].detail
        return
    assert "backend_effective='cpu'" in checks["/info"].detail
    assert "backend_reason=" in checks["/info"].detail  # /info says why it serves on CPU
    assert checks["strict exits 78"].ok, checks["strict exits 78"].detail
    seconds = float(checks["strict exits 78"].detail.split(" after ")[1].split(" s")[0])
    assert seconds < 10  # measured well under 2 s; generous here, no timing claims in tests
    assert f"entrypoint: {backend} backend unusable here" in checks["strict exits 78"].detail
    if not gpu.requested:
        assert "libcuda.so.1 not found" in checks["strict exits 78"].detail


@pytest.fixture
def derived_image(mini_variants):
    """Build an image FROM a good variant with a change; remove it afterwards."""
    client = daemon.docker_client()
    made = []

    def make(variant, dockerfile_tail: str):
        tag = f"orch-broken-{len(made)}-{int(time.time())}:test"
        text = f"FROM {variant.image}\n{dockerfile_tail}\n"
        client.images.build(fileobj=io.BytesIO(text.encode()), tag=tag, rm=True)
        made.append(tag)
        return smoke.Variant(variant.service, variant.backend, variant.platform, tag, variant.port,
                             variant.version, variant.torch, variant.cuda, variant.archs)

    yield make
    for tag in made:
        client.images.remove(tag, force=True)


@pytest.mark.parametrize("backend,rm,cudart", [("cuda", "nvidia/cuda_runtime", "libcudart.so.12"),
                                               ("cuda13", "nvidia/cu13/lib/libcudart.so.13", "libcudart.so.13")])
def test_a_cuda_libs_layer_without_libcudart_fails_the_smoke(mini_variants, derived_image, backend, rm, cudart):
    broken = derived_image(mini_variants[("echo", backend)],
                           f"USER root\nRUN rm -rf /opt/site/cuda-libs/{rm}\nUSER 10001:10001")
    r = smoke.check_variant(broken, gpu=False, ready_timeout=60)
    assert not r.ok
    failed = {c.name: c.detail for c in r.failures()}
    assert "cuda-libs layer" in failed and cudart in failed["cuda-libs layer"]


def test_a_service_that_never_becomes_ready_fails_the_smoke_with_its_logs(mini_variants):
    r = smoke.check_variant(mini_variants[("echo", "cpu")], gpu=False, ready_timeout=5,
                            env={"LOAD_SECONDS": "3600"})
    assert not r.ok
    failed = {c.name: c.detail for c in r.failures()}
    assert failed["/ready"].startswith("/ready did not turn 200 within 5 s (last answer: 503)")



def test_a_service_that_crashes_at_start_is_reported_at_once_with_its_traceback(mini_variants, derived_image):
    broken = derived_image(mini_variants[("echo", "cpu")],
                           'CMD ["python3", "-c", "import nonexistent_module"]')
    started = time.monotonic()
    r = smoke.check_variant(broken, gpu=False, ready_timeout=60, start_timeout=60)
    elapsed = time.monotonic() - started
    assert not r.ok
    failed = {c.name: c for c in r.failures()}
    health = failed["/health"]
    assert "exited with code 1" in health.detail, health.detail
    assert re.search(r"\(ran \d+\.\d s", health.detail), health.detail  # the engine's own run time
    assert health.timeout == 60
    assert "ModuleNotFoundError" in r.logs, r.logs
    assert "nonexistent_module" in r.logs
    assert elapsed < 10, f"a crash took {elapsed:.1f} s to report"  # polled, not the 60 s start timeout
    assert "/ready" not in {c.name for c in r.checks}  # nothing else is tried on a dead container


def test_a_service_that_never_answers_health_says_what_was_tried(mini_variants, derived_image):
    hung = derived_image(mini_variants[("echo", "cpu")], 'CMD ["python3", "-c", "import time; time.sleep(3600)"]')
    r = smoke.check_variant(hung, gpu=False, ready_timeout=5, start_timeout=3)
    health = {c.name: c for c in r.failures()}["/health"]
    assert health.detail.startswith("/health: no answer within 3 s; tried GET http://"), health.detail
    assert "/health" in health.detail and " times, last: " in health.detail
    assert health.timeout == 3
