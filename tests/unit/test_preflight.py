"""preflight: what engine.up calls, checked against a fake PATH."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest

from orchestrator.machine import preflight
from orchestrator.project import spec
from orchestrator.common.errors import EnvironmentProblem

from ..conftest import FIXTURES

ALL = ["dockerd", "docker", "docker-registry", "mmdebstrap", "arch-test", "qemu-aarch64-static",
       "update-binfmts", "mount"]


@pytest.fixture
def project():
    return spec.load(FIXTURES / "mini" / "project.yaml")  # linux/amd64 + linux/arm64, registry 127.0.0.1:5000


def fake_path(tmp_path, commands) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for c in commands:
        exe = bin_dir / c
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return str(bin_dir)


def test_required_tools_for_a_multiarch_project_on_amd64(project):
    tools = preflight.required_tools(project, "amd64")
    assert [t.command for t in tools] == ALL
    by_cmd = {t.command: t.package for t in tools}
    assert by_cmd["dockerd"] == by_cmd["docker"] == "docker.io"
    assert by_cmd["arch-test"] == "arch-test"
    assert by_cmd["qemu-aarch64-static"] == "qemu-user-static"
    assert by_cmd["update-binfmts"] == "binfmt-support"
    assert all(t.why for t in tools)


def test_no_emulation_tools_without_a_foreign_platform(project):
    amd64_only = dataclasses.replace(project, platforms=("linux/amd64",))
    cmds = [t.command for t in preflight.required_tools(amd64_only, "amd64")]
    assert cmds == ["dockerd", "docker", "docker-registry", "mmdebstrap"]


def test_on_an_arm64_host_amd64_is_the_foreign_one(project):
    cmds = [t.command for t in preflight.required_tools(project, "arm64")]
    assert "qemu-x86_64-static" in cmds and "qemu-aarch64-static" not in cmds and "arch-test" in cmds


def test_remote_engine_and_remote_registry_need_no_local_daemons(project):
    remote = dataclasses.replace(project, registry="registry.example.com")
    cmds = [t.command for t in preflight.required_tools(remote, "amd64", docker_host="tcp://10.0.0.2:2376")]
    assert "dockerd" not in cmds and "docker-registry" not in cmds
    assert "docker" in cmds and "mmdebstrap" in cmds


def test_check_catches_a_missing_arch_test(project, tmp_path):
    path = fake_path(tmp_path, [c for c in ALL if c != "arch-test"])
    missing = preflight.check(project, path=path, arch="amd64", docker_host="")
    assert [(t.command, t.package) for t in missing] == [("arch-test", "arch-test")]


def test_check_passes_when_everything_is_there(project, tmp_path):
    assert preflight.check(project, path=fake_path(tmp_path, ALL), arch="amd64", docker_host="") == []


def test_ensure_without_root_names_packages_and_the_apt_command(project, tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    path = fake_path(tmp_path, ["docker", "dockerd", "mount"])
    with pytest.raises(EnvironmentProblem) as e:
        preflight.ensure(project, install=True, path=path, arch="amd64", is_root=False,
                         run=lambda *a, **k: pytest.fail("must not run apt-get without root"))
    msg = str(e.value)
    for pkg in ("docker-registry", "mmdebstrap", "arch-test", "qemu-user-static", "binfmt-support"):
        assert pkg in msg
    assert ("sudo apt-get update && sudo apt-get install -y --no-install-recommends "
            "docker-registry mmdebstrap arch-test qemu-user-static binfmt-support") in msg
    assert "not running as root" in msg


def test_ensure_as_root_installs_everything_in_one_apt_call(project, tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    path = fake_path(tmp_path, [c for c in ALL if c not in ("arch-test", "mmdebstrap")])
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        assert kw["env"]["DEBIAN_FRONTEND"] == "noninteractive"
        if cmd[1] == "install":  # "installs" the tools into the fake PATH
            fake_path(tmp_path, ["arch-test", "mmdebstrap"])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    installed = preflight.ensure(project, install=True, path=path, arch="amd64", is_root=True, run=fake_run)
    assert installed == ["mmdebstrap", "arch-test"]
    assert calls == [["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "mmdebstrap", "arch-test"]]


def test_ensure_reports_a_failed_apt_get(project, tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    path = fake_path(tmp_path, [c for c in ALL if c != "arch-test"])

    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 100 if cmd[1] == "install" else 0, "",
                                           "E: Unable to locate package arch-test")

    with pytest.raises(EnvironmentProblem, match="Unable to locate package arch-test"):
        preflight.ensure(project, install=True, path=path, arch="amd64", is_root=True, run=failing)


def test_ensure_with_nothing_missing_runs_nothing(project, tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert preflight.ensure(project, install=True, path=fake_path(tmp_path, ALL), arch="amd64", is_root=True,
                            run=lambda *a, **k: pytest.fail("nothing to install")) == []


def test_this_machine_has_what_engine_up_calls(project):
    """On a machine set up by ci/setup.sh nothing is missing (catches a package dropped from setup.sh)."""
    from ..conftest import unavailable

    missing = preflight.check(project)
    if missing:  # fails under CI=true, skips on a laptop
        unavailable(f"not set up with ci/setup.sh: {preflight.describe(missing)}")
    assert missing == [], preflight.describe(missing)
