"""The registry client against a real registry with TLS from a private CA and htpasswd logins."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import pytest

from orchestrator.oci import registry
from orchestrator.common.errors import EnvironmentProblem, UserError


@pytest.fixture
def login(tls_registry, tmp_path, monkeypatch):
    """Trust from the certs.d-style dir, credentials from the environment, nothing from this machine."""
    monkeypatch.setenv("ORCH_CERTS_D", str(tls_registry.certs_d))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("REGISTRY_USERNAME", tls_registry.username)
    monkeypatch.setenv("REGISTRY_PASSWORD", tls_registry.password)
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "ORCH_INSECURE_REGISTRIES"):
        monkeypatch.delenv(var, raising=False)
    return tls_registry


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """~70 MB of random bytes: two 64 MiB chunks."""
    path = tmp_path_factory.mktemp("blob") / "layer.bin"
    h = hashlib.sha256()
    with open(path, "wb") as fh:
        for _ in range(70):
            piece = os.urandom(1_000_000)
            h.update(piece)
            fh.write(piece)
    return path, "sha256:" + h.hexdigest(), path.stat().st_size


def client(tls, **kw) -> registry.Registry:
    """A client of the TLS registry with the environment's login, read now (as the project file's loader does)."""
    return registry.Registry(tls.host, login=registry.env_login(os.environ, tls.host), **kw)


def repo() -> str:
    return f"orch-test-{uuid.uuid4().hex[:8]}/tls"


def test_a_large_file_goes_up_over_https_in_chunks_and_reads_back_verified(login, big_file):
    path, digest, size = big_file
    reg = client(login)
    name = repo()
    seen = []
    assert reg.upload_blob_file(name, path, digest, size, progress=lambda done, total: seen.append(done)) == (
        digest, size)
    assert reg.base == f"https://{login.host}/v2"
    assert len(seen) == 2 and seen[-1] == size
    assert reg.blob_size(name, digest) == size
    h = hashlib.sha256()
    with reg.open_blob(name, digest) as resp:
        for piece in resp.iter_content(1 << 20):
            h.update(piece)
    assert "sha256:" + h.hexdigest() == digest
    assert reg.upload_blob_file(name, path, digest, size) == (digest, 0)  # there already
    other = name.replace("/tls", "/other")
    assert reg.upload_blob_file(other, path, digest, size, mount_from=[name]) == (digest, 0)  # mounted


def test_a_manifest_goes_up_and_comes_back(login):
    reg = client(login)
    name = repo()
    layer = b"layer " + uuid.uuid4().bytes
    reg.upload_blob(name, registry.EMPTY_JSON)
    reg.upload_blob(name, layer)
    body = json.dumps({
        "schemaVersion": 2, "mediaType": registry.OCI_MANIFEST,
        "config": {"mediaType": registry.OCI_EMPTY, "digest": registry.sha256_digest(registry.EMPTY_JSON), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": registry.sha256_digest(layer),
                    "size": len(layer)}],
    }).encode()
    digest = reg.put_manifest(name, "v1", body, registry.OCI_MANIFEST)
    m = reg.get_manifest(name, "v1")
    assert m.digest == digest and m.body == body and m.media_type == registry.OCI_MANIFEST
    assert reg.tags(name) == ["v1"]
    assert reg.put_manifest_if_changed(name, "v1", body, registry.OCI_MANIFEST) == (digest, 0)


def test_a_wrong_password_names_its_source_pushes_nothing_and_never_shows_the_password(login, monkeypatch, tmp_path):
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("REGISTRY_PASSWORD", wrong)
    data = b"never stored " + uuid.uuid4().bytes
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest, name = registry.sha256_digest(data), repo()
    with pytest.raises(UserError) as e:
        client(login).upload_blob_file(name, path, digest, len(data))
    text = f"{e.value}\n{e.value!r}\n{e.value.hint}"
    assert "REGISTRY_USERNAME/REGISTRY_PASSWORD" in str(e.value) and "401" in str(e.value)
    assert wrong not in text and login.password not in text
    assert e.value.exit_code == 2
    monkeypatch.setenv("REGISTRY_PASSWORD", login.password)
    assert not client(login).has_blob(name, digest)


def test_without_the_ca_the_error_says_where_to_put_it(login, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_CERTS_D", str(tmp_path / "empty"))
    with pytest.raises(EnvironmentProblem, match="not trusted") as e:
        client(login, retries=0).tags(repo())
    assert str(tmp_path / "empty" / login.host / "ca.crt") in str(e.value)
