"""Resolving locks with uv against the real index (needs PyPI, not the engine)."""

from __future__ import annotations

import shutil

import pytest

from orchestrator.project import lock
from orchestrator import flow
from orchestrator.project import spec

from ..conftest import FIXTURES


@pytest.fixture
def mini(tmp_path):
    shutil.copytree(FIXTURES / "mini", tmp_path / "mini")
    return tmp_path / "mini"


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_text() for p in (root / "locks").rglob("*.txt")}


def test_a_service_dependency_bump_changes_only_that_service_lock(mini):
    before = snapshot(mini)
    (mini / "requirements" / "echo.in").write_text("six==1.17.0\n")
    changed = flow.lock(spec.load(mini / "project.yaml"), log=lambda *_: None)
    after = snapshot(mini)
    assert sorted(p.relative_to(mini).as_posix() for p in changed) == [
        "locks/cpu-amd64/service-echo.txt", "locks/cpu-arm64/service-echo.txt", "locks/cuda-amd64/service-echo.txt",
        "locks/cuda13-amd64/service-echo.txt", "locks/cuda13-arm64/service-echo.txt"]
    assert {k: v for k, v in after.items() if "service-echo" not in k} == \
        {k: v for k, v in before.items() if "service-echo" not in k}
    assert "six==1.17.0" in after["locks/cuda-amd64/service-echo.txt"]
    assert lock.check(spec.load(mini / "project.yaml")) == []


def test_two_services_needing_the_same_package_each_get_it_in_their_own_layer(mini):
    shutil.copytree(mini / "services" / "echo", mini / "services" / "echo2")
    (mini / "requirements" / "echo2.in").write_text("six==1.16.0\n")
    pf = mini / "project.yaml"
    pf.write_text(pf.read_text() + """  echo2:
    path: services/echo2
    requirements: requirements/echo2.in
    command: [python3, app.py]
    port: 8080
""")
    flow.lock(spec.load(pf), log=lambda *_: None)
    for target in ("cuda-amd64", "cpu-amd64"):
        for svc in ("echo", "echo2"):
            assert "six==1.16.0" in (mini / "locks" / target / f"service-{svc}.txt").read_text()


def test_re_running_lock_with_nothing_changed_resolves_nothing(mini):
    before = snapshot(mini)
    messages = []
    assert flow.lock(spec.load(mini / "project.yaml"), log=messages.append) == []
    assert snapshot(mini) == before
    assert all("up to date" in m for m in messages)
