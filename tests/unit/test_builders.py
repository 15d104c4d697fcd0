"""Builders: which engine builds which platform, what its docker CLI is given,
and how builds on several engines run together. The pure parts; the real
two-engine build is tests/integration/test_builders.py."""

from __future__ import annotations

import subprocess
import threading

import pytest
import yaml

from orchestrator.build import export
from orchestrator.machine import daemon
from orchestrator.machine import doctor
from orchestrator.project import spec
from orchestrator.common.errors import EnvironmentProblem, SpecError
from orchestrator.project.spec import Builder

from ..conftest import FIXTURES, copy_fixture

SOCKET = "unix:///var/run/docker.sock"


def project_with(tmp_path, builders, **more):
    path = copy_fixture("mini", tmp_path)
    data = yaml.safe_load(path.read_text())
    data["builders"] = builders
    data.update(more)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def refusal(tmp_path, builders, **more) -> SpecError:
    with pytest.raises(SpecError) as e:
        spec.load(project_with(tmp_path, builders, **more))
    assert e.value.exit_code == 2 and e.value.hint
    return e.value


# --- the project file -----------------------------------------------------------

def test_a_platform_maps_to_an_endpoint_or_to_a_tls_endpoint_with_its_certificates(tmp_path):
    project = spec.load(project_with(tmp_path, {
        "linux/arm64": "ssh://builder@arm-host",
        "linux/amd64": {"host": "tcp://x86-host:2376", "cert_path": "certs/x86"},
    }))
    assert project.builders["linux/arm64"] == Builder("ssh://builder@arm-host")
    assert project.builders["linux/arm64"].key == "builders.linux/arm64"
    tls = project.builders["linux/amd64"]
    assert (tls.host, tls.scheme) == ("tcp://x86-host:2376", "tcp")
    assert tls.cert_path == str(project.root / "certs" / "x86")  # relative to the project file


def test_without_builders_every_platform_builds_on_the_default_engine():
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    assert project.builders == {}
    env = {"DOCKER_HOST": "tcp://elsewhere:2375"}
    assert {p: daemon.builder_for(project, p, env) for p in project.platforms} == {
        "linux/amd64": Builder("tcp://elsewhere:2375"), "linux/arm64": Builder("tcp://elsewhere:2375")}
    assert daemon.builder_for(project, "linux/amd64", {}) == Builder(SOCKET)


def test_a_platform_not_listed_builds_on_the_default_engine(tmp_path):
    project = spec.load(project_with(tmp_path, {"linux/arm64": "unix:///run/arm.sock"}))
    assert daemon.builder_for(project, "linux/arm64", {}).host == "unix:///run/arm.sock"
    default = daemon.builder_for(project, "linux/amd64", {})
    assert default.host == SOCKET and str(default) == f"{SOCKET} (the default engine)"


def test_the_same_endpoint_twice_is_one_engine():
    assert Builder(SOCKET, key="builders.linux/arm64") == Builder(SOCKET)
    assert len({Builder(SOCKET, key="builders.linux/arm64"), Builder(SOCKET)}) == 1
    assert Builder("tcp://h:2376", "/a") != Builder("tcp://h:2376", "/b")


def test_a_builder_for_a_platform_the_project_does_not_build_is_refused(tmp_path):
    e = refusal(tmp_path, {"linux/arm64": "ssh://arm"}, platforms=["linux/amd64"])
    assert "builders.linux/arm64" in str(e) and "not one of the project's platforms" in str(e)
    assert "add linux/arm64 to platforms" in e.hint


@pytest.mark.parametrize("endpoint, why", [
    ("http://arm-host:2375", "the scheme must be unix://, tcp:// or ssh://, found http://"),
    ("arm-host", "found no scheme"),
    ("npipe:////./pipe/docker_engine", "found npipe://"),
    ("unix://var/run/docker.sock", "absolute socket path"),
    ("tcp://:2376", "needs a host name"),
    ("ssh://", "needs a host name"),
    ("tcp://arm-host:99999", "'99999' is not a port number"),
])
def test_an_endpoint_that_is_not_unix_tcp_or_ssh_is_refused_with_examples(tmp_path, endpoint, why):
    e = refusal(tmp_path, {"linux/arm64": endpoint})
    assert "builders.linux/arm64" in str(e) and why in str(e)
    assert "ssh://builder@arm-host" in e.hint


