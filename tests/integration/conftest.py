"""Integration fixtures: a TLS + basic-auth registry from Debian's docker-registry,
and a second Docker Engine.

The registry plays the kind users push to (HTTPS with a private CA, htpasswd
logins) on 127.0.0.1, next to the plain-HTTP embedded one. The second
engine is a dockerd of our own (socket, data root, exec root, bridge) next
to the shared one: to kill (test_faults) or to build on (test_builders).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from orchestrator.machine import registry_server

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


# -- a second Docker Engine ------------------------------------------------

class SecondEngine:
    """A second dockerd on its own socket, data root, exec root and bridge, next to the shared one.

    Never `--bridge none`: a dockerd started so deletes the host's docker0 (moby's
    removeDefaultBridgeInterface), which breaks every container of the shared engine.
    Its own bridge, made here and removed afterwards, leaves docker0 alone;
    --iptables/--ip-masq/--ip-forward off leave the host's firewall and sysctls alone.
    """

    def __init__(self):
        # Short: containerd's sockets live under the exec root and unix socket paths stop at 108 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="orch-dk-", dir="/tmp"))
        self.socket = self.dir / "docker.sock"
        self.address = f"unix://{self.socket}"
        self.bridge = f"orchft{uuid.uuid4().hex[:6]}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        octet = 16 + int(uuid.uuid4().hex[:2], 16) % 200
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", f"10.213.{octet}.1/24", "dev", self.bridge], check=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        (self.dir / "daemon.json").write_text("{}")  # not the host's /etc/docker/daemon.json
        with open(self.dir / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["dockerd", "--config-file", str(self.dir / "daemon.json"), "--host", self.address,
                 "--data-root", str(self.dir / "data"), "--exec-root", str(self.dir / "exec"),
                 "--pidfile", str(self.dir / "dockerd.pid"), "--bridge", self.bridge,
                 "--iptables=false", "--ip-masq=false", "--ip-forward=false"],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            ok = subprocess.run(["/usr/bin/docker", "-H", self.address, "version"], capture_output=True).returncode == 0
            if ok:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                unavailable(f"a second dockerd did not come up: {(self.dir / 'dockerd.log').read_text()[-800:]}")
            time.sleep(0.5)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def processes(self) -> list[int]:
        """Our daemon's processes (dockerd, its containerd and shims): their command lines name our dir."""
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(self.dir).encode() in cmdline.read_bytes():
                    pids.append(int(cmdline.parent.name))
            except OSError:
                pass
        return pids

    def remove(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()
        deadline = time.monotonic() + 15
        while self.processes() and time.monotonic() < deadline:
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.dir))]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        # Its data root (pulled images, BuildKit's cache: many thousands of files) is deleted in the
        # background while the next tests run; never across a file system that is still mounted there.
        subprocess.Popen(["rm", "-rf", "--one-file-system", str(self.dir)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def started_second_engine():
    """A SecondEngine, started; removed when the generator is closed (a fixture's teardown)."""
    for tool in ("dockerd", "ip"):
        if not shutil.which(tool):
            unavailable(f"{tool} is not installed (ci/setup.sh installs docker.io and iproute2)")
    if os.geteuid() != 0:
        unavailable("a second dockerd needs root")
    eng = SecondEngine()
    try:
        eng.start()
        yield eng
    finally:
        eng.remove()


@pytest.fixture
def second_engine(engine_ready):
    """A second engine of the test's own: for tests that kill it (test_faults)."""
    yield from started_second_engine()


@pytest.fixture(scope="module")
def module_second_engine(engine_ready):
    """One second engine for a module whose tests build on it but never kill it (test_builders):
    its start and its cold pulls are paid once."""
    yield from started_second_engine()
