"""Smoke runs group by group: the variants that share layers come into the engine together, in one
load, then run at once; after each group the images smoke keeps are held to the disk budget (the group
being tested is never evicted while it runs)."""

from __future__ import annotations

import threading

import pytest

from orchestrator.release import smoke
from orchestrator.release.smoke import runner


def _variant(service: str, backend: str, platform: str) -> smoke.Variant:
    return smoke.Variant(service, backend, platform, f"reg/{service}@sha256:{backend}-{platform}", 8000, "0.1.0",
                         None, None)


class FakeImages:
    """Stands in for images.EngineImages: records what the runner asks of it."""

    def __init__(self, log):
        self.log = log

    def prepare(self, wanted):
        self.log.append(("prepare", sorted(ref for ref, _ in wanted)))
        return {}

    def image_ids(self, refs):
        return {f"id-of-{r}" for r in refs}

    def trim(self, keep=frozenset()):
        self.log.append(("trim", sorted(keep)))
        return []


class FakeClient:
    pass


@pytest.fixture
def engine_log(monkeypatch):
    log: list = []
    monkeypatch.setattr(runner.images_mod, "EngineImages", lambda client, **kw: FakeImages(log))
    return log


NO_GPU = type("G", (), {"description": "none"})()


def test_each_group_is_loaded_whole_before_its_checks_and_no_group_being_checked_is_evicted(
        monkeypatch, engine_log):
    chosen = [_variant("tts", "cuda", "linux/amd64"), _variant("tts", "cpu", "linux/arm64"),
              _variant("stt", "cuda", "linux/amd64"), _variant("stt", "cpu", "linux/arm64")]

    def check(v, gpu, ready_timeout, session):
        engine_log.append(("checked", v.image))
        return smoke.VariantResult(v, [smoke.Check("/health", True, "")])

    monkeypatch.setattr(runner, "check_variant", check)
    monkeypatch.setattr(runner, "host_gpu_request", lambda client: NO_GPU)
    monkeypatch.setattr(runner, "native", lambda v, engine_platform=None: v.platform == "linux/amd64")
    results = smoke.run(chosen, FakeClient(), log=lambda *_: None, jobs=2)
    assert [r.variant for r in results] == chosen  # reported in the order asked
    cuda, cpu = sorted([chosen[0].image, chosen[2].image]), sorted([chosen[1].image, chosen[3].image])
    ids = lambda refs: [f"id-of-{r}" for r in refs]  # noqa: E731
    prepares = [e for e in engine_log if e[0] == "prepare"]
    # The emulated group first (it takes longest), then the native one; each loaded whole before its checks.
    assert prepares == [("prepare", cpu), ("prepare", cuda)]
    for group in (cpu, cuda):
        loaded = engine_log.index(("prepare", group))
        assert all(engine_log.index(("checked", ref)) > loaded for ref in group)
    # Each load is followed by the budget, the group just loaded kept above it if need be, with any group
    # whose checks still run; when the run is over nothing is held.
    trims = [e for e in engine_log if e[0] == "trim"]
    assert trims[0] == ("trim", ids(cpu)) and set(ids(cuda)) <= set(trims[1][1]) <= set(ids(cpu) + ids(cuda))
    assert engine_log[-1] == ("trim", []) and len(trims) == 3


def test_the_variants_of_a_group_run_at_once_and_are_reported_whole_in_order(monkeypatch, engine_log):
    chosen = [_variant("tts", "cpu", "linux/arm64"), _variant("stt", "cpu", "linux/arm64")]
    both_started = threading.Barrier(2, timeout=10)  # each check waits for the other: only passes if concurrent

    def check(v, gpu, ready_timeout, session):
        both_started.wait()
        return smoke.VariantResult(v, [smoke.Check("/health", True, f"{v.service} up")])

    monkeypatch.setattr(runner, "check_variant", check)
    monkeypatch.setattr(runner, "host_gpu_request", lambda client: NO_GPU)
    lines: list[str] = []
    smoke.run(chosen, FakeClient(), log=lines.append, jobs=2)
    assert lines[1] == "smoke cpu linux/arm64: 2 variants, 2 at once"
    assert lines[-4:] == ["tts/cpu linux/arm64:", "  ok   /health: tts up", "stt/cpu linux/arm64:", "  ok   /health: stt up"]


def test_a_failed_check_stops_the_others_containers_and_is_raised(monkeypatch, engine_log):
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
        smoke.run(chosen, FakeClient(), log=lambda *_: None, jobs=2)
    assert stopped.is_set()


def test_a_halted_run_refuses_new_containers_and_leaves_other_runs_alone(engine_log):
    halted, other = runner.Session(FakeClient(), NO_GPU), runner.Session(FakeClient(), NO_GPU)
    halted.halt()
    with pytest.raises(runner.Halted):
        halted.track(object())
    other.track(object())  # the halt is that run's, not the module's
