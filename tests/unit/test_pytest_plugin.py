"""The pytest plugin's parts that need no engine: which backends a marked test runs over (and why
some are skipped), how a container is hardened from the image's label, where the project file comes
from, and the failing test's report section (with a stand-in container).

tests/integration/test_installed.py runs a team's test module against published images.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace


from orchestrator import pytest_plugin
from orchestrator.host import gpu_request
from orchestrator.host.contract import HOME_DIR, WRITABLE_LABEL, run_options, run_options_for
from orchestrator.host.probe import Host

from ..conftest import ROOT

MANIFEST = {"schemaVersion": 1, "service": "echo", "version": "0.1.0", "platforms": {
    "linux/amd64": {"default": "cuda13", "fallback": ["cuda13", "cuda", "cpu"], "backends": {
        "cuda13": {"image": "r/e@sha256:1", "requires": {"cuda": "13.0", "driver": ">=580.65.06"}},
        "cuda": {"image": "r/e@sha256:2", "requires": {"cuda": "12.4", "driver": ">=525.60.13"}},
        "cpu": {"image": "r/e@sha256:3"}}},
    "linux/arm64": {"default": "cpu", "fallback": ["cpu"], "backends": {"cpu": {"image": "r/e@sha256:4"}}}}}

NO_GPU = gpu_request.decide(gpu_request.HostFacts(), cuda=True)
A_GPU = gpu_request.decide(gpu_request.HostFacts(runtimes=("nvidia",), gpu_nodes=("/dev/nvidia0",)), cuda=True)


def skips(params) -> dict[str, str | None]:
    return {p.id: next((m.kwargs["reason"] for m in p.marks if m.name == "skip"), None) for p in params}


def test_a_marked_test_runs_over_every_backend_in_fallback_order_skipping_cuda_without_a_gpu():
    found = skips(pytest_plugin.backend_params(MANIFEST, Host("linux/amd64"), NO_GPU))
    assert list(found) == ["cuda13", "cuda", "cpu"]
    assert found["cpu"] is None
    for cuda in ("cuda13", "cuda"):
        assert found[cuda].startswith(f"{cuda} is a CUDA backend and this host gives containers no GPU: no GPU")


def test_on_a_gpu_host_a_line_its_driver_cannot_run_is_skipped_with_selects_reason():
    host = Host("linux/amd64", driver_version="550.54.15", libcuda="/usr/lib/libcuda.so.1", devices=("/dev/nvidia0",))
    found = skips(pytest_plugin.backend_params(MANIFEST, host, A_GPU))
    assert found["cuda"] is None and found["cpu"] is None
    assert found["cuda13"].startswith("cuda13: this host cannot run it: driver 550.54.15")


def test_a_platform_the_manifest_lacks_is_one_skip_saying_so():
    (param,) = pytest_plugin.backend_params(MANIFEST, Host("linux/s390x"), NO_GPU)
    assert param.marks[0].kwargs["reason"] == "the backend manifest has no images for linux/s390x"


def test_the_container_gets_a_tmpfs_on_each_dir_the_image_declares_writable():
    opts = run_options_for({WRITABLE_LABEL: f"/tmp {HOME_DIR} /var/cache/models"})
    assert opts["read_only"] is True
    assert list(opts["tmpfs"]) == ["/tmp", HOME_DIR, "/var/cache/models"]
    assert "uid=10001" in opts["tmpfs"][HOME_DIR]
    assert run_options_for({}) == run_options()  # an image without the label: the contract's own dirs
    assert list(run_options_for({WRITABLE_LABEL: "relative /tmp"})["tmpfs"]) == ["/tmp"]


def fake_config(tmp_path: Path, option=None, ini="", inipath=None):
    return SimpleNamespace(getoption=lambda name: option, getini=lambda name: ini,
                           invocation_params=SimpleNamespace(dir=tmp_path), inipath=inipath, rootpath=tmp_path)


def test_the_project_file_comes_from_the_option_then_the_ini_then_upwards(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCH_PROJECT", raising=False)
    (tmp_path / "project.yaml").write_text("")
    (tmp_path / "tests").mkdir()
    assert pytest_plugin.project_file(fake_config(tmp_path, option="other/p.yaml")) == str(tmp_path / "other/p.yaml")
    ini = tmp_path / "tests" / "pytest.ini"
    assert pytest_plugin.project_file(fake_config(tmp_path, ini="../svc.yaml", inipath=ini)) == \
        str(tmp_path / "tests" / "../svc.yaml")
    assert pytest_plugin.project_file(fake_config(tmp_path / "tests")) == str(tmp_path / "project.yaml")


CONFTEST = '''\
from types import SimpleNamespace

import pytest

from orchestrator import pytest_plugin


class FakeContainer:
    """What the plugin uses of a testcontainers container, without an engine."""

    def get_wrapped_container(self):
        return SimpleNamespace(reload=lambda: None, attrs={"State": {"Status": "running"}},
                               logs=lambda tail: b"loading model\\nserving on 8080\\n")

    def stop(self):
        with open("stopped.txt", "a") as fh:
            fh.write("stopped\\n")


@pytest.fixture(scope="session")
def orchestrator_project():
    return SimpleNamespace(services={"echo": None})


@pytest.fixture(autouse=True)
def no_engine(monkeypatch):
    def start(config, project, service, backend, env, started, start_timeout, ready_timeout):
        running = pytest_plugin.RunningService(service, backend or "cpu", "r/echo@sha256:0", FakeContainer(),
                                               url="http://127.0.0.1:1", info={"backend_requested": "cpu"})
        started.append(running)
        return running

    monkeypatch.setattr(pytest_plugin, "_start", start)
'''

TESTS = '''\
def test_passes(orchestrator_service):
    assert orchestrator_service("echo").info == {"backend_requested": "cpu"}


def test_fails(orchestrator_service):
    orchestrator_service("echo")
    assert False, "the service answered wrong"


def test_needs_the_marker(orchestrator_backend):
    pass
'''


def test_a_failing_test_reports_the_containers_last_log_lines_and_every_container_is_stopped(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_sample.py").write_text(TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    # -p loads the module itself; without autoload it is not also loaded through an installed entry point.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "orchestrator.pytest_plugin", "-p",
                           "no:cacheprovider", "-rf"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    out = proc.stdout
    assert "1 failed, 1 passed, 1 error" in out, out  # the error: orchestrator_backend without its marker
    title = "orchestrator: echo/cpu container log (last 50 lines)"
    assert out.count(title) == 1, out  # the failing test's report only
    section = out.split(title, 1)[1]
    assert section.splitlines()[1:4] == ["r/echo@sha256:0 (running)", "loading model", "serving on 8080"]
    assert "orchestrator_backend needs the marker: @pytest.mark.orchestrator_backends" in out
    assert (tmp_path / "stopped.txt").read_text() == "stopped\n" * 2


def test_the_marker_and_the_options_are_documented(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "pytest", "-p", "orchestrator.pytest_plugin",  # noqa: E731
                                     "-p", "no:cacheprovider", *a], cwd=tmp_path, capture_output=True, text=True,
                                    env=env, timeout=120).stdout
    assert "@pytest.mark.orchestrator_backends(service)" in run("--markers")
    helped = run("--help")
    assert "--orchestrator-project=PATH" in helped and "orchestrator_project" in helped


def test_the_plugin_costs_nothing_to_load():
    """Loaded into every test run where the package is installed: no engine, registry or docker-py on import."""
    code = ("import sys; import orchestrator.pytest_plugin; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('docker', 'testcontainers', 'requests') "
            "or m in ('orchestrator.flow', 'orchestrator.cli')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr

