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

from ..conftest import unavailable

REGISTRY_CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: {addr}
  tls:
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


def make_tls(d: Path, names=("IP:127.0.0.1", "DNS:localhost")) -> dict[str, Path]:
    """A throwaway CA and a server certificate it signed, with the openssl CLI."""
    d.mkdir(parents=True, exist_ok=True)
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=orch test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text(f"subjectAltName={','.join(names)}\nbasicConstraints=CA:FALSE\n"
                               "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n"
                               "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


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