def test_certificates_are_only_for_tcp(tmp_path):
    e = refusal(tmp_path, {"linux/arm64": {"host": "ssh://arm", "cert_path": "/certs"}})
    assert "builders.linux/arm64.cert_path" in str(e)


def test_a_builder_of_the_wrong_shape_says_what_shapes_are_accepted(tmp_path):
    e = refusal(tmp_path, {"linux/arm64": {"host": "tcp://arm:2376", "tls": {"ca": "x"}}})
    assert "builders.linux/arm64" in str(e) and "a Docker endpoint string, or {host" in str(e)
    assert "cert_path" in e.hint


# --- what the docker CLI and docker-py are given -----------------------------------

ENV = {"PATH": "/usr/bin", "DOCKER_HOST": "unix:///run/other.sock", "DOCKER_CONTEXT": "ctx",
       "DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": "/home/me/.docker"}


def test_the_default_engine_keeps_the_environment_as_it_is():
    assert daemon.builder_env(None, ENV) == ENV
    assert daemon.builder_env(Builder("unix:///run/other.sock"), ENV) == ENV


def test_a_unix_or_ssh_builder_gets_its_docker_host_and_no_tls_or_context():
    for host in ("unix:///tmp/second/docker.sock", "ssh://builder@arm-host"):
        env = daemon.builder_env(Builder(host, key="builders.linux/arm64"), ENV)
        assert env == {"PATH": "/usr/bin", "DOCKER_HOST": host}


def test_a_tcp_builder_follows_dockers_tls_variables_or_its_own_certificates():
    plain = daemon.builder_env(Builder("tcp://arm:2376", key="builders.linux/arm64"), ENV)
    assert plain["DOCKER_HOST"] == "tcp://arm:2376"
    assert (plain["DOCKER_TLS_VERIFY"], plain["DOCKER_CERT_PATH"]) == ("1", "/home/me/.docker")
    own = daemon.builder_env(Builder("tcp://arm:2376", "/etc/orch/arm", key="builders.linux/arm64"), ENV)
    assert (own["DOCKER_TLS_VERIFY"], own["DOCKER_CERT_PATH"]) == ("1", "/etc/orch/arm")
    assert "DOCKER_CONTEXT" not in own


