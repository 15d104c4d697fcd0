"""Registry client identity: references, credential sources, challenges, the token flow.

The fake registries come from test_registry_transport; a fake
`docker-credential-test` on PATH plays a Docker credential helper.
"""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from orchestrator.oci import registry
from orchestrator.common.errors import UserError
from orchestrator.oci.registry import auth

from .test_registry_transport import fake, isolated  # noqa: F401 - fixtures


@pytest.mark.parametrize("ref,expected", [
    ("127.0.0.1:5000/morgan/tts:0.1.0-cuda", ("127.0.0.1:5000", "morgan/tts", "0.1.0-cuda")),
    ("127.0.0.1:5000/morgan/tts@sha256:abc", ("127.0.0.1:5000", "morgan/tts", "sha256:abc")),
    ("reg.example.com/a/b/c", ("reg.example.com", "a/b/c", "latest")),
    ("ghcr.io/acme/morgan/tts:1", ("ghcr.io", "acme/morgan/tts", "1")),
])
def test_references_split_into_host_repository_and_reference(ref, expected):
    assert registry.split_ref(ref) == expected


def test_challenges_parse_into_scheme_and_parameters():
    assert registry.parse_challenge('Bearer realm="https://auth/token",service="reg",scope="repository:a:pull"') == (
        "bearer", {"realm": "https://auth/token", "service": "reg", "scope": "repository:a:pull"})


# -- credential sources -------------------------------------------------------

def write_config(tmp_path, config: dict):
    d = tmp_path / "docker"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d / "config.json"


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


