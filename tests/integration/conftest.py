"""Integration fixtures: a TLS + basic-auth registry from Debian's docker-registry.

It plays the kind of registry users push to (HTTPS with a private CA,
htpasswd logins) on 127.0.0.1, next to the plain-HTTP embedded one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from orchestrator import registry_server

from ..conftest import unavailable
from ..tls import make_tls

# The embedded registry's config, plus TLS and htpasswd logins.
REGISTRY_CONFIG = registry_server.REGISTRY_CONFIG + """  tls:
    certificate: {cert}
    key: {key}
auth:
  htpasswd:
    realm: orch-test
    path: {htpasswd}
"""


@dataclass(frozen=True)
class TLSRegistry:
    host: str
    certs_d: Path  # laid out like /etc/docker/certs.d: <host>/ca.crt
    username: str
    password: str
    ca: Path

    def __repr__(self) -> str:  # keeps the password out of pytest's failure output
        return f"TLSRegistry({self.host!r})"


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd entry (the only kind docker-registry accepts)."""
    try:
        import bcrypt
    except ImportError:
        if not shutil.which("htpasswd"):
            unavailable("neither python bcrypt nor htpasswd (apache2-utils) is installed: pip install -e '.[test]'")
        return subprocess.run(["htpasswd", "-nbB", user, password], check=True, capture_output=True,
                              text=True).stdout.strip()
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory):
    if not shutil.which("docker-registry"):
        unavailable("Debian's docker-registry is not installed (ci/setup.sh installs it)")
    if not shutil.which("openssl"):
        unavailable("the openssl CLI is not installed (ci/setup.sh installs it)")
    d = tmp_path_factory.mktemp("tls-registry")
    tls = make_tls(d / "tls")
    user, password = "orch-tester", "pw-" + __import__("secrets").token_hex(8)
    (d / "htpasswd").write_text(htpasswd_line(user, password) + "\n")
    host = f"127.0.0.1:{_free_port()}"
    (d / "certs.d" / host).mkdir(parents=True)
    shutil.copy(tls["ca"], d / "certs.d" / host / "ca.crt")
    config = d / "config.yml"
    config.write_text(REGISTRY_CONFIG.format(root=d / "data", addr=host, cert=tls["cert"], key=tls["key"],
                                             htpasswd=d / "htpasswd"))
    log = open(d / "registry.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"https://{host}/v2/", verify=str(tls["ca"]), timeout=2).status_code == 401:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                unavailable(f"docker-registry with TLS did not come up: {(d / 'registry.log').read_text()[-500:]}")
            time.sleep(0.2)
        yield TLSRegistry(host, d / "certs.d", user, password, tls["ca"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