def test_a_tls_builder_without_its_certificates_is_named_before_anything_connects(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(EnvironmentProblem) as e:
        daemon.docker_client(builder=Builder("tcp://arm:2376", str(tmp_path), key="builders.linux/arm64"))
    assert "builders.linux/arm64.cert_path" in e.value.message and "cert.pem, key.pem" in e.value.message


def test_only_builders_on_this_machine_see_its_loopback_registry():
    assert daemon.is_local(Builder("unix:///tmp/x.sock"))
    assert daemon.is_local(Builder("tcp://127.0.0.1:2375")) and daemon.is_local(Builder("ssh://me@localhost"))
    assert not daemon.is_local(Builder("ssh://builder@arm-host")) and not daemon.is_local(Builder("tcp://10.0.0.5:2376"))


class FakeEngine:
    def __init__(self, arch="aarch64", os_type="linux", distribution_error=None):
        self.arch, self.os_type = arch, os_type
        self.api = self
        self.distribution_error = distribution_error

    def info(self):
        return {"Architecture": self.arch, "OSType": self.os_type}

    def version(self):
        return {"Version": "26.1.5"}

    def inspect_distribution(self, ref):
        raise self.distribution_error or Exception("manifest unknown: manifest unknown")


def test_an_engines_platform_is_what_it_runs_natively():
    assert daemon.engine_platform(FakeEngine("x86_64"), SOCKET) == "linux/amd64"
    assert daemon.engine_platform(FakeEngine("aarch64"), SOCKET) == "linux/arm64"
    with pytest.raises(EnvironmentProblem, match="runs linux/s390x"):
        daemon.engine_platform(FakeEngine("s390x"), SOCKET)


# --- doctor ---------------------------------------------------------------------

def test_doctor_checks_each_builder_answers_and_reaches_the_registry(tmp_path):
    project = spec.load(project_with(tmp_path, {"linux/arm64": "ssh://builder@arm-host"}))
    good = doctor.check_builders(project, connect=lambda b: FakeEngine("aarch64"))
    assert [(f.name, f.ok) for f in good] == [("builder linux/arm64", True),
                                              (f"builder linux/arm64 reaches {project.registry}", True)]
    assert "a linux/arm64 engine (native)" in good[0].detail

    refused = Exception('Get "http://127.0.0.1:5000/v2/": dial tcp 127.0.0.1:5000: connect: connection refused')
    bad = doctor.check_builders(project, connect=lambda b: FakeEngine("aarch64", distribution_error=refused))
    assert not bad[1].ok and bad[1].required
    assert "this machine's loopback" in bad[1].detail and "every builder reaches" in bad[1].fix

    def down(builder):
        raise EnvironmentProblem(f"no Docker Engine answers at {builder.host}", "start it")
    [gone] = doctor.check_builders(project, connect=down)
    assert not gone.ok and gone.required and "ssh://builder@arm-host" in gone.detail


def test_doctor_has_nothing_to_say_about_builders_when_none_are_configured():
    assert doctor.check_builders(spec.load(FIXTURES / "mini" / "project.yaml"), connect=None) == []


# --- several engines at once -------------------------------------------------------

def test_one_builder_works_in_the_calling_thread():
    seen = []
    export.on_builders([(Builder(SOCKET), [1, 2])], lambda b, images: seen.append(threading.current_thread()),
                      export.Halt())
    assert seen == [threading.current_thread()]


def test_several_builders_work_at_the_same_time_each_in_its_own_order():
    both_started = threading.Barrier(2, timeout=30)  # passes only if both builders are running at once
    done: dict[str, list] = {}

    def work(builder, images):
        both_started.wait()
        done[builder.host] = [i for i in images]

    export.on_builders([(Builder("unix:///a"), ["libs-a", "svc-a"]), (Builder("unix:///b"), ["libs-b", "svc-b"])],
                      work, export.Halt())
    assert done == {"unix:///a": ["libs-a", "svc-a"], "unix:///b": ["libs-b", "svc-b"]}


def test_the_first_failure_stops_the_other_builders_and_is_the_one_raised():
    halt = export.Halt()
    stopped = threading.Event()

    def work(builder, images):
        if builder.host == "unix:///a":
            raise EnvironmentProblem("build of echo/cpu amd64 app failed")
        while True:  # a builder between stages: it checks the halt before each one
            try:
                halt.check()
            except export.Halted:
                stopped.set()
                raise
            threading.Event().wait(0.01)

    with pytest.raises(EnvironmentProblem, match="echo/cpu amd64 app failed"):
        export.on_builders([(Builder("unix:///a"), [1]), (Builder("unix:///b"), [2])], work, halt)
    assert stopped.is_set()


def test_a_halt_stops_the_build_clients_that_are_running():
    halt = export.Halt()
    proc = subprocess.Popen(["sleep", "60"])
    halt.track(proc)
    halt.stop()
    assert proc.wait(10) != 0
    late = subprocess.Popen(["sleep", "60"])
    halt.track(late)  # one started as the run was stopped is stopped too
    assert late.wait(10) != 0


def test_a_builder_that_cannot_reach_the_registry_is_told_so():
    text = ('ERROR: failed to solve: 127.0.0.1:5000/orchestrator/base-bookworm@sha256:ab: failed to resolve source '
            'metadata: failed to do request: Head "http://127.0.0.1:5000/v2/": dial tcp 127.0.0.1:5000: connect: '
            'connection refused')
    hint = export._hint(text, Builder("ssh://builder@arm-host", key="builders.linux/arm64"), "127.0.0.1:5000")
    assert "the engine at ssh://builder@arm-host cannot reach registry 127.0.0.1:5000" in hint
    assert "every builder must reach the registry" in hint
