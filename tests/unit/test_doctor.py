"""doctor: the pure parts (findings, report, exit code) and checks with faked inputs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from orchestrator.machine import doctor
from orchestrator.project import spec
from orchestrator.machine.doctor import Finding
from orchestrator.common.errors import EnvironmentProblem, UserError

from ..conftest import FIXTURES, ROOT

OK = Finding("docker engine", True, True, "Docker 20.10, API 1.41")
OPTIONAL_MISSING = Finding("nvidia driver", False, False, "no NVIDIA driver", "install it on GPU hosts")
REQUIRED_FAILED = Finding("disk", False, True, "1.0 GB free", "free 17 GB")


@pytest.fixture
def project():
    return spec.load(FIXTURES / "mini" / "project.yaml")


def test_optional_failures_do_not_fail_the_run():
    findings = [OK, OPTIONAL_MISSING]
    assert doctor.all_ok(findings) and doctor.exit_code(findings) == 0
    assert doctor.failed_required(findings) == []


def test_a_required_failure_exits_1():
    findings = [OK, OPTIONAL_MISSING, REQUIRED_FAILED]
    assert doctor.exit_code(findings) == 1
    assert doctor.failed_required(findings) == [REQUIRED_FAILED]


def test_json_report_shape():
    data = json.loads(json.dumps(doctor.report([OK, REQUIRED_FAILED])))
    assert data["ok"] is False
    assert data["findings"] == [
        {"name": "docker engine", "ok": True, "required": True, "detail": "Docker 20.10, API 1.41", "fix": ""},
        {"name": "disk", "ok": False, "required": True, "detail": "1.0 GB free", "fix": "free 17 GB"},
    ]
    assert doctor.report([OK])["ok"] is True


def test_rows_and_fixes_put_required_fixes_first():
    findings = [OK, OPTIONAL_MISSING, REQUIRED_FAILED]
    assert doctor.rows(findings) == [["docker engine", "ok", "Docker 20.10, API 1.41"],
                                     ["nvidia driver", "no (optional)", "no NVIDIA driver"],
                                     ["disk", "FAIL", "1.0 GB free"]]
    assert doctor.fixes(findings) == [("disk", "free 17 GB"), ("nvidia driver", "install it on GPU hosts")]


def test_a_crashing_check_becomes_a_failed_finding():
    def boom():
        raise RuntimeError("kaput")

    def env():
        raise EnvironmentProblem("no CA bundle found", "set SSL_CERT_FILE")

    [crashed] = doctor._guard("x", True, boom)
    assert not crashed.ok and "RuntimeError: kaput" in crashed.detail
    [problem] = doctor._guard("ca bundle", True, env)
    assert (problem.detail, problem.fix) == ("no CA bundle found", "set SSL_CERT_FILE")


def test_disk_need_is_per_backend_and_platform(project):
    total, how = doctor.disk_need_gb(project)  # mini: torch-less cuda13 on both, cuda on amd64, cpu on both
    assert total == 2 * 1 + 1 * 1 + 2 * 3
    assert how == "cuda13 1 GB x 2 platforms + cuda 1 GB x 1 platform + cpu 3 GB x 2 platforms"


def test_disk_check_states_the_numbers(project, tmp_path):
    info = {"DockerRootDir": str(tmp_path)}
    [low] = doctor.check_disk(project, info, usage=lambda p: (0, 0, 5 * doctor.GB))
    # Below the full figure but above one variant's: a warning (caches may hold the rest).
    assert not low.ok and not low.required and "enough for one backend at a time" in low.detail
    assert f"5.0 GB free in {tmp_path}" in low.detail and "~9 GB" in low.detail
    assert "4.0 GB more" in low.fix
    [none] = doctor.check_disk(project, info, usage=lambda p: (0, 0, 2 * doctor.GB))
    assert not none.ok and none.required  # not even the largest variant (cpu, 3 GB) fits
    [enough] = doctor.check_disk(project, info, usage=lambda p: (0, 0, 40 * doctor.GB))
    assert enough.ok


def test_disk_falls_back_when_docker_does_not_say(tmp_path):
    assert doctor.docker_root({"DockerRootDir": str(tmp_path)}) == str(tmp_path)
    assert doctor.docker_root({"DockerRootDir": str(tmp_path / "gone")}) in ("/var/lib/docker", "/")
    assert doctor.docker_root(None) in ("/var/lib/docker", "/")


def _binfmt(tmp_path, text):
    d = tmp_path / "binfmt_misc"
    d.mkdir(parents=True, exist_ok=True)
    if text is not None:
        (d / "qemu-aarch64").write_text(text)
    return d


def test_binfmt_for_every_foreign_platform(project, tmp_path):
    good = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\n"
    [f] = doctor.check_binfmt(project, "amd64", _binfmt(tmp_path, good))
    assert f.ok and f.name == "binfmt linux/arm64" and "flags PF" in f.detail

    [missing] = doctor.check_binfmt(project, "amd64", _binfmt(tmp_path / "none", None))
    assert not missing.ok and missing.required and "update-binfmts --enable qemu-aarch64" in missing.fix

    [no_f] = doctor.check_binfmt(project, "amd64", _binfmt(tmp_path / "nof", good.replace("PF", "P")))
    assert not no_f.ok and "F flag" in no_f.detail

    [disabled] = doctor.check_binfmt(project, "amd64", _binfmt(tmp_path / "off", good.replace("enabled", "disabled")))
    assert not disabled.ok and "disabled" in disabled.detail


def test_no_binfmt_check_without_a_foreign_platform(project, tmp_path):
    amd64_only = dataclasses.replace(project, platforms=("linux/amd64",))
    assert doctor.check_binfmt(amd64_only, "amd64", tmp_path) == []


class FakeRegistry:
    """Stands in for orchestrator.registry.Registry: only what doctor may use."""

    fail_check: Exception | None = None
    fail_upload: Exception | None = None
    uploads: list = []

    def __init__(self, host, **kw):
        self.host = host

    def check(self):
        if self.fail_check:
            raise self.fail_check

    def upload_blob(self, name, data):
        if self.fail_upload:
            raise self.fail_upload
        FakeRegistry.uploads.append((name, data))
        return "sha256:x", len(data)


@pytest.fixture
def fake_registry(monkeypatch):
    FakeRegistry.fail_check = FakeRegistry.fail_upload = None
    FakeRegistry.uploads = []
    monkeypatch.setattr(doctor, "Registry", FakeRegistry)
    return FakeRegistry


def test_registry_reachable_and_writable(fake_registry):
    findings = doctor.check_registry("127.0.0.1:5000", "proj/doctor-probe", tls=lambda h: pytest.fail("loopback"))
    assert [(f.name, f.ok) for f in findings] == [("registry 127.0.0.1:5000 reachable", True),
                                                  ("registry 127.0.0.1:5000 tls", True),
                                                  ("registry 127.0.0.1:5000 writable", True)]
    [(repo, data)] = fake_registry.uploads
    assert repo == "proj/doctor-probe" and 0 < len(data) < 200
    doctor.check_registry("127.0.0.1:5000", "proj/doctor-probe")
    assert fake_registry.uploads[0][1] != fake_registry.uploads[1][1], "each probe must really upload"


def test_registry_with_an_untrusted_certificate(fake_registry):
    [f] = doctor.check_registry("registry.example.com", tls=lambda h: "certificate verify failed: self-signed")
    assert f.name == "registry registry.example.com tls" and not f.ok and f.required
    assert "self-signed" in f.detail and "/etc/docker/certs.d/registry.example.com/ca.crt" in f.fix


def test_registry_unreachable(fake_registry):
    fake_registry.fail_check = EnvironmentProblem("registry 127.0.0.1:5999 is unreachable (ConnectionError)")
    [f] = doctor.check_registry("127.0.0.1:5999")
    assert not f.ok and "unreachable" in f.detail and "invoke engine.up" in f.fix


def test_registry_that_refuses_the_write(fake_registry):
    fake_registry.fail_upload = UserError("registry r.example.com refused POST (401 unauthorized)",
                                          "set REGISTRY_USERNAME/REGISTRY_PASSWORD or `docker login`")
    findings = doctor.check_registry("r.example.com", tls=lambda h: None)
    assert [f.ok for f in findings] == [True, True, False]
    assert "401" in findings[2].detail and "docker login" in findings[2].fix


def test_the_task_is_listed_and_exits_1_on_a_failed_required_check(monkeypatch, capsys):
    from invoke import Context
    from invoke.exceptions import Exit

    from orchestrator import cli as tasks
    monkeypatch.setattr(doctor, "run", lambda proj, problem=None: [OK, OPTIONAL_MISSING, REQUIRED_FAILED])
    with pytest.raises(Exit) as e:
        tasks.doctor(Context(), project=str(FIXTURES / "mini" / "project.yaml"), json=True)
    assert e.value.code == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False

    monkeypatch.setattr(doctor, "run", lambda proj, problem=None: [OK, OPTIONAL_MISSING])
    tasks.doctor(Context(), project=str(FIXTURES / "mini" / "project.yaml"), json=False)  # no Exit
    out = capsys.readouterr().out
    assert "all required checks pass" in out and "fix nvidia driver: install it on GPU hosts" in out

    listed = subprocess.run([sys.executable, "-m", "invoke", "--list"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120).stdout
    assert any(line.strip().startswith("doctor ") for line in listed.splitlines())
