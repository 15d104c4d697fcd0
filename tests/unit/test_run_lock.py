"""The run lock (pipeline.run_lock, pipeline.gc_lock), between real processes.

Each process appends "start <name>" and "end <name>" to a journal while it
holds its lock; the journal shows who ran while whom, without timing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from orchestrator import pipeline

HOLD = textwrap.dedent("""
    import sys, types
    from pathlib import Path
    from orchestrator import pipeline
    kind, name, root, registry, state, journal = sys.argv[1:7]
    project = types.SimpleNamespace(root=Path(root), registry=registry)
    lock = (pipeline.gc_lock(registry, state=Path(state)) if kind == "gc"
            else pipeline.run_lock(project, kind, state=Path(state)))
    with lock:
        with open(journal, "a") as fh:
            fh.write(f"start {name}\\n")
        print("held", flush=True)
        sys.stdin.readline()  # hold until the test says so
        with open(journal, "a") as fh:
            fh.write(f"end {name}\\n")
""")


class Holder:
    """A process that takes a lock, reports on stdout when it holds it, and releases it when told."""

    def __init__(self, tmp: Path, kind: str, name: str, project: str = "proj", registry: str = "reg.test:5000"):
        root = tmp / project
        root.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, name, str(root), registry, str(tmp / "state"),
                                      str(tmp / "journal")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_held(self) -> None:
        assert self.proc.stdout.readline() == "held\n", self.proc.stderr.read()

    def wait_waiting(self) -> str:
        """The line it printed on stderr when it found the lock taken (it then blocks)."""
        return self.proc.stderr.readline()

    def release(self) -> str:
        out, err = self.proc.communicate("go\n", timeout=60)
        assert self.proc.returncode == 0, err
        return err


def journal(tmp: Path) -> list[str]:
    return (tmp / "journal").read_text().splitlines()


def test_a_second_run_on_the_same_project_waits_naming_the_first_then_runs(tmp_path):
    first = Holder(tmp_path, "build", "first")
    first.wait_held()
    second = Holder(tmp_path, "publish", "second")
    waiting = second.wait_waiting()
    assert f"waiting for another build of this project (pid {first.proc.pid})" in waiting
    first.release()
    second.wait_held()
    second.release()
    assert journal(tmp_path) == ["start first", "end first", "start second", "end second"]


def test_runs_on_different_projects_push_to_one_registry_together(tmp_path):
    a = Holder(tmp_path, "build", "a", project="one")
    a.wait_held()
    b = Holder(tmp_path, "build", "b", project="two")
    b.wait_held()  # both hold the registry's push lock, shared
    assert "waiting" not in a.release() + b.release()
    assert journal(tmp_path) == ["start a", "start b", "end a", "end b"]


def test_gc_waits_for_pushes_and_pushes_wait_for_gc(tmp_path):
    push = Holder(tmp_path, "publish", "push")
    push.wait_held()
    gc = Holder(tmp_path, "gc", "gc")
    assert f"waiting for pushes to reg.test:5000 to finish (publish, pid {push.proc.pid}" in gc.wait_waiting()
    push.release()
    gc.wait_held()
    later = Holder(tmp_path, "build", "later", project="other")
    assert f"waiting for engine.gc on reg.test:5000 (pid {gc.proc.pid})" in later.wait_waiting()
    gc.release()
    later.wait_held()
    later.release()
    assert journal(tmp_path) == ["start push", "end push", "start gc", "end gc", "start later", "end later"]


def test_a_holder_that_dies_releases_the_lock(tmp_path):
    dead = Holder(tmp_path, "build", "dead")
    dead.wait_held()
    dead.proc.kill()
    dead.proc.wait()
    after = Holder(tmp_path, "build", "after")
    after.wait_held()
    after.release()
    assert journal(tmp_path) == ["start dead", "start after", "end after"]


def test_registry_lock_files_are_per_host_and_name_safe(tmp_path):
    a = pipeline.registry_lock_path("127.0.0.1:5000", tmp_path)
    b = pipeline.registry_lock_path("ghcr.io/acme", tmp_path)
    assert a != b and a.parent == b.parent == tmp_path / "locks"
    assert "/" not in a.name and ":" not in a.name
