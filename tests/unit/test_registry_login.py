"""REGISTRY_USERNAME/REGISTRY_PASSWORD belong to one registry: the project's, or the one REGISTRY_HOST names.

The pair is read once, where the project file is loaded, into an `EnvLogin`
that knows its host; every registry client is handed it and sends it to
that host alone. Docker's config.json entries and credential helpers answer
per host as before. The base image is pulled through a second registry here
(real TLS on loopback, a bearer token service like Docker Hub's): neither it
nor its token service may see the project registry's password.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from orchestrator.build import bases
from orchestrator.common.errors import UserError
from orchestrator.debian import basepin
from orchestrator.oci import registry
from orchestrator.project import spec

from ..conftest import FIXTURES
from ..tls import make_tls
from .test_registry_transport import fake, isolated  # noqa: F401 - fixtures

PROJECT_USER, PROJECT_PASSWORD = "ci-job", "glpat-project-s3cret"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def leaked(headers) -> list[str]:
    """The Authorization headers (or anything) that carry the project registry's password, in any form."""
    needles = (PROJECT_PASSWORD, b64(f"{PROJECT_USER}:{PROJECT_PASSWORD}"))
    return [h for h in headers if h and any(n in h for n in needles)]


@pytest.fixture(autouse=True)
def no_registry_host(monkeypatch):
    monkeypatch.delenv("REGISTRY_HOST", raising=False)


# --- which host the environment's pair is for --------------------------------------------

ENV = {"REGISTRY_USERNAME": PROJECT_USER, "REGISTRY_PASSWORD": PROJECT_PASSWORD}


def test_the_pair_belongs_to_the_project_registry_and_to_no_other_host():
    login = registry.env_login(ENV, "registry.gitlab.example.com/acme/morgan")
    assert login.host == "registry.gitlab.example.com"
    creds, source = registry.find_credentials("registry.gitlab.example.com", login=login)
    assert (creds.username, creds.password, source) == (PROJECT_USER, PROJECT_PASSWORD, "REGISTRY_USERNAME/REGISTRY_PASSWORD")
    for other in ("registry-1.docker.io", "docker.io", "ghcr.io", "registry.gitlab.example.com:5050", "quay.io"):
        creds, looked = registry.find_credentials(other, login=login)
        assert creds is None, other
        assert "REGISTRY_USERNAME/REGISTRY_PASSWORD (for registry.gitlab.example.com only)" in looked
    assert registry.docker_auth_config("ghcr.io/acme/x", login) is None
    assert registry.docker_auth_config("registry.gitlab.example.com/acme/x", login) == {
        "username": PROJECT_USER, "password": PROJECT_PASSWORD}


def test_the_port_is_part_of_the_host():
    login = registry.env_login(ENV, "127.0.0.1:5000")
    assert login.applies_to("127.0.0.1:5000") and not login.applies_to("127.0.0.1:5001")


def test_registry_host_names_another_registry_for_the_pair():
    login = registry.env_login({**ENV, "REGISTRY_HOST": "docker.io"}, "ghcr.io/acme")
    assert login.host == "docker.io"
    assert login.applies_to("registry-1.docker.io") and login.applies_to("index.docker.io")  # Docker Hub's names
    assert not login.applies_to("ghcr.io")


@pytest.mark.parametrize("environ,project_registry", [
    ({"REGISTRY_USERNAME": "u"}, "ghcr.io"),  # half a pair is no pair
    ({"REGISTRY_PASSWORD": "p"}, "ghcr.io"),
    ({"REGISTRY_USERNAME": "", "REGISTRY_PASSWORD": "p"}, "ghcr.io"),
    (ENV, None),  # no host to tie them to: they go nowhere
])
def test_without_a_whole_pair_and_a_host_there_is_no_login(environ, project_registry):
    assert registry.env_login(environ, project_registry) is None


def test_clients_without_a_login_never_read_the_environment(monkeypatch):
    monkeypatch.setenv("REGISTRY_USERNAME", PROJECT_USER)
    monkeypatch.setenv("REGISTRY_PASSWORD", PROJECT_PASSWORD)
    creds, looked = registry.find_credentials("ghcr.io")
    assert creds is None and "REGISTRY_USERNAME/REGISTRY_PASSWORD (not set)" in looked


