"""Smoke keeps disk in check: variants that share layers run together, and the images a
run pulled are removed when their group is done (they stay in the registry)."""

from __future__ import annotations

import threading

import pytest

from orchestrator.release import smoke
from orchestrator.release.smoke import runner


def _variant(service: str, backend: str, platform: str) -> smoke.Variant:
    return smoke.Variant(service, backend, platform, f"reg/{service}@sha256:{backend}-{platform}", 8000, "0.1.0",
                         None, None)


class FakeImages:
    def __init__(self, log):
        self.log = log

    def remove(self, ref):
        self.log.append(("removed", ref))


class FakeClient:
    def __init__(self, log):
        self.images = FakeImages(log)


NO_GPU = type("G", (), {"description": "none"})()


def test_each_group_runs_together_and_leaves_no_pulled_image_behind(monkeypatch):
    log: list = []
    chosen = [_variant("tts", "cuda", "linux/amd64"), _variant("tts", "cpu", "linux/amd64"),
              _variant("stt", "cuda", "linux/amd64"), _variant("stt", "cpu", "linux/amd64")]
    already_here = chosen[1].image

    def check(v, gpu, ready_timeout, session):
        log.append(("checked", v.image))
        return smoke.VariantResult(v, [smoke.Check("/health", True, "")], pulled=v.image != already_here)

    monkeypatch.setattr(runner, "check_variant", check)
    monkeypatch.setattr(runner, "host_gpu_request", lambda client: NO_GPU)
    results = smoke.run(chosen, FakeClient(log), log=lambda *_: None, jobs=2)
    assert [r.variant for r in results] == chosen  # reported in the order asked
    tts_cuda, stt_cuda = chosen[0].image, chosen[2].image
    # the cuda group (checked at once, in either order), its pulls removed, then the cpu group
    assert sorted(log[:2]) == sorted([("checked", tts_cuda), ("checked", stt_cuda)])
    assert log[2:4] == [("removed", tts_cuda), ("removed", stt_cuda)]
    assert sorted(log[4:6]) == sorted([("checked", chosen[1].image), ("checked", chosen[3].image)])
    assert log[6:] == [("removed", chosen[3].image)]  # the cpu tts image was there before the run: kept


def test_the_variants_of_a_group_run_at_once_and_are_reported_whole_in_order(monkeypatch):
    chosen = [_variant("tts", "cpu", "linux/arm64"), _variant("stt", "cpu", "linux/arm64")]
    both_started = threading.Barrier(2, timeout=10)  # each check waits for the other: only passes if concurrent

    def check(v, gpu, ready_timeout, session):
        both_started.wait()
        return smoke.VariantResult(v, [smoke.Check("/health", True, f"{v.service} up")])

    monkeypatch.setattr(runner, "check_variant", check)
    monkeypatch.setattr(runner, "host_gpu_request", lambda client: NO_GPU)
    lines: list[str] = []
    smoke.run(chosen, FakeClient([]), log=lines.append, jobs=2)
    assert lines[1] == "smoke cpu linux/arm64: 2 variants, 2 at once"
    assert lines[-4:] == ["tts/cpu linux/arm64:", "  ok   /health: tts up", "stt/cpu linux/arm64:", "  ok   /health: stt up"]


def test_a_failed_check_stops_the_others_containers_and_is_raised(monkeypatch):
    chosen = [_variant("tts", "cpu", "linux/amd64"), _variant("stt", "cpu", "linux/amd64")]
    stopped, started = threading.Event(), threading.Event()

    class Running:
        def stop(self):
            stopped.set()

    def check(v, gpu, ready_timeout, session):
        if v.service == "tts":
            assert started.wait(10)
            raise RuntimeError("the engine went away")
        session.track(Running())
        started.set()
        assert stopped.wait(10)  # ended by run(), not by a timeout
        return smoke.VariantResult(v, [smoke.Check("/health", False, "stopped")])

    monkeypatch.setattr(runner, "check_variant", check)
    monkeypatch.setattr(runner, "host_gpu_request", lambda client: NO_GPU)
    with pytest.raises(RuntimeError, match="engine went away"):
        smoke.run(chosen, FakeClient([]), log=lambda *_: None, jobs=2)
    assert stopped.is_set()


def test_a_halted_run_refuses_new_containers_and_leaves_other_runs_alone():
    halted, other = runner.Session(FakeClient([]), NO_GPU), runner.Session(FakeClient([]), NO_GPU)
    halted.halt()
    with pytest.raises(runner.Halted):
        halted.track(object())
    other.track(object())  # the halt is that run's, not the module's
