"""Publish smoke-tests a backend+platform group as soon as its images are in the registry,
while the rest still builds: the cuda images' pull overlaps the cpu and arm64 builds."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from orchestrator import smoke


def _plan(service: str, backend: str, platform: str, kind: str = "service"):
    return SimpleNamespace(kind=kind, service=SimpleNamespace(name=service), backend=SimpleNamespace(name=backend),
                           platform=platform)


def _result(image):
    return SimpleNamespace(image=image, digest=f"sha256:{image.service.name}-{image.backend.name}-{image.platform}")


def _fakes(monkeypatch, checked: list, gate: threading.Event | None = None):
    def variants_from_builds(project, results):
        return [smoke.Variant(r.image.service.name, r.image.backend.name, r.image.platform, f"reg@{r.digest}",
                              8000, "0.1.0", None, None) for r in results]

    def check(v, gpu, ready_timeout):
        checked.append(v.image)
        if gate is not None:
            gate.set()
        return smoke.VariantResult(v, [smoke.Check("/health", True, "up")])

    monkeypatch.setattr(smoke, "variants_from_builds", variants_from_builds)
    monkeypatch.setattr(smoke, "check_variant", check)
    monkeypatch.setattr(smoke, "host_gpu_request", lambda: SimpleNamespace(description="none"))
    monkeypatch.setattr(smoke, "_remove_pulled", lambda results: None)


def test_a_group_is_checked_once_all_its_images_are_up_while_other_groups_still_build(monkeypatch):
    checked: list = []
    started = threading.Event()
    _fakes(monkeypatch, checked, started)
    libs, tts_cuda, stt_cuda = (_plan("cuda-libs", "cuda", "linux/amd64", "cuda-libs"),
                                _plan("tts", "cuda", "linux/amd64"), _plan("stt", "cuda", "linux/amd64"))
    tts_cpu, stt_cpu = _plan("tts", "cpu", "linux/amd64"), _plan("stt", "cpu", "linux/amd64")
    ahead = smoke.Ahead(None, log=lambda *_: None, jobs=2)
    ahead.planned([libs, tts_cuda, stt_cuda, tts_cpu, stt_cpu])
    ahead.pushed(_result(libs))  # not a service: nothing to smoke
    ahead.pushed(_result(tts_cuda))
    assert not started.wait(0.3)  # half a group: not yet
    ahead.pushed(_result(stt_cuda))
    assert started.wait(10)  # the cuda group runs while the cpu images are still building
    assert all("cpu" not in image for image in checked)
    ahead.pushed(_result(tts_cpu))
    ahead.pushed(_result(stt_cpu))
    results = ahead.finish()
    assert [(r.variant.service, r.variant.backend) for r in results] == [
        ("stt", "cuda"), ("tts", "cuda"), ("stt", "cpu"), ("tts", "cpu")]  # group by group, as the groups came up
    assert all(r.ok for r in results)


def test_images_that_passed_smoke_in_the_promoted_release_are_not_checked_again(monkeypatch):
    checked: list = []
    _fakes(monkeypatch, checked)
    tts, stt = _plan("tts", "cpu", "linux/arm64"), _plan("stt", "cpu", "linux/arm64")
    ahead = smoke.Ahead(None, skip=lambda: {f"reg@{_result(tts).digest}"}, log=lambda *_: None)
    ahead.planned([tts, stt])
    ahead.pushed(_result(tts))
    ahead.pushed(_result(stt))
    results = ahead.finish()
    assert checked == [f"reg@{_result(stt).digest}"]
    assert [r.variant.service for r in results] == ["stt"] and ahead.skipped == 1


def test_stop_ends_the_checks_of_a_failed_publish_and_leaves_the_next_run_unhalted(monkeypatch):
    checked: list = []
    _fakes(monkeypatch, checked)
    ahead = smoke.Ahead(None, log=lambda *_: None)
    ahead.planned([_plan("tts", "cpu", "linux/amd64"), _plan("stt", "cpu", "linux/amd64")])
    ahead.pushed(_result(_plan("tts", "cpu", "linux/amd64")))  # the build failed before stt was up
    ahead.stop()
    assert not ahead.thread.is_alive()
    assert checked == []
    assert not smoke._halt.is_set()
