"""The command line a user types: discoverable tasks, documented options,
and input errors that exit 2 with one message and no traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from ..conftest import FIXTURES, ROOT

TASKS = ["build", "lock", "publish", "render", "run", "select", "smoke", "engine.up", "engine.status", "engine.down"]


def invoke(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_every_task_is_listed_with_a_one_line_help():
    out = invoke("--list").stdout
    for task in TASKS:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(task + " ")), None)
        assert line and len(line.split(None, 1)) == 2, task


@pytest.mark.parametrize("task,option", [("build", "--backend"), ("build", "--platform"), ("lock", "--check"),
                                         ("render", "--check"), ("select", "--json"), ("smoke", "--json"),
                                         ("publish", "--service"), ("run", "--backend")])
def test_task_help_documents_its_options(task, option):
    out = invoke(task, "--help").stdout
    line = next(ln for ln in out.splitlines() if f" {option}" in ln or ln.strip().startswith(option))
    assert len(line.split()) > 3, line  # the option and words explaining it


@pytest.fixture
def mini(tmp_path):
    shutil.copytree(FIXTURES / "mini", tmp_path / "mini")
    return tmp_path / "mini" / "project.yaml"


@pytest.mark.parametrize("args,message", [
    (["build", "--backend", "rocm"], "unknown backend 'rocm'"),
    (["build", "--backend", "cuda", "--platform", "linux/arm64"], "backend cuda is not built for linux/arm64"),
    (["build", "--service", "nope"], "unknown service 'nope'"),
    (["select", "--service", "all"], "service 'all' is not one of"),
    (["smoke", "--platform", "linux/s390x"], "unknown platform 'linux/s390x'"),
    (["run", "--service", "echo", "--port", "abc"], "--port 'abc' is not a port number"),
    (["run", "--service", "echo", "--port", "70000"], "--port '70000' is not a port number"),
    (["run"], "--service is required"),
])
def test_bad_input_exits_2_with_one_clear_message(mini, args, message):
    proc = invoke(*args, "--project", str(mini))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
