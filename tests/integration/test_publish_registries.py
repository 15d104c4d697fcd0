"""Publishing to registries as users have them: TLS with a private CA and
basic auth, a namespace path, wrong credentials; and what `compression: zstd`
gets. The mini fixture's layers are already built and cached by the session
(`first_build`), so these publishes move blobs and write manifests only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from orchestrator import flow
from orchestrator.oci import backends
from orchestrator.project import spec
from orchestrator.common.errors import UserError
from orchestrator.oci.registry import Registry

from ..conftest import ROOT, copy_fixture

pytestmark = pytest.mark.engine


def project_copy(tmp_path: Path, registry: str, *, platforms: str | None = None, extra: str = "") -> Path:
    path = copy_fixture("mini", tmp_path, f"orch-reg-{uuid.uuid4().hex[:8]}")
    text = path.read_text().replace('python: "3.11"', f'python: "3.11"\nregistry: {registry}{extra}')
    if platforms:
        text = text.replace("platforms: [linux/amd64, linux/arm64]", f"platforms: [{platforms}]")
    path.write_text(text)
    return path


def use_tls_credentials(monkeypatch, tls_registry) -> None:
    monkeypatch.setenv("ORCH_CERTS_D", str(tls_registry.certs_d))
    monkeypatch.setenv("REGISTRY_USERNAME", tls_registry.username)
    monkeypatch.setenv("REGISTRY_PASSWORD", tls_registry.password)
    monkeypatch.delenv("ORCH_REGISTRY", raising=False)


@pytest.fixture
def tls_env(tls_registry, monkeypatch):
    use_tls_credentials(monkeypatch, tls_registry)
    return tls_registry


@pytest.fixture(scope="module")
def tls_published(tls_registry, first_build, tmp_path_factory):
    """One full publish (no smoke) of a copy of the mini fixture to the TLS registry, credentials from the
    environment: (project, report, its log lines). Read by the tests below; it moves about a gigabyte."""
    with pytest.MonkeyPatch.context() as mp:
        use_tls_credentials(mp, tls_registry)
        project = spec.load(project_copy(tmp_path_factory.mktemp("tls-publish"), tls_registry.host))
        logged: list[str] = []
        report = flow.publish(project, log=lambda *a: logged.append(" ".join(map(str, a))), smoke=False)
    return project, report, logged


def test_a_tls_registry_with_basic_auth_receives_a_full_publish_with_env_credentials(tls_env, tls_published):
    project, report, _ = tls_published
    reg = Registry(tls_env.host, login=project.login)  # the login from the environment, for this registry
    name = f"{project.name}/echo"
    assert {"0.1.0-cpu", "0.1.0-cuda", "0.1.0-backends"} <= set(reg.tags(name))
    manifest = backends.fetch_manifest(f"{project.repository('echo')}:0.1.0-backends", project.login)  # TLS, verified
    for entry in manifest["platforms"].values():
        for backend in entry["backends"].values():
            assert reg.has_manifest(name, backend["image"].split("@")[1])
    assert manifest["smoke"] == {"ran": False, "variants": 0}
    assert report.uploaded_bytes > 0


def test_no_layer_config_or_manifest_of_a_publish_holds_the_password_or_the_machines_ca(tls_env, tls_published):
    from orchestrator.common.places import state_dir
    from orchestrator.oci import signing

    from ..secrets_scan import credential_needles, local_ca_needles, private_key_needles, scan

    project, _, logged = tls_published  # signed with this machine's key: the registry is on loopback
    needles = {**credential_needles(tls_env.username, tls_env.password), **local_ca_needles(),
               **private_key_needles(signing.machine_key_paths(state_dir())[0].read_bytes())}
    # Every tag: images, indexes, configs (history, labels), layers, backend manifests, SBOMs, signatures, provenance.
    hits, blobs = scan(Registry(tls_env.host, login=project.login),
                       [f"{project.name}/{r}" for r in ("cuda-libs", *project.services)], needles)
    assert blobs > 20  # every platform's manifests, configs and layers, not a sample
    assert hits == []
    log = "\n".join(logged).encode()
    assert logged and [label for label, needle in needles.items() if needle in log] == []  # nor any log line


def test_a_wrong_password_exits_non_zero_pushes_nothing_and_prints_no_secret(tls_env, first_build, tmp_path):
    path = project_copy(tmp_path, tls_env.host)
    wrong = f"wrong-{uuid.uuid4().hex}"
    env = dict(os.environ, REGISTRY_PASSWORD=wrong, ORCH_CERTS_D=str(tls_env.certs_d))
    proc = subprocess.run([sys.executable, "-m", "invoke", "-r", str(ROOT), "publish", "--no-smoke",
                           "--project", str(path)], capture_output=True, text=True, env=env, cwd=path.parent)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert wrong not in out and tls_env.password not in out and "Traceback" not in out
    assert "REGISTRY_USERNAME" in out  # names the credential source that was used
    project = spec.load(path)  # the right password is in this process's environment
    assert Registry(tls_env.host, login=project.login).tags(f"{project.name}/echo") == []  # nothing pushed


def test_a_registry_with_a_namespace_path_gets_every_image_under_it(first_build, tmp_path, monkeypatch):
    monkeypatch.delenv("ORCH_REGISTRY", raising=False)
    ns = f"team-{uuid.uuid4().hex[:6]}"
    project = spec.load(project_copy(tmp_path, f"127.0.0.1:5000/{ns}"))
    flow.publish(project, log=lambda *_: None, smoke=False)
    reg = Registry("127.0.0.1:5000")
    try:
        assert "0.1.0-backends" in reg.tags(f"{ns}/{project.name}/echo")
        manifest = backends.fetch_manifest(f"127.0.0.1:5000/{ns}/{project.name}/echo:0.1.0-backends")
        image = manifest["platforms"]["linux/amd64"]["backends"]["cpu"]["image"]
        assert image.startswith(f"127.0.0.1:5000/{ns}/{project.name}/echo@sha256:")
    finally:
        for repo in ("echo", "cuda-libs"):
            name = f"{ns}/{project.name}/{repo}"
            for digest in {reg.get_manifest(name, t).digest for t in reg.tags(name)}:
                reg.delete_manifest(name, digest)


def test_zstd_layers_hold_the_same_tars_and_publish_refuses_them_where_the_engine_cannot_pull_them(
        first_build, tmp_path, monkeypatch):
    import hashlib

    import zstandard

    monkeypatch.delenv("ORCH_REGISTRY", raising=False)
    project = spec.load(project_copy(tmp_path, "127.0.0.1:5000", platforms="linux/amd64", extra="\ncompression: zstd"))
    results = flow.build(project, backends=["cpu"], log=lambda *_: None)
    echo = next(r for r in results if r.image.key == "echo")
    reg = Registry(project.registry)
    name = f"{project.name}/echo"
    try:
        m = reg.get_manifest(name, echo.digest).json
        assert {x["mediaType"] for x in m["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
        diff_ids = json.loads(reg.get_blob(name, m["config"]["digest"]))["rootfs"]["diff_ids"]
        gzip_echo = first_build[("echo", "cpu")].assembled
        assert diff_ids == [x.diff_id for x in gzip_echo.layers]  # the same tars, compressed otherwise
        last = m["layers"][-1]["digest"]
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(reg.get_blob(name, last))
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_ids[-1]
        with pytest.raises(UserError, match="cannot pull zstd"):
            flow.publish(project, log=lambda *_: None)
    finally:
        for digest in {reg.get_manifest(name, t).digest for t in reg.tags(name)}:
            reg.delete_manifest(name, digest)