def test_docker_config_entries_still_answer_per_host_next_to_the_pair(tmp_path):
    (tmp_path / "docker").mkdir(exist_ok=True)
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hub-user:hub-token")},
        "registry.gitlab.example.com": {"auth": b64("file-user:file-pw")}}}))
    login = registry.env_login(ENV, "registry.gitlab.example.com")
    assert registry.credentials_for("registry-1.docker.io", login=login) == ("hub-user", "hub-token")
    assert registry.credentials_for("registry.gitlab.example.com", login=login) == (PROJECT_USER, PROJECT_PASSWORD)
    assert registry.credentials_for("ghcr.io", login=login) is None


def test_the_login_is_never_shown():
    login = registry.env_login(ENV, "ghcr.io")
    assert PROJECT_PASSWORD not in repr(login) and PROJECT_USER not in repr(login)
    assert PROJECT_PASSWORD not in repr(registry.Registry("ghcr.io", login=login))


def test_a_client_of_another_host_says_the_pair_is_not_for_it(fake):
    f = fake(auth="basic", user=PROJECT_USER, password=PROJECT_PASSWORD)
    login = registry.env_login(ENV, "127.0.0.1:1")  # the project's registry is elsewhere
    with pytest.raises(UserError) as e:
        registry.Registry(f.host, login=login).tags("a/b")
    assert "for 127.0.0.1:1 only" in str(e.value) and "401" in str(e.value)
    assert leaked(a for _, _, a in f.log) == []


def test_the_project_file_loads_the_pair_for_its_registry(tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "mini", tmp_path / "mini")
    pf = tmp_path / "mini" / "project.yaml"
    pf.write_text(pf.read_text() + "registry: registry.gitlab.example.com/acme\n")
    monkeypatch.delenv("ORCH_REGISTRY", raising=False)
    monkeypatch.setenv("REGISTRY_USERNAME", PROJECT_USER)
    monkeypatch.setenv("REGISTRY_PASSWORD", PROJECT_PASSWORD)
    project = spec.load(pf)
    assert project.login.host == "registry.gitlab.example.com"
    assert PROJECT_PASSWORD not in repr(project)
    monkeypatch.setenv("REGISTRY_HOST", "ghcr.io")
    assert spec.load(pf).login.host == "ghcr.io"


# --- a base pulled from a second registry over TLS -----------------------------------------

