"""The tool in someone else's repository: the package built from this checkout and installed into a
fresh virtual environment, then used from a directory outside the checkout with nothing of the
checkout on the path.

- A team's repository of services (its own project file and one small service) is locked,
  rendered, published, smoked and selected through the installed `orchestrator` command.
- A team's integration tests use only the pytest plugin (loaded through its entry point) against
  the mini fixture's published services.
- `orchestrator init` starts a project whose first `lock` makes `lock --check` pass.

The environment is made with uv: the wheel is built from a copy of the source (nothing is
written into the checkout), and its dependencies are installed at the versions the test's own
environment has (uv's cache serves them after the first run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pytest

from orchestrator.machine import daemon
from orchestrator.project import spec
from orchestrator.release import smoke

from ..conftest import FIXTURES, ROOT, cleanup_namespace, unavailable

pytestmark = pytest.mark.engine

HELLO_APP = '''\
"""A stdlib-only service that follows the health contract."""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from contract import Contract

contract = Contract()
contract.load_in_background(lambda: {"name": "hello"})


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        routes = {"/health": (200, {"status": "ok"}), "/info": (200, contract.info()),
                  "/ready": (200 if contract.ready.is_set() else 503, {"ready": contract.ready.is_set()}),
                  "/hello": (200, {"hello": "world"})}
        code, body = routes.get(self.path, (404, {"error": "not found"}))
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("SERVICE_PORT", "8080"))), Handler).serve_forever()
'''

TEAM_PROJECT = '''\
# A platform team's own repository: one service, the CPU backend, amd64 (the shape of tests/fixtures/mini).
schema: 1
project: {name}
version: "0.1.0"
python: "3.11"
platforms: [linux/amd64]
base:
  image: docker.io/library/python:3.11-slim-bookworm
  bootstrap:
    suite: bookworm
    when: always
    include: [python3, python3-venv, python3-pip, ca-certificates, libgomp1]
backends:
  cpu:
    torch: null
services:
  hello:
    path: services/hello
    requirements: requirements/hello.in
    command: [python3, app.py]
    port: 8080
'''


@dataclass
class Installed:
    """A virtual environment with the package installed from a wheel, and how to run what it holds."""

    venv: Path
    env: dict[str, str]

    def run(self, program: str, *args: str, cwd: Path, timeout: float = 900, **env) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / program), *args], cwd=cwd, env={**self.env, **env},
                              capture_output=True, text=True, timeout=timeout)


def _checked(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])}...: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


def _outside(path: str) -> bool:
    """A sys.path or PATH entry that is neither in this checkout nor in the test's own environment."""
    p = Path(path or ".").resolve()
    return not p.is_relative_to(ROOT) and not p.is_relative_to(Path(sys.prefix).resolve())


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    shutil.copytree(ROOT / "orchestrator", src / "orchestrator", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", src)
    uv = [sys.executable, "-m", "uv"]  # uv is one of the package's dependencies
    try:
        _checked([*uv, "--version"])
    except (AssertionError, OSError):
        unavailable("uv is not installed in the test environment (pip install -e '.[test]')")
    _checked([*uv, "build", "--quiet", "--wheel", "--out-dir", str(tmp / "dist"), str(src)])
    wheel = next((tmp / "dist").glob("orchestrator-*.whl"))
    venv = tmp / "venv"
    _checked([*uv, "venv", "--quiet", "--python", sys.executable, str(venv)])
    # The versions this suite runs with (plus pytest for the plugin test), from uv's cache when it has them.
    frozen = _checked([sys.executable, "-m", "pip", "freeze", "--exclude", "orchestrator"]).stdout
    (tmp / "constraints.txt").write_text("".join(line + "\n" for line in frozen.splitlines()
                                                 if "==" in line and " @ " not in line))
    _checked([*uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
              "--constraint", str(tmp / "constraints.txt"), str(wheel), "pytest"])
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_ADDOPTS")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), *(p for p in env.get("PATH", "").split(os.pathsep)
                                                        if p and _outside(p))])
    return Installed(venv, env)


def test_the_installed_command_runs_nothing_from_this_checkout(installed, tmp_path):
    probe = ("import json, shutil, sys, orchestrator, orchestrator.cli; "
             "print(json.dumps({'path': sys.path, 'module': orchestrator.__file__, "
             "'command': shutil.which('orchestrator')}))")
    found = json.loads(_checked([str(installed.venv / "bin" / "python"), "-c", probe], cwd=tmp_path,
                                env=installed.env).stdout)
    assert [p for p in found["path"] if p and not _outside(p)] == [], found["path"]
    assert Path(found["module"]).is_relative_to(installed.venv)
    assert found["command"] == str(installed.venv / "bin" / "orchestrator")


