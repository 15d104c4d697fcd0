"""Two `invoke build` runs on one project at once: the second waits for the first, then re-uses
what it pushed; the registry, the locks and the project's files come out as after one run."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest

from orchestrator.flow import RUN_LOCK
from orchestrator.oci.registry import Registry, split_ref

from ..conftest import ROOT, cleanup_namespace, ready_mini

INVOKE = str(ROOT / ".venv" / "bin" / "invoke")


@pytest.fixture
def project(engine_ready, tmp_path):
    """The mini fixture under a namespace of its own, locked and with a pinned base (as mini_project)."""
    proj = ready_mini(tmp_path)
    yield proj
    cleanup_namespace(proj)


class Run:
    """An `invoke` process whose stdout and stderr are read as they come (stderr to watch for a line)."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([INVOKE, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=lambda f=f, sink=sink: sink.extend(f), daemon=True)
                        for f, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    def finish(self, timeout: float = 1800) -> tuple[str, str]:
        self.proc.wait(timeout=timeout)
        for t in self.readers:
            t.join(timeout=10)
        return "".join(self.out), "".join(self.err)


def until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_builds_at_once_serialize_and_the_second_reuses_what_the_first_pushed(project):
    cmd = ["build", "--project", str(project.file), "--backend", "cpu", "--platform", "linux/amd64", "--json"]
    # The overlap is made certain, not left to start-up timing (a build from warm caches takes about a second):
    # the first run is paused while it holds the project's run lock, the second starts and must say it waits.
    lock = project.root / RUN_LOCK
    first = Run(*cmd)
    until(lambda: lock.is_file() and lock.read_text().startswith(f"{first.proc.pid} "),
          "the first build to take the run lock")
    first.proc.send_signal(signal.SIGSTOP)
    try:
        second = Run(*cmd)
        until(lambda: "waiting for another build of this project" in "".join(second.err),
              "the second build to wait")
    finally:
        first.proc.send_signal(signal.SIGCONT)
    outputs = [first.finish(), second.finish()]
    for run, (_, err) in zip((first, second), outputs):
        assert run.proc.returncode == 0, err[-3000:]

    assert "waiting for another" not in outputs[0][1]
    assert f"waiting for another build of this project (pid {first.proc.pid})" in outputs[1][1]

    results = [json.loads(out) for out, _ in outputs]
    assert {(r["image"], r["content_tag"], r["ref"]) for r in results[0]} == \
        {(r["image"], r["content_tag"], r["ref"]) for r in results[1]}
    assert all(not r["built"] and r["uploaded_bytes"] == 0 for r in results[1])

    # The registry holds exactly what one run pushed, under the digests it reported.
    reg = Registry(project.registry)
    for r in results[0]:
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
