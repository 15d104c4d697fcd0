"""Smoke keeps disk in check: variants that share layers run together, and the images a
run pulled are removed when their group is done (they stay in the registry)."""

from __future__ import annotations

from orchestrator import smoke


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


def test_each_group_runs_together_and_leaves_no_pulled_image_behind(monkeypatch):
    log: list = []
    chosen = [_variant("tts", "cuda", "linux/amd64"), _variant("tts", "cpu", "linux/amd64"),
              _variant("stt", "cuda", "linux/amd64"), _variant("stt", "cpu", "linux/amd64")]
    already_here = chosen[1].image

    def check(v, gpu, ready_timeout):
        log.append(("checked", v.image))
        return smoke.VariantResult(v, [smoke.Check("/health", True, "")], pulled=v.image != already_here)

    monkeypatch.setattr(smoke, "check_variant", check)
    monkeypatch.setattr(smoke, "host_gpu_request", lambda: type("G", (), {"description": "none"})())
    monkeypatch.setattr(smoke.engine, "docker_client", lambda *a, **k: FakeClient(log))
    results = smoke.run(None, log=lambda *_: None, chosen=chosen)
    assert [r.variant for r in results] == chosen  # reported in the order asked
    tts_cuda, stt_cuda = chosen[0].image, chosen[2].image
    assert log == [("checked", tts_cuda), ("checked", stt_cuda), ("removed", tts_cuda), ("removed", stt_cuda),
                   ("checked", chosen[1].image), ("checked", chosen[3].image), ("removed", chosen[3].image)]