def test_the_installed_command_lists_and_documents_the_same_tasks_as_invoke_here(installed, tmp_path):
    checkout = lambda *a: subprocess.run([sys.executable, "-m", "invoke", *a], cwd=ROOT, capture_output=True,
                                         text=True, timeout=120)
    for args in (["--list"], ["lock", "--help"], ["select", "--help"], ["init", "--help"]):
        mine = installed.run("orchestrator", *args, cwd=tmp_path)
        assert mine.returncode == 0, mine.stderr
        # Only the program's name differs (and the list's title: "Subcommands:", not "Available tasks:").
        theirs = checkout(*args).stdout.replace("inv[oke]", "orchestrator").splitlines()
        assert mine.stdout.splitlines()[1:] == theirs[1:], args
    help_text = installed.run("orchestrator", "--help", cwd=tmp_path).stdout
    assert "Usage: orchestrator [--core-opts] <subcommand>" in help_text and "init" in help_text
    nowhere = installed.run("orchestrator", "lock", cwd=tmp_path)
    assert nowhere.returncode == 2 and f"no project.yaml in {tmp_path.resolve()} or any directory above" in \
        nowhere.stderr


@pytest.fixture
def team_repo(engine_ready, tmp_path):
    """A team's repository outside the checkout: project file, one service, its requirements, the base pin."""
    repo = tmp_path / "team-services"
    (repo / "services" / "hello").mkdir(parents=True)
    (repo / "services" / "hello" / "app.py").write_text(HELLO_APP)
    (repo / "requirements").mkdir()
    (repo / "requirements" / "hello.in").write_text("six==1.16.0\n")
    (repo / "locks").mkdir()
    shutil.copy(FIXTURES / "mini" / "locks" / "base.json", repo / "locks")  # the committed base pin
    (repo / "project.yaml").write_text(TEAM_PROJECT.format(name=f"orch-test-team-{uuid.uuid4().hex[:8]}"))
    yield repo
    cleanup_namespace(spec.load(repo / "project.yaml"))


def test_a_team_repository_is_locked_rendered_published_smoked_and_selected_by_the_installed_command(
        installed, team_repo):
    inside = team_repo / "services" / "hello"  # the project file is found upwards, as git finds .git

    def orch(*args):
        proc = installed.run("orchestrator", *args, cwd=inside)
        assert proc.returncode == 0, f"orchestrator {' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc

    orch("lock")
    assert (team_repo / "locks" / "cpu-amd64" / "service-hello.txt").read_text().count("six==1.16.0") == 1
    orch("lock", "--check")
    orch("render")
    assert (team_repo / "dockerfiles" / "hello.cpu.Dockerfile").is_file()
    published = json.loads(orch("publish", "--json").stdout)
    manifest = json.loads(Path(published["manifests"]["hello"]).read_text())
    image = manifest["platforms"]["linux/amd64"]["backends"]["cpu"]["image"]
    smoked = json.loads(orch("smoke", "--json").stdout)
    assert [(r["service"], r["backend"], r["platform"], r["ok"]) for r in smoked] == [
        ("hello", "cpu", "linux/amd64", True)]
    assert smoked[0]["image"] == image  # smoke tests the digest that was published
    chosen = json.loads(orch("select", "--service", "hello", "--json").stdout)
    assert (chosen["backend"], chosen["image"], chosen["verified"]) == ("cpu", image, True)
    bad = installed.run("orchestrator", "build", "--backend", "rocm", cwd=inside)
    assert bad.returncode == 2 and "unknown backend 'rocm'" in bad.stderr and "Traceback" not in bad.stderr
    unreachable = installed.run("orchestrator", "select", "--service", "hello", cwd=inside,
                                ORCH_REGISTRY="127.0.0.1:9")
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr, unreachable.stderr


# --- a team's integration tests, with the pytest plugin only -------------------------------------

