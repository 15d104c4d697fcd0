"""The run lock (flow.run_lock, flow.gc_lock, and the push lock engine.up holds), between real processes.

Each process appends "start <name>" and "end <name>" to a journal while it
holds its lock; the journal shows who ran while whom, without timing.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

from orchestrator import flow

HOLD = textwrap.dedent("""
    import os, sys, types
    from pathlib import Path
    from orchestrator import flow
    kind, name, root, registry, state, journal = sys.argv[1:7]
    project = types.SimpleNamespace(root=Path(root), registry=registry, platforms=("linux/amd64",))

    def hold():
        with open(journal, "a") as fh:
            fh.write(f"start {name}\\n")
        print("held", flush=True)
        sys.stdin.readline()  # hold until the test says so
        with open(journal, "a") as fh:
            fh.write(f"end {name}\\n")

    if kind == "engine.up":  # the machine left as it is; the base push is what holds
        os.environ["ORCH_STATE_DIR"] = state
        flow.preflight.ensure = lambda *args, **kwargs: None
        flow.daemon.ensure_engine = lambda: "running"
        flow.registry_server.ensure_registry = lambda host: "answering"
        flow.daemon.base_platforms = lambda project: ["linux/amd64"]
        flow.daemon.host_platform = lambda: "linux/amd64"
        flow.bases_mod.ensure = lambda project, platform, log, defer: (hold(), (None, "pushed"))[1]
        flow.engine_up(project, log=lambda *_: None)
    else:
        lock = (flow.gc_lock(registry, state=Path(state)) if kind == "gc"
                else flow.run_lock(project, kind, state=Path(state)))
        with lock:
            hold()
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


def first_said(holder: Holder, timeout: float = 60) -> str:
    """What a holder says first: "held" (stdout) or why it waits (stderr); fails rather than hangs."""
    ready, _, _ = select.select([holder.proc.stdout, holder.proc.stderr], [], [], timeout)
    assert ready, f"nothing said within {timeout:.0f} s"
    return ready[0].readline()


def test_gc_waits_for_engine_up_pushing_a_base(tmp_path):
    up = Holder(tmp_path, "engine.up", "up")
    up.wait_held()  # inside the base push
    gc = Holder(tmp_path, "gc", "gc")
    try:
        assert f"waiting for pushes to reg.test:5000 to finish (engine.up, pid {up.proc.pid}" in first_said(gc)
        up.release()
        gc.wait_held()
        gc.release()
    finally:
        for holder in (up, gc):
            if holder.proc.poll() is None:
                holder.proc.kill()
    assert journal(tmp_path) == ["start up", "end up", "start gc", "end gc"]


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
    a = flow.registry_lock_path("127.0.0.1:5000", tmp_path)
    b = flow.registry_lock_path("ghcr.io/acme", tmp_path)
    assert a != b and a.parent == b.parent == tmp_path / "locks"
    assert "/" not in a.name and ":" not in a.name


LATE = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(0.3)  # the window between taking the lock and writing the record
    os.pwrite(fd, f"{os.getpid()} build".ljust(119).encode() + b"\\n", 0)
    sys.stdin.readline()
""")


def test_a_waiter_that_comes_before_the_holder_wrote_its_record_still_names_it(tmp_path):
    from orchestrator.common.files import held

    path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", LATE, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline() == "locked\n"
    seen: list[str] = []
    try:
        with held(path, note="publish", on_wait=lambda h: (seen.append(h), holder.stdin.write("go\n"),
                                                         holder.stdin.flush())):
            pass
    finally:
        holder.wait(timeout=60)
    assert seen == [f"{holder.pid} build"]


def test_an_exclusive_holder_leaves_no_record_behind(tmp_path):
    from orchestrator.common.files import _holder, held

    path = tmp_path / "run.lock"
    with held(path, note="build"):
        pass
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _holder(fd) == ""  # the next waiter says "unknown", never a pid that has left
    finally:
        os.close(fd)
