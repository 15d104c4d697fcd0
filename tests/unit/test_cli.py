"""The command line a user types: discoverable tasks, documented options,
and input errors that exit 2 with one message and no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib

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


# --- the same tasks as the `orchestrator` command, and in a team's own tasks.py ----------------

def orchestrator(*args, cwd, **env):
    """`orchestrator ARGS` as the console script runs it (orchestrator.cli:main), from cwd."""
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_the_package_declares_the_console_command_and_the_pytest_plugin():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["scripts"] == {"orchestrator": "orchestrator.cli:main"}
    assert meta["entry-points"]["pytest11"] == {"orchestrator": "orchestrator.pytest_plugin"}


def test_the_command_lists_and_documents_the_same_tasks_as_invoke(tmp_path):
    listed = orchestrator("--list", cwd=tmp_path)
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[1:] == invoke("--list").stdout.splitlines()[1:]  # after the title line
    for task in [*TASKS, "init"]:
        assert any(ln.strip().startswith(task + " ") for ln in listed.stdout.splitlines()), task
    for task in ("build", "init", "select"):
        mine = orchestrator(task, "--help", cwd=tmp_path)
        assert mine.returncode == 0
        assert mine.stdout == invoke(task, "--help").stdout.replace("inv[oke]", "orchestrator")


def test_a_task_finds_the_project_file_in_the_nearest_directory_above(mini):
    proc = orchestrator("build", "--backend", "rocm", cwd=mini.parent / "services" / "echo")
    assert proc.returncode == 2
    assert "unknown backend 'rocm'; project.yaml defines ['cpu', 'cuda', 'cuda13']" in proc.stderr


def test_orch_project_names_the_project_file_from_anywhere(mini, tmp_path):
    proc = orchestrator("build", "--backend", "rocm", cwd=tmp_path, ORCH_PROJECT=str(mini))
    assert proc.returncode == 2 and "unknown backend 'rocm'" in proc.stderr


def test_without_a_project_file_anywhere_above_it_says_how_to_start_one(tmp_path):
    proc = orchestrator("render", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"no project.yaml in {tmp_path.resolve()} or any directory above it" in proc.stderr
    assert "orchestrator init" in proc.stderr and "Traceback" not in proc.stderr


def test_a_stale_lock_exits_1(mini):
    (mini.parent / "requirements" / "echo.in").write_text("six==1.17.0\n")
    proc = orchestrator("lock", "--check", cwd=mini.parent)
    assert proc.returncode == 1 and "stale: " in proc.stdout + proc.stderr


TEAM_TASKS = '''\
"""A team's own tasks next to the orchestrator's."""
from invoke import task

from orchestrator.cli import ns


@task
def hello(c):
    """Say hello from the team's own task."""
    print("hello from the team")


ns.add_task(hello)
'''


def test_a_teams_tasks_py_imports_the_collection_and_adds_its_own_task(tmp_path):
    (tmp_path / "tasks.py").write_text(TEAM_TASKS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "invoke", *a], cwd=tmp_path, capture_output=True,  # noqa: E731
                                    text=True, timeout=120, env=env)
    listed = run("--list").stdout
    for task in ("hello", "lock", "publish", "init", "engine.up"):
        assert any(ln.strip().startswith(task + " ") for ln in listed.splitlines()), task
    said = run("hello")
    assert said.returncode == 0 and said.stdout == "hello from the team\n"
