"""Registry client logic: references, credentials, challenges, retries.

A tiny HTTP server on 127.0.0.1 plays the token service and a registry that
demands a bearer token, the flow real registries use.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from orchestrator import registry


@pytest.mark.parametrize("ref,expected", [
    ("127.0.0.1:5000/morgan/tts:0.1.0-cuda", ("127.0.0.1:5000", "morgan/tts", "0.1.0-cuda")),
    ("127.0.0.1:5000/morgan/tts@sha256:abc", ("127.0.0.1:5000", "morgan/tts", "sha256:abc")),
    ("reg.example.com/a/b/c", ("reg.example.com", "a/b/c", "latest")),
])
def test_references_split_into_host_repository_and_reference(ref, expected):
    assert registry.split_ref(ref) == expected


def test_credentials_come_from_the_environment_first_then_the_docker_config(tmp_path, monkeypatch):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {"reg.example.com": {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    monkeypatch.delenv("REGISTRY_USERNAME", raising=False)
    monkeypatch.delenv("REGISTRY_PASSWORD", raising=False)
    assert registry.credentials_for("reg.example.com", cfg) == ("alice", "s3cret")
    assert registry.credentials_for("other.example.com", cfg) is None
    monkeypatch.setenv("REGISTRY_USERNAME", "bob")
    monkeypatch.setenv("REGISTRY_PASSWORD", "pw")
    assert registry.credentials_for("reg.example.com", cfg) == ("bob", "pw")


def test_challenges_parse_into_scheme_and_parameters():
    assert registry.parse_challenge('Bearer realm="https://auth/token",service="reg",scope="repository:a:pull"') == (
        "bearer", {"realm": "https://auth/token", "service": "reg", "scope": "repository:a:pull"})


class _Fake(BaseHTTPRequestHandler):
    calls: list = []
    fail_first = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        _Fake.calls.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/token"):
            ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(b"bob:pw").decode()
            self._reply(200 if ok else 401, {"token": "tok123"} if ok else {})
        elif _Fake.fail_first > 0:
            _Fake.fail_first -= 1
            self._reply(503, {})
        elif self.headers.get("Authorization") != "Bearer tok123":
            port = self.server.server_address[1]
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="http://127.0.0.1:{port}/token",service="fake"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._reply(200, {"tags": ["1", "2"]})

    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_registry(monkeypatch):
    _Fake.calls, _Fake.fail_first = [], 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("REGISTRY_USERNAME", "bob")
    monkeypatch.setenv("REGISTRY_PASSWORD", "pw")
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_bearer_token_flow_fetches_a_token_with_the_credentials_and_retries(fake_registry):
    reg = registry.Registry(fake_registry)
    assert reg.tags("morgan/tts") == ["1", "2"]
    paths = [p for p, _ in _Fake.calls]
    assert paths[0] == "/v2/morgan/tts/tags/list" and paths[1].startswith("/token?service=fake")
    assert _Fake.calls[-1][1] == "Bearer tok123"
    assert "pw" not in repr(reg)


def test_server_errors_are_retried_with_backoff(fake_registry, monkeypatch):
    monkeypatch.setattr(registry.time, "sleep", lambda s: None)
    _Fake.fail_first = 2
    assert registry.Registry(fake_registry).tags("morgan/tts") == ["1", "2"]


def test_wrong_credentials_are_a_clear_input_error(fake_registry, monkeypatch):
    monkeypatch.setenv("REGISTRY_PASSWORD", "wrong")
    with pytest.raises(registry.UserError, match="token service refused"):
        registry.Registry(fake_registry).tags("morgan/tts")
