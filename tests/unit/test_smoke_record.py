"""What a smoke record says ran, and what a publish may promote on it.

A variant whose every check passed and whose service answered /health,
/ready and /info "ran"; one whose service never started (a torch that
crashes under QEMU) is "partial" and says why, and no check claims the
service. A platform runs on the engine the project names for it (a native
arm64 engine runs the arm64 service for real). The backend manifest keeps
each image's record; a partial one is promoted only where the project names
it in smoke.allow_partial; a digest the promoted release already tested is
reused, not counted as tested by this publish. Engines and containers are
fakes here; tests/integration/test_smoke_engines.py runs the real thing.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from orchestrator.common.errors import UserError
from orchestrator.host import gpu_request as gr
from orchestrator.host import probe
from orchestrator.host import select as select_mod
from orchestrator.oci import backends
from orchestrator.project import spec
from orchestrator.release import publish, smoke
from orchestrator.release.smoke import checks as checks_mod
from orchestrator.release.smoke import runner

from ..conftest import FIXTURES, ROOT

BLOCKER = "torch 2.13.0's aarch64 build crashes on import under qemu-user (SIGSEGV in oneDNN)"
NO_GPU = gr.decide(None, cuda=False)


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def variant(platform="linux/arm64", blocker=BLOCKER, backend="cuda13", cuda="13.0", service="echo"):
    return smoke.Variant(service, backend, platform, f"127.0.0.1:5000/orch-mini/{service}@{digest(backend + platform)}",
                         8080, "0.1.0", "2.13.0" if blocker else None, cuda, (), (), blocker)


def passed(*names):
    return [smoke.Check(n, True, "ok") for n in names]


# --- a result says what ran ---------------------------------------------------------

def test_a_variant_whose_service_answered_health_ready_and_info_ran():
    r = smoke.VariantResult(variant(), passed("pull", "/health", "/ready", "/info", "non-root user"),
                            answered=["/health", "/ready", "/info"])
    assert r.ok and r.service_started and r.result == "ran" and r.why_partial == ""
    assert r.record() == {"result": "ran", "service": {"started": True, "answered": ["/health", "/ready", "/info"]},
                          "checks": ["pull", "/health", "/ready", "/info", "non-root user"],
                          "engine": "the default engine", "native": True}


def test_a_variant_whose_service_never_started_is_partial_and_says_why():
    r = smoke.VariantResult(variant(), passed("pull", "cuda-libs layer"), not_started="under emulation: " + BLOCKER,
                            native=False)
    assert r.ok and not r.service_started and r.result == "partial"
    assert r.record()["service"] == {"started": False, "answered": [], "why_not": "under emulation: " + BLOCKER}
    assert r.label() == "echo/cuda13 linux/arm64"
    assert r.as_json()["result"] == "partial" and r.as_json()["why_not_started"].endswith(BLOCKER)


def test_a_failed_check_is_a_failure_whatever_the_service_answered():
    r = smoke.VariantResult(variant(), [*passed("/health", "/ready"), smoke.Check("/info", False, "wrong")],
                            answered=["/health", "/ready", "/info"])
    assert r.result == "failed"


# --- the emulated path, with a fake engine and container ------------------------------

class FakeImages:
    def get(self, ref):
        return SimpleNamespace(attrs={"Config": {"User": "10001:10001", "Env": [], "Labels": {}}})


class FakeContainer:
    def __init__(self, log):
        self.log = log

    def with_command(self, argv):
        self.log.append(("command", argv))
        return self

    def start(self):
        self.log.append(("start",))
        return self

    def stop(self):
        self.log.append(("stop",))


@pytest.fixture
def fake_engine(monkeypatch):
    """Every effect of _check faked: the image is there, containers start, inside checks and strict exit pass."""
    log: list = []
    monkeypatch.setattr(runner, "_container", lambda v, env, gpu, engine=None, mounts=None: (
        log.append(("container", v.platform, engine.name if engine else None)) or FakeContainer(log)))
    monkeypatch.setattr(runner, "inside_checks", lambda *a, **k: passed("runs as non-root", "cuda-libs layer"))
    monkeypatch.setattr(runner, "strict_exit_check", lambda *a, **k: smoke.Check("strict exits 78", True, "exit 78"))
    monkeypatch.setattr(runner, "image_config_checks", lambda v, config: (passed("labels", "env defaults"), {}))

    def wait_health(container, port, timeout):
        log.append(("wait_health", port))
        return False, "the fake service never answers", None

    monkeypatch.setattr(runner, "wait_health", wait_health)
    monkeypatch.setattr(runner, "logs_tail", lambda *a, **k: "")

    def session(platform: str, name: str = "the default engine") -> smoke.Session:
        client = SimpleNamespace(images=FakeImages())
        s = smoke.Session(client, NO_GPU, engine=smoke.Engine(client, name, platform, local=True))
        # The image is in the engine already (how it gets there is tests/unit/test_smoke_images.py's).
        s.images = SimpleNamespace(ensure=lambda ref, platform: (ref, smoke.Check("image", True, "in the engine")))
        s.bytecode = None  # (tests/unit/test_smoke_bytecode.py)
        return s

    return SimpleNamespace(log=log, session=session)


def test_under_emulation_the_service_is_not_started_and_no_check_says_it_passed(fake_engine):
    r = smoke.check_variant(variant(), False, session=fake_engine.session("linux/amd64"))
    names = [c.name for c in r.checks]
    assert r.ok and r.result == "partial" and not r.native
    assert not any("service" in n and "not started" in n for n in names), names  # the old passing stand-in is gone
    assert "strict exits 78" in names and "cuda-libs layer" in names
    assert r.not_started.startswith("not started under emulation (linux/arm64 under QEMU on the default engine, "
                                    "a linux/amd64 engine): ") and BLOCKER in r.not_started
    assert ("command", ["sleep", "3600"]) in fake_engine.log  # a sleep, not the service (and no Python start for it)
    assert ("wait_health", 8080) not in fake_engine.log


def test_on_an_engine_of_its_own_platform_the_service_itself_is_started(fake_engine):
    r = smoke.check_variant(variant(), False, session=fake_engine.session("linux/arm64", "smoke.engines.linux/arm64"))
    assert r.native and r.engine == "smoke.engines.linux/arm64" and r.not_started == ""
    assert ("container", "linux/arm64", "smoke.engines.linux/arm64") in fake_engine.log
    assert ("wait_health", 8080) in fake_engine.log  # the service's own start, judged by /health
    assert r.result == "failed"  # this fake service never answers: a failure, never "partial"


def test_under_emulation_checks_inside_the_container_get_three_times_the_native_limit(fake_engine, monkeypatch):
    limits = []
    monkeypatch.setattr(runner, "inside_checks", lambda v, gpu, c, timeout, *a, **k: limits.append(timeout) or [])
    smoke.check_variant(variant(), False, session=fake_engine.session("linux/amd64"))
    smoke.check_variant(variant(), False, session=fake_engine.session("linux/amd64"), exec_timeout=5)
    assert limits == [3 * checks_mod.EXEC_TIMEOUT, 5]  # QEMU imports torch several times slower; a caller's limit stands


def test_gpus_go_to_cuda_variants_native_to_their_engine():
    nvidia = gr.decide(gr.HostFacts(gpu_nodes=("/dev/nvidia0",), runtimes=("nvidia",)))
    arm = variant(blocker=None)
    assert not smoke.gpu_for(arm, nvidia, "linux/amd64").requested  # QEMU cannot use the host's driver
    assert smoke.gpu_for(arm, nvidia, "linux/arm64") is nvidia  # a native arm64 GPU engine hands them out


def test_a_container_for_another_engine_talks_to_that_engine_natively(monkeypatch):
    from testcontainers.core import container as tc

    clients = []
    monkeypatch.setattr(tc, "DockerClient", lambda **kw: clients.append(kw))
    monkeypatch.setattr(runner.hostinfo, "host_platform", lambda: "linux/amd64")
    arm = variant(blocker=None)
    env = {"DOCKER_HOST": "ssh://ci@arm-host"}
    c = runner._container(arm, {}, NO_GPU, smoke.Engine(None, "smoke.engines.linux/arm64", "linux/arm64", env))
    assert clients == [{"environment": env}]  # testcontainers' client talks to that engine
    assert "platform" not in c._kwargs  # native there: no emulation asked for
    default = runner._container(arm, {}, NO_GPU)
    assert clients[-1] == {}  # the default engine: testcontainers' own ($DOCKER_HOST)
    assert default._kwargs["platform"] == "linux/arm64"  # on this amd64 machine's engine: under QEMU


def test_run_sends_each_platform_to_its_engine(monkeypatch):
    seen = []

    def check(v, gpu, ready_timeout, session):
        seen.append((v.platform, session.engine.name))
        return smoke.VariantResult(v, passed("/health"), answered=list(smoke.SERVICE_ENDPOINTS),
                                   engine=session.engine.name)

    monkeypatch.setattr(runner, "check_variant", check)
    monkeypatch.setattr(runner, "host_gpu_request", lambda client: NO_GPU)
    arm_engine = smoke.Engine(SimpleNamespace(images=None), "builders.linux/arm64", "linux/arm64")
    lines: list[str] = []
    chosen = [variant("linux/amd64", None), variant("linux/arm64", None)]
    results = smoke.run(chosen, SimpleNamespace(images=None), log=lines.append, jobs=1,
                        engines={"linux/arm64": arm_engine})
    assert seen == [("linux/amd64", "the default engine"), ("linux/arm64", "builders.linux/arm64")]
    assert [r.result for r in results] == ["ran", "ran"]
    assert any(line.startswith("smoke linux/arm64 on builders.linux/arm64, a linux/arm64 engine") for line in lines)


# --- torch is imported once per variant -------------------------------------------------

class ProbedContainer:
    """Answers `docker exec` the way a cpu image does; records every argv it was asked to run."""

    def __init__(self):
        self.ran = []

    def exec(self, argv):
        self.ran.append(argv)
        code = " ".join(argv)
        if "import json, torch" in code:
            out = {"torch": "2.5.1+cpu", "cuda": None, "available": False}
        else:  # the user, read-only root and system packages probe
            out = {"uid": 10001, "packages": {},
                   "dirs": {checks_mod.APP_DIR: os.strerror(30), **{d: "writable" for d in checks_mod.WRITABLE_DIRS}}}
        return SimpleNamespace(exit_code=0, output=(json.dumps(out) + "\n").encode())


def cpu_variant():
    return smoke.Variant("echo", "cpu", "linux/arm64", "127.0.0.1:5000/orch-mini/echo@" + digest("cpu"), 8080,
                         "0.1.0", "2.5.1", None, (), (), "")


def test_torch_in_the_container_is_taken_from_the_services_info_without_importing_torch_again():
    info = {"torch": "2.5.1+cpu", "torch_cuda": None, "cuda_available": False}
    container = ProbedContainer()
    checks = {c.name: c for c in checks_mod.inside_checks(cpu_variant(), False, container, 60, {}, info)}
    assert checks["torch in container"].ok
    assert "the service's process, on /info" in checks["torch in container"].detail
    assert not any("import json, torch" in " ".join(argv) for argv in container.ran)


def test_without_an_info_answer_torch_is_probed_in_the_container():
    container = ProbedContainer()
    checks = {c.name: c for c in checks_mod.inside_checks(cpu_variant(), False, container, 60, {}, None)}
    assert checks["torch in container"].ok and "/info" not in checks["torch in container"].detail
    assert any("import json, torch" in " ".join(argv) for argv in container.ran)


def test_info_reporting_another_torch_fails_the_check():
    info = {"torch": "2.4.0+cpu", "torch_cuda": None, "cuda_available": False}
    checks = {c.name: c for c in checks_mod.inside_checks(cpu_variant(), False, ProbedContainer(), 60, {}, info)}
    assert not checks["torch in container"].ok and "2.4.0" in checks["torch in container"].detail


# --- the manifest's records and the publish gate -----------------------------------------

@pytest.fixture
def mini(tmp_path):
    shutil.copytree(FIXTURES / "mini", tmp_path / "mini")
    return tmp_path / "mini" / "project.yaml"


def load(path, allow=()):
    if allow:
        path.write_text(path.read_text() + f"smoke:\n  allow_partial: {json.dumps(list(allow))}\n")
    return spec.load(path)


def fake_results(project):
    """What build hands publish, as far as backend_manifest reads it: one result per image, platform, backend."""
    out = []
    for bname, backend in project.backends.items():
        for platform in backend.platforms:
            for key in (["cuda-libs"] if backend.is_cuda else []) + list(project.services):
                image = SimpleNamespace(key=key, backend=backend, platform=platform,
                                        repository=project.repository(key), human_tags=(f"{bname}-v1",))
                out.append(SimpleNamespace(image=image, digest=digest(f"{key}{bname}{platform}"),
                                           assembled=SimpleNamespace(size=lambda: 1)))
    return out


def indexes(project):
    return {(k, b): digest(f"index {k}{b}") for b in project.backends for k in ["cuda-libs", *project.services]}


def image_of(project, results, backend, platform):
    return next(f"{r.image.repository}@{r.digest}" for r in results
                if (r.image.key, r.image.backend.name, r.image.platform) == ("echo", backend, platform))


def results_for(project, results, partial=("cuda13", "linux/arm64")):
    """Every echo variant passed; the one named `partial` never started its service."""
    out = []
    for r in results:
        if r.image.key != "echo":
            continue
        v = smoke.Variant("echo", r.image.backend.name, r.image.platform, f"{r.image.repository}@{r.digest}",
                          8080, "0.1.0", None, r.image.backend.cuda)
        if (v.backend, v.platform) == partial:
            out.append(smoke.VariantResult(v, passed("pull", "cuda-libs layer", "strict exits 78"),
                                           not_started="not started under emulation: " + BLOCKER, native=False))
        else:
            out.append(smoke.VariantResult(v, passed("pull", "/health", "/ready", "/info"),
                                           answered=list(smoke.SERVICE_ENDPOINTS)))
    return out


def test_a_partial_variant_the_project_does_not_name_is_not_promoted(mini):
    project = load(mini)
    checked = results_for(project, fake_results(project))
    with pytest.raises(publish.PartialNotAllowed) as e:
        publish.smoke_gate(project, checked, {}, {})
    assert "echo/cuda13 linux/arm64" in e.value.message and "nothing was promoted" in e.value.message
    assert BLOCKER in e.value.message
    assert "allow_partial" in e.value.hint and "smoke.engines or builders" in e.value.hint
    assert e.value.exit_code == 1


def test_a_partial_variant_named_in_allow_partial_is_promoted_and_the_manifest_says_so(mini):
    project = load(mini, ["echo/cuda13 linux/arm64"])
    results = fake_results(project)
    gate = publish.smoke_gate(project, results_for(project, results), {}, {})
    m = publish.backend_manifest(project, "echo", results, indexes(project), True, 0, None, gate.records)
    assert m["smoke"] == {"ran": True, "variants": 5, "partial": ["echo/cuda13 linux/arm64"]}
    arm = m["platforms"]["linux/arm64"]["backends"]["cuda13"]["smoke"]
    assert arm["result"] == "partial" and arm["allowed_by"] == "smoke.allow_partial"
    assert arm["service"]["started"] is False and BLOCKER in arm["service"]["why_not"]
    amd = m["platforms"]["linux/amd64"]["backends"]["cuda13"]["smoke"]
    assert amd["result"] == "ran" and amd["service"]["answered"] == ["/health", "/ready", "/info"]
    backends.validate(m, "test")
    assert "PARTIAL: not started under emulation" in backends.describe_smoke(arm, m["smoke"])


def test_digests_the_promoted_release_tested_are_reused_and_not_counted(mini):
    project = load(mini, ["echo/cuda13 linux/arm64"])
    results = fake_results(project)
    first = publish.smoke_gate(project, results_for(project, results), {}, {})
    previous = publish.backend_manifest(project, "echo", results, indexes(project), True, 0, None, first.records)
    reused = publish.reusable_records(project, {"echo": previous}, {})
    assert set(reused) == {image_of(project, results, b, p) for b, p in
                           [("cuda13", "linux/amd64"), ("cuda13", "linux/arm64"), ("cuda", "linux/amd64"),
                            ("cpu", "linux/amd64"), ("cpu", "linux/arm64")]}
    assert all(r["reused"] for r in reused.values())
    again = publish.smoke_gate(project, [], reused, {"echo": previous})
    m = publish.backend_manifest(project, "echo", results, indexes(project), True, 0, None, again.records)
    assert m["smoke"]["variants"] == 0  # this publish tested nothing
    assert m["platforms"]["linux/amd64"]["backends"]["cpu"]["smoke"]["reused"] is True
    assert "by an earlier publish" in backends.describe_smoke(m["platforms"]["linux/amd64"]["backends"]["cpu"]["smoke"])
    # Nothing changed and nothing was tested: the promoted manifest stands as it is (0 bytes to push).
    assert publish.same_release(previous, m)
    changed = copy.deepcopy(m)
    changed["platforms"]["linux/amd64"]["backends"]["cpu"]["image"] = f"x/y@{digest('new')}"
    assert not publish.same_release(previous, changed)


def test_a_partial_record_is_tested_again_once_its_platform_has_another_engine_or_is_no_longer_allowed(mini):
    project = load(mini, ["echo/cuda13 linux/arm64"])
    results = fake_results(project)
    gate = publish.smoke_gate(project, results_for(project, results), {}, {})
    previous = {"echo": publish.backend_manifest(project, "echo", results, indexes(project), True, 0, None,
                                                 gate.records)}
    arm = image_of(project, results, "cuda13", "linux/arm64")
    assert arm in publish.reusable_records(project, previous, {})
    assert arm not in publish.reusable_records(project, previous, {"linux/arm64": "smoke.engines.linux/arm64"})
    assert image_of(project, results, "cpu", "linux/arm64") in publish.reusable_records(
        project, previous, {"linux/arm64": "smoke.engines.linux/arm64"})  # a record that ran stays good
    no_longer_allowed = dataclasses.replace(project, smoke=spec.SmokeSettings())
    assert arm not in publish.reusable_records(no_longer_allowed, previous, {})


def test_manifests_without_records_or_without_smoke_are_tested_again(mini):
    project = load(mini)
    results = fake_results(project)
    old = publish.backend_manifest(project, "echo", results, indexes(project), True, 5)  # before records existed
    assert "smoke" not in old["platforms"]["linux/amd64"]["backends"]["cpu"]
    backends.validate(old, "a schemaVersion 2 manifest of an earlier release")  # still readable
    assert publish.reusable_records(project, {"echo": old}, {}) == {}
    no_smoke = publish.backend_manifest(project, "echo", results, indexes(project), False, 0)
    assert publish.reusable_records(project, {"echo": no_smoke}, {}) == {}
    assert backends.describe_smoke(None, no_smoke["smoke"]) == "not smoke-tested (published with --no-smoke)"
    assert backends.describe_smoke(None, old["smoke"]).startswith("no smoke record")


@pytest.mark.parametrize("change,where", [
    (lambda rec: rec["service"].update(started=False), "service/started"),  # "ran" means it started
    (lambda rec: rec.update(result="partial"), "(top level)"),  # partial needs allowed_by and why_not
    (lambda rec: rec.update(result="passed"), "result"),
])
def test_the_schema_refuses_a_record_that_overstates(mini, change, where):
    project = load(mini)
    results = fake_results(project)
    records = {r.variant.image: r.record() for r in results_for(project, results, partial=("none", ""))}
    m = publish.backend_manifest(project, "echo", results, indexes(project), True, 5, None, records)
    change(m["platforms"]["linux/amd64"]["backends"]["cpu"]["smoke"])
    with pytest.raises(UserError, match="backend manifest invalid at platforms/linux/amd64/backends/cpu/smoke"):
        backends.validate(m, "test")


# --- select and the command line print it -------------------------------------------------

def test_select_carries_the_chosen_images_record_and_the_cli_prints_it(mini, tmp_path):
    project = load(mini, ["echo/cuda13 linux/arm64"])
    results = fake_results(project)
    gate = publish.smoke_gate(project, results_for(project, results), {}, {})
    m = publish.backend_manifest(project, "echo", results, indexes(project), True, 0, None, gate.records)
    (tmp_path / "host").mkdir()
    choice = select_mod.select(m, probe.probe(tmp_path / "host", machine="aarch64"))
    assert choice.backend == "cpu" and choice.smoke["result"] == "ran" and choice.as_json()["smoke"] == choice.smoke
    (tmp_path / "m.json").write_text(json.dumps(m))
    proc = subprocess.run([sys.executable, "-m", "invoke", "-r", str(ROOT), "select", "--service", "echo",
                           "--project", str(mini), "--manifest", str(tmp_path / "m.json"), "--root",
                           str(tmp_path / "host"), "--no-verify"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "  smoke: ran: the service answered /health, /ready and /info; 4 checks passed on the default engine" \
        in proc.stderr + proc.stdout


def test_the_arch_list_is_taken_from_the_services_info_without_importing_torch_again():
    info = {"torch": "2.5.1+cu124", "torch_cuda": "12.4", "cuda_available": False, "torch_archs": ["sm_50", "sm_90"]}
    container = ProbedContainer()
    cuda = dataclasses.replace(cpu_variant(), backend="cuda", platform="linux/amd64", torch="2.5.1", cuda="12.4")
    checks = {c.name: c for c in checks_mod.inside_checks(cuda, False, container, 60, {}, info)}
    assert "the service's process, on /info" in checks["torch arch list"].detail
    assert not any("_cuda_getArchFlags" in " ".join(argv) for argv in container.ran)


def test_the_cuda_libs_probe_runs_in_the_same_process_as_the_other_inside_checks():
    class CudaImage(ProbedContainer):
        def exec(self, argv):
            if "INSIDE" in " ".join(argv) or "tempfile" in " ".join(argv):
                self.ran.append(argv)
                probe = {"runtime": {"loaded": True, "path": "/opt/site/cuda-libs/x", "version": 12040}}
                out = {"uid": 10001, "packages": {}, "cuda_probe": json.dumps(probe),
                       "dirs": {checks_mod.APP_DIR: os.strerror(30), **{d: "writable" for d in checks_mod.WRITABLE_DIRS}}}
                return SimpleNamespace(exit_code=0, output=(json.dumps(out) + "\n").encode())
            return super().exec(argv)

    container = CudaImage()
    info = {"torch": "2.5.1+cu124", "torch_cuda": "12.4", "cuda_available": False, "torch_archs": []}
    cuda = dataclasses.replace(cpu_variant(), backend="cuda", platform="linux/amd64", torch="2.5.1", cuda="12.4")
    checks = {c.name: c for c in checks_mod.inside_checks(cuda, False, container, 60, {}, info)}
    assert checks["cuda-libs layer"].ok, checks["cuda-libs layer"].detail
    assert checks["runs as non-root"].ok and checks["read-only root"].ok
    assert len(container.ran) == 1 and not any("--probe" in argv for argv in container.ran)
