"""engine.down stops exactly the registry engine.up started, with real (fake) processes.

A fake registry is /bin/sh under the name docker-registry: `docker-registry
serve CONFIG` then runs the script `serve` from its working directory, which
waits on a FIFO nobody writes. Its command line is what a real registry's is, so the code
that finds registries in /proc sees it as one; none of them listens anywhere,
and the shared registry on 127.0.0.1:5000 is never touched.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.machine import registry_server


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Start fake registries (by path of config); every one left is stopped afterwards."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    (bin_dir / "docker-registry").symlink_to("/bin/sh")
    os.mkfifo(work / "never")
    (work / "serve").write_text("read line < never\n")  # the shell itself waits (no writer comes): no child
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(work)  # start() runs `docker-registry serve CONFIG` from here
    state = tmp_path / "state"
    monkeypatch.setenv("ORCH_STATE_DIR", str(state))
    started: list[subprocess.Popen] = []

    class Fakes:
        config = state / "registry.yml"

        def by_hand(self, config: Path) -> int:
            """A registry someone started themselves: nothing recorded."""
            proc = subprocess.Popen([str(bin_dir / "docker-registry"), "serve", str(config)], cwd=work)
            started.append(proc)
            wait_until(lambda: registry_server.serving(config) == [proc.pid])
            return proc.pid

        def alive(self, pid: int) -> bool:
            return registry_server._alive(pid)

    yield Fakes()
    for proc in started:
        proc.kill()
        proc.wait()
    for pid in registry_server.serving(Fakes.config):  # those start() made
        os.kill(pid, 9)


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_down_stops_the_registry_engine_up_started_and_no_other(fakes, tmp_path):
    ours = registry_server.start(fakes.config, tmp_path / "registry.log")
    wait_until(lambda: registry_server.serving(fakes.config) == [ours])
    # Another registry whose config path begins like ours: a loose pattern would catch it.
    other = fakes.by_hand(Path(f"{fakes.config.parent}-other/registry.yml"))
    assert registry_server.pid_file(fakes.config).read_text().strip() == str(ours)

    said = registry_server.down()

    assert said == [f"stopped docker-registry (pid {ours}, serving {fakes.config})"]
    wait_until(lambda: not fakes.alive(ours))
    assert fakes.alive(other)
    assert not registry_server.pid_file(fakes.config).exists()
    assert registry_server.down() == ["nothing of ours was running"]


def test_down_leaves_a_registry_it_did_not_start_running_and_says_how_to_stop_it(fakes):
    theirs = fakes.by_hand(fakes.config)  # our config, but started by hand: no pid recorded

    [said] = registry_server.down()

    assert f"(pid {theirs}) was not started by engine.up here" in said and f"kill {theirs}" in said
    assert fakes.alive(theirs)


def test_a_recorded_pid_that_now_serves_another_config_is_left_alone(fakes, tmp_path):
    other = fakes.by_hand(tmp_path / "elsewhere" / "registry.yml")
    registry_server.pid_file(fakes.config).parent.mkdir(parents=True, exist_ok=True)
    registry_server.pid_file(fakes.config).write_text(f"{other}\n")  # a stale record whose pid was reused

    assert registry_server.down() == ["nothing of ours was running"]
    assert fakes.alive(other)
    assert not registry_server.pid_file(fakes.config).exists()


def test_down_leaves_a_registry_serving_another_config_alone(fakes):
    # Its config's path begins with our state directory's: `pkill -f "docker-registry serve <state>"` matched it.
    other = fakes.by_hand(Path(f"{fakes.config.parent}-other/registry.yml"))

    assert registry_server.down() == ["nothing of ours was running"]
    assert fakes.alive(other)
