"""The CI job scripts (ci/jobs/) run locally, in the pipelines' order, against
the real engine and a TLS + basic-auth registry: login, one build leg
(linux/amd64), smoke, promote (signing with the release key a CI secret
gives it), verify (as a host checks a release, with the committed public key
only).

The login script turns REGISTRY_USERNAME/REGISTRY_PASSWORD into Docker's
config.json in a private DOCKER_CONFIG, as docker/login-action does; the
later scripts run without those variables, so the credentials can only reach
`invoke` (and the engine's pulls in smoke) through config.json. (That is
also the only way they reach smoke's pulls today: orchestrator/smoke.py
pulls without an auth_config, so docker-py falls back to config.json, and
REGISTRY_USERNAME/REGISTRY_PASSWORD alone do not get an authenticated pull.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from orchestrator.oci import backends
from orchestrator.machine import daemon
from orchestrator import flow
from orchestrator.project import spec
from orchestrator.oci.registry import Registry, env_login

from ..conftest import ROOT, copy_fixture, trusting, unavailable
from ..secrets_scan import private_key_needles

pytestmark = pytest.mark.engine

JOBS = ROOT / "ci" / "jobs"
# What the job scripts must not inherit from the test's own environment.
SCRUBBED = ("REGISTRY_USERNAME", "REGISTRY_PASSWORD", "DOCKER_CONFIG", "ORCH_REGISTRY", "ORCH_PROJECT",
            "ORCH_CERTS_D")


def run_job(script: str, *args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    # cwd elsewhere on purpose: the scripts find the repository root themselves.
    return subprocess.run(["bash", str(JOBS / script), *args], env=env, cwd="/", capture_output=True, text=True,
                          timeout=timeout)


def shown(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.fixture
def engine_trusts(tls_registry):
    """The engine pulls from the TLS registry in smoke: it must trust its CA.

    127.0.0.0/8 is an insecure registry range by default (TLS without
    verification); where the engine is configured otherwise, the CA goes to
    /etc/docker/certs.d/<host>/ca.crt for the duration of the test.
    """
    cidrs = (daemon.docker_client().info().get("RegistryConfig") or {}).get("InsecureRegistryCIDRs") or []
    if "127.0.0.0/8" in cidrs:
        yield
        return
    d = Path("/etc/docker/certs.d") / tls_registry.host
    if d.exists():
        yield
        return
    if os.geteuid() != 0:
        unavailable(f"the engine does not trust {tls_registry.host}; run as root to write {d}/ca.crt")
    d.mkdir(parents=True)
    shutil.copy(tls_registry.ca, d / "ca.crt")
    try:
        yield
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ci(tls_registry, engine_trusts, first_build, release_key, tmp_path):
    """A one-platform copy of the mini project, trusting the release key, and the job scripts' environment
    (no credentials yet)."""
    path = copy_fixture("mini", tmp_path, f"orch-ci-{uuid.uuid4().hex[:8]}")
    trusting(release_key.public)(path.parent)
    path.write_text(path.read_text().replace("platforms: [linux/amd64, linux/arm64]", "platforms: [linux/amd64]"))
    flow.lock(spec.load(path), log=lambda *_: None)  # fresh locks are left alone
    docker_config = tmp_path / "docker-config"
    docker_config.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(ORCH_PROJECT=str(path), ORCH_REGISTRY=tls_registry.host, ORCH_CERTS_D=str(tls_registry.certs_d),
               DOCKER_CONFIG=str(docker_config), PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    yield env, path
    client = daemon.docker_client()
    for img in client.images.list(name=f"{tls_registry.host}/{spec.load(path).name}/*"):
        try:
            client.images.remove(img.id, force=True)
        except Exception:  # noqa: BLE001 - already gone
            pass


def test_login_with_a_wrong_password_fails_stores_nothing_and_prints_no_secret(ci, tls_registry, tmp_path):
    env, _ = ci
    wrong = f"wrong-{uuid.uuid4().hex}"
    proc = run_job("login.sh", env={**env, "REGISTRY_USERNAME": tls_registry.username,
                                    "REGISTRY_PASSWORD": wrong})
    assert proc.returncode != 0, shown(proc)
    out = proc.stdout + proc.stderr
    assert wrong not in out and tls_registry.password not in out
    assert "REGISTRY_PASSWORD" in out  # says which secret to check
    config = Path(env["DOCKER_CONFIG"]) / "config.json"
    assert not config.exists() or tls_registry.host not in json.loads(config.read_text()).get("auths", {})


def test_login_without_credentials_says_which_to_set(ci):
    env, _ = ci
    proc = run_job("login.sh", env=env)
    assert proc.returncode != 0
    assert "REGISTRY_USERNAME and REGISTRY_PASSWORD" in proc.stderr


def test_the_jobs_need_a_shared_registry(ci):
    env, _ = ci
    proc = run_job("build.sh", "linux/amd64", env={k: v for k, v in env.items() if k != "ORCH_REGISTRY"})
    assert proc.returncode != 0
    assert "set ORCH_REGISTRY" in proc.stderr


def test_login_build_smoke_promote_verify_through_config_json_and_the_signing_secret(ci, tls_registry, release_key,
                                                                                     monkeypatch):
    env, path = ci
    project = spec.load(path)
    name = f"{project.name}/echo"
    secret = tls_registry.password

    login = run_job("login.sh", env={**env, "REGISTRY_USERNAME": tls_registry.username,
                                     "REGISTRY_PASSWORD": secret})
    assert login.returncode == 0, shown(login)
    auths = json.loads((Path(env["DOCKER_CONFIG"]) / "config.json").read_text()).get("auths", {})
    assert tls_registry.host in auths  # a docker-login config.json, as docker/login-action leaves it

    outputs = [login.stdout + login.stderr]
    # From here on the credentials exist only in $DOCKER_CONFIG/config.json.
    assert "REGISTRY_PASSWORD" not in env and "REGISTRY_USERNAME" not in env
    build = run_job("build.sh", "linux/amd64", env=env)
    outputs.append(build.stdout + build.stderr)
    assert build.returncode == 0, shown(build)

    # Read the registry as a user with the right credentials would.
    monkeypatch.setenv("ORCH_CERTS_D", str(tls_registry.certs_d))
    monkeypatch.setenv("REGISTRY_USERNAME", tls_registry.username)
    monkeypatch.setenv("REGISTRY_PASSWORD", secret)
    login = env_login(os.environ, tls_registry.host)
    reg = Registry(tls_registry.host, login=login)
    after_build = set(reg.tags(name))
    assert after_build, "the build job pushed nothing"
    assert not after_build & {"0.1.0-cpu", "0.1.0-cuda", "0.1.0-backends"}, \
        f"the build job moved human tags: {sorted(after_build)}"

    local = lambda: daemon.docker_client().images.list(name=f"{tls_registry.host}/{name}")  # noqa: E731
    assert not local(), "the images are local already: smoke would not have to bring them in"
    smoke = run_job("smoke.sh", env=env)
    outputs.append(smoke.stdout + smoke.stderr)
    assert smoke.returncode == 0, shown(smoke)
    assert set(reg.tags(name)) == after_build  # smoke promotes nothing
    # It read each manifest and config with the credentials from config.json and ran exactly that config,
    # loaded from the job's blobs (none pulled); what it loaded stays, under smoke's own tags only.
    text = smoke.stdout + smoke.stderr
    assert text.count("= the published config digest of") >= 2 and "pull: pulled" not in text, shown(smoke)
    kept = local()
    try:
        assert kept and all(t.split(":")[-1].startswith("smoke-") for img in kept for t in img.tags), kept
    finally:
        for img in kept:
            for t in img.tags:
                daemon.docker_client().images.remove(t)

    key_text = release_key.private.read_text()
    promote = run_job("promote.sh", env={**env, "ORCH_SIGNING_KEY": key_text})  # the CI secret, promote's alone
    outputs.append(promote.stdout + promote.stderr)
    assert promote.returncode == 0, shown(promote)
    assert f"signed with {release_key.public.name}" in promote.stdout + promote.stderr or "new signature" in \
        promote.stdout + promote.stderr, shown(promote)

    # A host's check: the committed public key only, no machine key (a fresh state dir), no signing secret.
    verify = run_job("verify.sh", env=env)
    outputs.append(verify.stdout + verify.stderr)
    assert verify.returncode == 0, shown(verify)
    assert "variant(s) verified against" in verify.stdout + verify.stderr, shown(verify)

    tags = set(reg.tags(name))
    assert {"0.1.0-cpu", "0.1.0-cuda", "0.1.0-backends"} <= tags
    manifest = backends.fetch_manifest(f"{tls_registry.host}/{name}:0.1.0-backends", login)
    assert manifest["smoke"]["ran"] is True and manifest["smoke"]["variants"] >= 2
    assert set(manifest["platforms"]) == {"linux/amd64"}
    for backend in manifest["platforms"]["linux/amd64"]["backends"].values():
        assert reg.has_manifest(name, backend["image"].split("@")[1])
    needles = private_key_needles(release_key.private.read_bytes())
    for out in outputs:
        assert secret not in out and "Traceback" not in out
        assert [label for label, needle in needles.items() if needle in out.encode()] == [], "a job printed the key"

