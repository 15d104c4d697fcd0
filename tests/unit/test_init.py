"""`orchestrator init`: a starting project file for a directory of services.

The file it writes is valid against the schema and loads; its defaults come
from the compatibility data and the environment; it never overwrites a
project file. (tests/integration/test_installed.py locks one and checks it.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.version import Version

from orchestrator import flow
from orchestrator.common.errors import UserError
from orchestrator.project import compat, spec
from orchestrator.project.validate import project_schema

from ..conftest import ROOT


def services(root: Path, *names: str, app: bool = True) -> Path:
    for name in names:
        (root / "services" / name).mkdir(parents=True)
        if app:
            (root / "services" / name / "app.py").write_text("print('serving')\n")
    return root


def newest_cuda_line_and_its_torch() -> tuple[str, str]:
    c = compat.load()
    line = max(c.cuda_versions(), key=Version)
    return line, max((t for t in c.torch_versions() if c.cuda_pins(t, line)), key=Version)


def test_the_written_file_is_valid_against_the_schema_and_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCH_REGISTRY", raising=False)
    root = services(tmp_path / "shop", "tts", "stt")
    (root / "services" / "notes").mkdir()  # no app.py: not a service
    written, project = flow.init(root)
    data = yaml.safe_load((root / "project.yaml").read_text())
    jsonschema.validate(data, project_schema())
    assert spec.load(root / "project.yaml") == project
    assert sorted(project.services) == ["stt", "tts"]
    assert project.services["tts"].command == ("python3", "app.py")
    assert project.name == "shop" and project.registry == spec.DEFAULT_REGISTRY
    assert {p.relative_to(root).as_posix() for p in written} == {
        "project.yaml", "requirements/tts.in", "requirements/stt.in"}


def test_the_cpu_backend_and_the_newest_cuda_line_with_its_torch_by_default(tmp_path):
    _, project = flow.init(services(tmp_path / "shop", "tts"))
    line, torch = newest_cuda_line_and_its_torch()
    assert list(project.backends) == ["cuda", "cpu"]
    assert project.backends["cuda"].cuda == line
    assert project.backends["cuda"].torch_for("linux/amd64") == torch
    cpu = project.backends["cpu"]
    assert cpu.cuda is None and cpu.torch_for("linux/amd64") == f"{torch}+cpu"  # PyPI's x86_64 torch is a CUDA build
    assert project.platforms == ("linux/amd64",)


def test_without_torch_the_cuda_line_ships_its_runtime_wheel(tmp_path):
    _, project = flow.init(services(tmp_path / "shop", "tts"), torch=False)
    line, _ = newest_cuda_line_and_its_torch()
    assert all(b.torch_for("linux/amd64") is None for b in project.backends.values())
    (wheel,) = project.cuda_libs.packages_for(line)
    assert wheel.startswith("nvidia-cuda-runtime") and wheel in compat.load().cuda_release_pins(line)


def test_no_cuda_leaves_the_cpu_backend_alone(tmp_path):
    _, project = flow.init(services(tmp_path / "shop", "tts"), cuda=False, torch=False)
    assert list(project.backends) == ["cpu"]


def test_the_registry_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_REGISTRY", "registry.example.com:5000/team")
    flow.init(services(tmp_path / "shop", "tts"))
    assert yaml.safe_load((tmp_path / "shop" / "project.yaml").read_text())["registry"] == \
        "registry.example.com:5000/team"


def test_a_given_command_makes_every_directory_a_service(tmp_path):
    root = services(tmp_path / "shop", "api", "worker", app=False)
    _, project = flow.init(root, command=("python3", "-m", "uvicorn", "app:app", "--port", "9000"), port=9000)
    assert sorted(project.services) == ["api", "worker"]
    assert project.services["api"].command == ("python3", "-m", "uvicorn", "app:app", "--port", "9000")
    assert project.services["api"].port == 9000


def test_services_may_sit_directly_in_the_project_directory(tmp_path):
    root = tmp_path / "Speech_Stack"
    (root / "tts").mkdir(parents=True)
    (root / "tts" / "app.py").write_text("")
    _, project = flow.init(root)
    assert project.name == "speech_stack" and project.services["tts"].path == (root / "tts").resolve()


def test_a_services_own_requirements_seed_its_file_and_an_existing_one_is_kept(tmp_path):
    root = services(tmp_path / "shop", "tts", "stt")
    (root / "services" / "tts" / "requirements.txt").write_text("six==1.16.0\n")
    (root / "requirements").mkdir()
    (root / "requirements" / "stt.in").write_text("idna==3.10\n")
    written, _ = flow.init(root)
    assert "six==1.16.0" in (root / "requirements" / "tts.in").read_text()
    assert (root / "requirements" / "stt.in").read_text() == "idna==3.10\n"
    assert root / "requirements" / "stt.in" not in written


def test_it_refuses_to_overwrite_a_project_file(tmp_path):
    root = services(tmp_path / "shop", "tts")
    (root / "project.yaml").write_text("# ours\n")
    with pytest.raises(UserError) as e:
        flow.init(root)
    assert e.value.exit_code == 2 and "already exists" in str(e.value)
    assert (root / "project.yaml").read_text() == "# ours\n"
    assert not (root / "requirements").exists()


def test_a_requirement_a_lock_cannot_take_leaves_nothing_behind(tmp_path):
    root = services(tmp_path / "shop", "tts")
    (root / "services" / "tts" / "requirements.txt").write_text("-e ./vendored\n")
    with pytest.raises(UserError):
        flow.init(root)
    assert not (root / "project.yaml").exists() and not (root / "requirements" / "tts.in").exists()


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "orchestrator", "init", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_the_command_refuses_an_existing_project_file_with_exit_2(tmp_path):
    root = services(tmp_path / "shop", "tts")
    first = cli(cwd=root)
    assert first.returncode == 0, first.stderr
    assert "wrote project.yaml" in first.stdout
    again = cli(cwd=root)
    assert again.returncode == 2
    assert "project.yaml already exists; init never overwrites a project file" in again.stderr
    assert "Traceback" not in again.stderr + again.stdout


@pytest.mark.parametrize("args,message", [
    ([], "no service in .: none of its directories has an app.py"),
    (["--port", "http"], "--port 'http' is not a port number"),
    (["--services", "nowhere"], "nowhere: no such directory"),
    (["--name", "Not A Name!"], "cannot be a project name"),
])
def test_bad_input_exits_2_with_one_message(tmp_path, args, message):
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "project.yaml").exists()