SAMPLE_TESTS = '''\
"""The echo service's integration tests, as a team writes them: fixtures from the orchestrator plugin."""

import pytest
import requests


def test_the_backend_this_host_would_run_answers(orchestrator_service):
    echo = orchestrator_service("echo")  # what `orchestrator select --service echo` picks here
    assert requests.get(f"{echo.url}/health", timeout=5).status_code == 200
    assert echo.info["backend_requested"] == echo.backend
    assert echo.reasons  # select's reasons for the choice


@pytest.mark.orchestrator_backends("echo")
def test_every_backend_reports_itself(orchestrator_service, orchestrator_backend):
    echo = orchestrator_service("echo", backend=orchestrator_backend)
    assert echo.info["backend_requested"] == orchestrator_backend
    assert echo.info["version"] == "0.1.0"


def test_it_runs_as_the_image_declares(orchestrator_service):
    echo = orchestrator_service("echo", backend="cpu")
    container = echo.container.get_wrapped_container()
    declared = container.image.labels["io.orchestrator.writable-dirs"].split()
    assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert sorted(container.attrs["HostConfig"]["Tmpfs"]) == sorted(declared)
    assert "@sha256:" in echo.image


def test_strict_cuda_stops_at_once_without_a_gpu(orchestrator_service):
    orchestrator_service("echo", backend="cuda13", env={"BACKEND_POLICY": "strict"})
'''


def _junit(path: Path) -> dict[str, tuple[str, str]]:
    """test name -> (outcome, message) from a JUnit XML report."""
    out = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, child.get("message", "")
        out[case.get("name")] = (outcome, message)
    return out


def test_a_teams_tests_start_every_published_backend_through_the_plugin(installed, mini_project, published,
                                                                        tmp_path):
    repo = tmp_path / "team-tests"
    repo.mkdir()
    (repo / "pytest.ini").write_text(f"[pytest]\norchestrator_project = {mini_project.file}\n")
    (repo / "test_echo.py").write_text(SAMPLE_TESTS)
    client = daemon.docker_client()
    ours = lambda: [c for c in client.containers.list(all=True)  # noqa: E731
                    if f"{mini_project.name}/echo" in " ".join(c.image.tags + c.image.attrs.get("RepoDigests", []))]
    before = {c.id for c in ours()}
    proc = installed.run("python", "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rs",
                         f"--junitxml={tmp_path / 'report.xml'}", cwd=repo)
    print(proc.stdout)  # the team's own report, shown when this test fails
    results = _junit(tmp_path / "report.xml")
    gpu = smoke.host_gpu_request(client).requested
    assert results["test_the_backend_this_host_would_run_answers"][0] == "passed", proc.stdout[-4000:]
    assert results["test_it_runs_as_the_image_declares"][0] == "passed", proc.stdout[-4000:]
    assert results["test_every_backend_reports_itself[cpu]"][0] == "passed", proc.stdout[-4000:]
    for cuda in ("cuda13", "cuda"):
        outcome, message = results[f"test_every_backend_reports_itself[{cuda}]"]
        if gpu:
            assert outcome == "passed", proc.stdout[-4000:]
        else:  # skipped, saying why
            assert outcome == "skipped" and f"{cuda} is a CUDA backend" in message and "no GPU" in message, message
    if not gpu:
        outcome, message = results["test_strict_cuda_stops_at_once_without_a_gpu"]
        assert outcome == "failure" and "exited with code 78 before /health answered" in message, message
        # The report carries the container's last log lines: the entrypoint's one-line reason.
        section = proc.stdout.split("orchestrator: echo/cuda13 container log (last 50 lines)", 1)
        assert len(section) == 2, proc.stdout[-4000:]
        assert "exit code 78" in section[1].splitlines()[1] and "BACKEND_POLICY=strict" in section[1], section[1][:800]
        assert proc.returncode == 1
    assert {c.id for c in ours()} == before  # every container the plugin started was removed


# --- a new project in one step -------------------------------------------------------------------

def test_init_then_lock_makes_a_project_that_passes_lock_check(installed, engine_ready, tmp_path):
    repo = tmp_path / "new-project"
    (repo / "services" / "hello").mkdir(parents=True)
    (repo / "services" / "hello" / "app.py").write_text(HELLO_APP)
    (repo / "services" / "hello" / "requirements.txt").write_text("six==1.16.0\n")

    def orch(*args):
        return installed.run("orchestrator", *args, cwd=repo)

    made = orch("init", "--no-torch", "--name", f"orch-test-init-{uuid.uuid4().hex[:8]}")
    assert made.returncode == 0, made.stderr
    project = spec.load(repo / "project.yaml")
    assert set(project.backends) == {"cuda", "cpu"} and list(project.services) == ["hello"]
    assert orch("lock", "--check").returncode == 1  # nothing locked yet
    locked = orch("lock")
    assert locked.returncode == 0, locked.stdout[-3000:] + locked.stderr[-3000:]
    check = orch("lock", "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert (repo / "locks" / "base.json").is_file() and (repo / "locks" / "cuda-amd64" / "cuda-libs.txt").is_file()
    again = orch("init")
    assert again.returncode == 2 and "already exists; init never overwrites a project file" in again.stderr