class TokenService(ThreadingHTTPServer):
    """A bearer token service on loopback over TLS, as Docker Hub's auth.docker.io: anonymous pulls
    get a token; every request's Authorization header is recorded."""

    def __init__(self, cert, key):
        super().__init__(("127.0.0.1", 0), self.Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.seen: list[str | None] = []
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}/token"

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.server.seen.append(self.headers.get("Authorization"))
            scopes = parse_qs(urlsplit(self.path).query).get("scope", [])
            body = json.dumps({"token": "|".join(scopes), "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


def base_image(f) -> str:
    """A one-layer linux/amd64 image behind an index, as library/python:3.11-slim-bookworm on Docker Hub."""
    import gzip
    import io
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        data = b"PRETTY_NAME=stand-in\n"
        info = tarfile.TarInfo("etc/os-release")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                         "config": {}}).encode()
    name = "library/python"
    layer_d, config_d = f.add_blob(name, layer), f.add_blob(name, config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": registry.OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d,
                                      "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_d,
                                       "size": len(layer)}]}).encode()
    m_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    f.manifests[(name, m_digest)] = (registry.OCI_MANIFEST, manifest)
    index = json.dumps({"schemaVersion": 2, "mediaType": registry.OCI_INDEX, "manifests": [
        {"mediaType": registry.OCI_MANIFEST, "digest": m_digest, "size": len(manifest),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    f.manifests[(name, "3.11-slim-bookworm")] = (registry.OCI_INDEX, index)
    return f"{f.host}/{name}:3.11-slim-bookworm"


@pytest.fixture
def two_registries(fake, tmp_path, monkeypatch):
    """The project's registry (basic auth with the CI job's login, on loopback) and a second one holding
    the base, over TLS from a private CA, whose bearer tokens come from a token service that records."""
    tls = make_tls(tmp_path / "tls")
    tokens = TokenService(str(tls["cert"]), str(tls["key"]))
    second = fake(auth="bearer", tls=(str(tls["cert"]), str(tls["key"])))
    second.realm = tokens.url
    (tmp_path / "certs.d" / second.host).mkdir(parents=True)
    shutil.copy(tls["ca"], tmp_path / "certs.d" / second.host / "ca.crt")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls["ca"]))  # the token service's certificate: the same CA
    project_reg = fake(auth="basic", user=PROJECT_USER, password=PROJECT_PASSWORD)
    monkeypatch.setenv("REGISTRY_USERNAME", PROJECT_USER)
    monkeypatch.setenv("REGISTRY_PASSWORD", PROJECT_PASSWORD)
    monkeypatch.delenv("ORCH_REGISTRY", raising=False)
    image = base_image(second)
    shutil.copytree(FIXTURES / "mini", tmp_path / "mini")
    pf = tmp_path / "mini" / "project.yaml"
    text = pf.read_text().replace("image: docker.io/library/python:3.11-slim-bookworm", f"image: {image}")
    pf.write_text(text.replace("when: always", "when: offline") + f"registry: {project_reg.host}\n")
    (tmp_path / "mini" / basepin.PIN_FILE).unlink()  # no pin yet: the base is pulled
    try:
        yield spec.load(pf), project_reg, second, tokens
    finally:
        tokens.shutdown()
        tokens.server_close()


def pull_base(project):
    """bases._pull as ensure() calls it for an unpinned base (never a bootstrap: that needs the network)."""
    reg = registry.Registry(project.registry, login=project.login)
    _, name, _ = registry.split_ref(basepin.repository(project) + ":x")
    pulled = bases._pull(project, "linux/amd64", reg, name, None, lambda *_: None)
    assert pulled is not None, "the second registry did not answer"
    return pulled


@pytest.mark.parametrize("ref,qualified", [
    ("python:3.11-slim", "docker.io/library/python:3.11-slim"),
    ("library/python:3.11-slim", "docker.io/library/python:3.11-slim"),
    ("docker.io/library/python:3.11", "docker.io/library/python:3.11"),
    ("127.0.0.1:5001/library/python:3.11", "127.0.0.1:5001/library/python:3.11"),  # a port: a registry
    ("registry.example.com/base/python", "registry.example.com/base/python"),
    ("localhost/base:1", "localhost/base:1"),
])
def test_a_base_image_name_is_read_as_docker_reads_it(ref, qualified):
    assert bases.qualified(ref) == qualified


def test_a_base_pulled_from_a_second_registry_gets_none_of_the_project_registrys_login(two_registries):
    project, project_reg, second, tokens = two_registries
    assert project.login.host == project_reg.host
    found, how = pull_base(project)
    assert how == f"pulled {project.base.image} and pinned"
    assert found.repository.startswith(project_reg.host)
    # The second registry and its token service were asked (anonymously), and got nothing of ours.
    assert tokens.seen and second.log
    assert leaked(tokens.seen) == [] and all(h is None for h in tokens.seen)
    assert leaked(a for _, _, a in second.log) == []
    assert all(a is None or a.startswith("Bearer ") for _, _, a in second.log)
    # The project's registry did get the login: it is the one it belongs to.
    assert leaked(a for _, _, a in project_reg.log)
    assert basepin.read_pins(project)["linux/amd64"].source == "pulled"


def test_the_second_registrys_own_docker_login_is_what_it_gets(two_registries, tmp_path):
    project, project_reg, second, tokens = two_registries
    (tmp_path / "docker").mkdir(exist_ok=True)
    (tmp_path / "docker" / "config.json").write_text(json.dumps({"auths": {second.host: {"auth": b64("hub:own-pw")}}}))
    pull_base(project)
    assert tokens.seen and set(tokens.seen) == {"Basic " + b64("hub:own-pw")}  # per host, from config.json
    assert leaked(tokens.seen) == [] and leaked(a for _, _, a in second.log) == []
