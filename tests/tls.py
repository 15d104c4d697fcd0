"""A throwaway CA and server certificate for tests that need TLS (openssl CLI, from ci/setup.sh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .conftest import unavailable


def make_tls(d: Path, names=("IP:127.0.0.1", "DNS:localhost")) -> dict[str, Path]:
    """A throwaway CA and a server certificate it signed, with the openssl CLI."""
    if not shutil.which("openssl"):
        unavailable("the openssl CLI is not installed (ci/setup.sh installs it)")
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
