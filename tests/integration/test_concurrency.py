"""Two `invoke build` runs on one project at once: the second waits for the first, then re-uses
what it pushed; the registry, the locks and the project's files come out as after one run."""

from __future__ import annotations

import json
import subprocess

import pytest

from orchestrator.oci.registry import Registry, split_ref

from ..conftest import ROOT, cleanup_namespace, ready_mini

INVOKE = str(ROOT / ".venv" / "bin" / "invoke")


@pytest.fixture
def project(engine_ready, tmp_path):
    """The mini fixture under a namespace of its own, locked and with a pinned base (as mini_project)."""
    proj = ready_mini(tmp_path)
    yield proj
    cleanup_namespace(proj)


def invoke(*args: str) -> subprocess.Popen:
    return subprocess.Popen([INVOKE, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_builds_at_once_serialize_and_the_second_reuses_what_the_first_pushed(project):
    cmd = ["build", "--project", str(project.file), "--backend", "cpu", "--platform", "linux/amd64", "--json"]
    runs = [invoke(*cmd), invoke(*cmd)]
    outputs = [p.communicate(timeout=1800) for p in runs]
    for p, (out, err) in zip(runs, outputs):
        assert p.returncode == 0, err[-3000:]

    waited = [i for i, (_, err) in enumerate(outputs) if "waiting for another build of this project (pid" in err]
    assert len(waited) == 1, [err[-2000:] for _, err in outputs]
    second = waited[0]
    first = 1 - second
    assert f"(pid {runs[first].pid})" in outputs[second][1]

    results = [json.loads(out) for out, _ in outputs]
    assert {(r["image"], r["content_tag"], r["ref"]) for r in results[first]} == \
        {(r["image"], r["content_tag"], r["ref"]) for r in results[second]}
    assert all(not r["built"] and r["uploaded_bytes"] == 0 for r in results[second])

    # The registry holds exactly what one run pushed, under the digests it reported.
    reg = Registry(project.registry)
    for r in results[first]:
        _, name, tag = split_ref(f"{r['ref'].split('@')[0]}:{r['content_tag']}")
        assert reg.tags(name) == [r["content_tag"]]
        assert reg.get_manifest(name, r["content_tag"]).digest == r["ref"].split("@")[1]

    # Locks and state are intact: the locks are fresh, nothing half-written or staged is left behind.
    check = subprocess.run([INVOKE, "lock", "--check", "--project", str(project.file)], cwd=ROOT,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    leftovers = [p for p in project.root.rglob("*") if p.name.endswith(".tmp") or
                 (p.parent.name == "ctx" and p.parent.parent.name == ".build")]
    assert leftovers == []