@pytest.fixture
def helper(tmp_path, monkeypatch):
    """docker-credential-test: knows reg.example.com and 127.0.0.1 hosts; logs what it was asked."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "docker-credential-test"
    script.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
read server
echo "$server" >> {tmp_path}/helper.log
case "$server" in
  reg.example.com|127.0.0.1:*) printf '{{"ServerURL":"%s","Username":"helper-user","Secret":"helper-s3cret"}}' "$server" ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "helper.log"


def test_credentials_come_from_the_environment_first_then_the_docker_config(tmp_path, monkeypatch):
    cfg = write_config(tmp_path, {"auths": {"https://reg.example.com/v1/": {"auth": b64("alice:s3cret")}}})
    assert registry.credentials_for("reg.example.com", cfg) == ("alice", "s3cret")
    assert registry.credentials_for("reg.example.com") == ("alice", "s3cret")  # $DOCKER_CONFIG/config.json
    creds, source = registry.find_credentials("reg.example.com")
    assert source == f"{cfg} auths" and creds.source == source
    assert registry.credentials_for("other.example.com", cfg) is None
    monkeypatch.setenv("REGISTRY_USERNAME", "bob")
    monkeypatch.setenv("REGISTRY_PASSWORD", "pw")
    login = registry.env_login(os.environ, "reg.example.com")  # read at the edge, for the project's registry
    assert registry.credentials_for("reg.example.com", cfg, login) == ("bob", "pw")
    assert registry.find_credentials("reg.example.com", login=login)[1] == "REGISTRY_USERNAME/REGISTRY_PASSWORD"


def test_the_default_config_is_shown_as_the_home_path(tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(json.dumps({"auths": {"r.test": {"auth": b64("a:b")}}}))
    assert registry.find_credentials("r.test")[1] == "~/.docker/config.json auths"


def test_a_credential_helper_answers_for_its_registry(tmp_path, helper):
    write_config(tmp_path, {"credHelpers": {"reg.example.com": "test"},
                            "auths": {"reg.example.com": {"auth": b64("file:fallback")}}})
    creds, source = registry.find_credentials("reg.example.com")
    assert (creds.username, creds.password) == ("helper-user", "helper-s3cret")
    assert source == "credential helper docker-credential-test"
    assert helper.read_text().split() == ["reg.example.com"]  # the server URL went on stdin


def test_the_default_credential_store_is_asked_when_nothing_else_matches(tmp_path, helper):
    write_config(tmp_path, {"credsStore": "test", "auths": {"reg.example.com": {}}})
    assert registry.credentials_for("reg.example.com") == ("helper-user", "helper-s3cret")
    creds, looked = registry.find_credentials("nowhere.example.com")
    assert creds is None and "docker-credential-test has none" in looked


def test_a_missing_helper_is_reported_not_fatal(tmp_path):
    write_config(tmp_path, {"credsStore": "desktop"})
    creds, looked = registry.find_credentials("reg.example.com")
    assert creds is None and "docker-credential-desktop is not installed" in looked


def test_docker_auth_config_gives_docker_py_the_same_credentials(tmp_path, helper):
    write_config(tmp_path, {"credHelpers": {"reg.example.com": "test"},
                            "auths": {"id.example.com": {"identitytoken": "refresh-me"}}})
    assert registry.docker_auth_config("reg.example.com/acme") == {"username": "helper-user",
                                                                   "password": "helper-s3cret"}
    assert registry.docker_auth_config("id.example.com") == {"identitytoken": "refresh-me"}
    assert registry.docker_auth_config("none.example.com") is None


def test_no_credential_shows_in_a_repr():
    creds = auth.Credentials("alice", "s3cret", "REGISTRY_USERNAME/REGISTRY_PASSWORD")
    assert "s3cret" not in repr(creds) and "alice" not in repr(creds)


# -- challenges and tokens ----------------------------------------------------

@pytest.fixture
def env_login(monkeypatch):
    """REGISTRY_USERNAME/REGISTRY_PASSWORD set; call it with the registry they are for to get the login."""
    monkeypatch.setenv("REGISTRY_USERNAME", "bob")
    monkeypatch.setenv("REGISTRY_PASSWORD", "pw")
    return lambda host: registry.env_login(os.environ, host)


def test_the_bearer_token_flow_fetches_a_token_with_the_credentials_and_retries(fake, env_login):
    f = fake(auth="bearer")
    f.tag_list["morgan/tts"] = ["1", "2"]
    reg = registry.Registry(f.host, login=env_login(f.host))
    assert reg.tags("morgan/tts") == ["1", "2"]
    paths = [p for _, p, _ in f.log]
    assert paths[0] == "/v2/morgan/tts/tags/list" and paths[1].startswith("/token?service=fake")
    assert f.log[-1][2] == "Bearer repository:morgan/tts:pull"
    assert f.token_requests[0][1] == "Basic " + b64("bob:pw")
    assert "pw" not in repr(reg)
    reg.tags("morgan/tts")
    assert len(f.token_requests) == 1  # the token is reused while it is valid


def test_basic_auth_is_answered_with_the_credentials(fake, env_login):
    f = fake(auth="basic")
    f.tag_list["a/b"] = ["1"]
    assert registry.Registry(f.host, login=env_login(f.host)).tags("a/b") == ["1"]
    assert f.log[-1][2] == "Basic " + b64("bob:pw")


def test_a_push_token_is_asked_for_when_a_new_repository_refuses_a_pull_token(fake, env_login):
    """GHCR and Docker Hub deny pull-scoped reads of a repository that does not exist yet."""
    f = fake(auth="bearer")
    f.deny_pull_only_for_missing = True
    reg = registry.Registry(f.host, login=env_login(f.host))
    assert not reg.has_blob("new/repo", "sha256:" + "0" * 64)
    scopes = [q.get("scope") for q, _ in f.token_requests]
    assert scopes == ["repository:new/repo:pull", "repository:new/repo:pull,push"]
    assert reg.upload_blob("new/repo", b"hello")[1] == 5


def test_wrong_credentials_for_a_token_service_are_a_clear_input_error(fake, monkeypatch, env_login):
    monkeypatch.setenv("REGISTRY_PASSWORD", "wrong-pw-123")
    f = fake(auth="bearer")
    with pytest.raises(UserError, match="token service refused the credentials from REGISTRY_USERNAME") as e:
        registry.Registry(f.host, login=env_login(f.host)).tags("morgan/tts")
    assert "wrong-pw-123" not in str(e.value) + repr(e.value)


@pytest.mark.parametrize("source", ["env", "auths", "helper"])
def test_a_401_names_the_credential_source_and_never_the_secret(fake, tmp_path, monkeypatch, helper, source):
    f = fake(auth="basic", password="right")
    if source == "env":
        monkeypatch.setenv("REGISTRY_USERNAME", "bob")
        monkeypatch.setenv("REGISTRY_PASSWORD", "helper-s3cret")
        expected = "REGISTRY_USERNAME/REGISTRY_PASSWORD"
    elif source == "auths":
        cfg = write_config(tmp_path, {"auths": {f.host: {"auth": b64("bob:helper-s3cret")}}})
        expected = f"{cfg} auths"
    else:
        write_config(tmp_path, {"credHelpers": {f.host: "test"}})
        expected = "credential helper docker-credential-test"
    with pytest.raises(UserError) as e:
        registry.Registry(f.host, login=registry.env_login(os.environ, f.host)).upload_blob("a/b", b"data")
    text = str(e.value) + repr(e.value) + str(e.value.hint)
    assert expected in str(e.value) and "401" in str(e.value) and "docker login" in e.value.hint
    assert "helper-s3cret" not in text and b64("bob:helper-s3cret") not in text
    assert e.value.exit_code == 2
    assert not f.blobs


def test_a_401_without_credentials_says_where_it_looked(fake):
    f = fake(auth="basic")
    with pytest.raises(UserError, match="no credentials") as e:
        registry.Registry(f.host).tags("a/b")
    assert "REGISTRY_USERNAME/REGISTRY_PASSWORD" in e.value.hint


def test_ping_does_not_need_credentials(fake):
    f = fake(auth="bearer")
    assert registry.Registry(f.host).ping()
    registry.Registry(f.host).check()
