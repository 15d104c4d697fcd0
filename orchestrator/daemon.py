"""The Docker Engine and its build client: start dockerd when none answers,
find a client that runs BuildKit builds, register binfmt for foreign
platforms. Idempotent: a machine that is ready is left as it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import EnvironmentProblem
from .state import apt_install, is_root, say, state_dir

CA_BUNDLE_CANDIDATES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


def ca_bundle() -> str:
    for c in (os.environ.get("SSL_CERT_FILE"), *CA_BUNDLE_CANDIDATES):
        if c and Path(c).is_file():
            return c
    raise EnvironmentProblem("no CA bundle found", "set SSL_CERT_FILE to your CA bundle (builds need it as a secret)")


# --- the engine ---------------------------------------------------------

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


def engine_address() -> str:
    """Where the engine is: $DOCKER_HOST, which docker-py and every docker CLI we start both honour."""
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def docker_client(timeout: int = 600):
    import docker  # local import: unit tests of pure stages need no docker-py

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except Exception as e:  # noqa: BLE001 - docker-py raises several kinds
        raise EnvironmentProblem(f"no Docker Engine answers at {engine_address()} ({type(e).__name__})",
                                 "start one with `invoke engine.up` (as root) or set DOCKER_HOST") from None


def engine_running() -> bool:
    try:
        docker_client(timeout=5)
        return True
    except EnvironmentProblem:
        return False


def ensure_engine() -> str:
    if engine_running():
        return "running (left as it is)"
    if os.environ.get("DOCKER_HOST"):
        raise EnvironmentProblem(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer",
                                 "start that engine, or unset DOCKER_HOST to use the embedded one")
    if not shutil.which("dockerd"):
        apt_install("docker.io")
    if not is_root():
        raise EnvironmentProblem("dockerd is installed but not running", "start it (sudo dockerd &) or run as root")
    log = state_dir() / "dockerd.log"
    say(f"starting dockerd (log: {log})")
    with open(log, "ab") as fh:
        subprocess.Popen(["dockerd"], stdout=fh, stderr=fh, start_new_session=True)
    for _ in range(120):
        if engine_running():
            return "started dockerd"
        time.sleep(0.5)
    raise EnvironmentProblem(f"dockerd did not come up within 60 s; see {log}")


@dataclass(frozen=True)
class BuildClient:
    argv: tuple[str, ...]  # e.g. ("docker", "buildx", "build", "--load") or ("/usr/bin/docker", "build")
    env: tuple[tuple[str, str], ...]
    description: str


def _client_major(docker_bin: str) -> int | None:
    try:
        out = subprocess.run([docker_bin, "version", "--format", "{{.Client.Version}}"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return int(out.split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def build_client() -> BuildClient:
    """A client that runs BuildKit builds.

    A docker CLI >= 23 without the buildx plugin refuses BuildKit builds;
    Debian's docker.io CLI (20.10) has BuildKit built in.
    """
    candidates = []
    for c in (shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker"):
        if c and Path(c).exists() and c not in candidates:
            candidates.append(c)
    for c in candidates:
        if subprocess.run([c, "buildx", "version"], capture_output=True).returncode == 0:
            return BuildClient((c, "buildx", "build", "--load"), (), f"{c} buildx")
    for c in candidates:
        major = _client_major(c)
        if major is not None and major < 23:
            return BuildClient((c, "build"), (("DOCKER_BUILDKIT", "1"),), f"{c} (built-in BuildKit, client {major}.x)")
    raise EnvironmentProblem("no docker client that can run BuildKit builds",
                             "install the buildx plugin, or Debian's docker.io (its 20.10 CLI has BuildKit built in)")


# --- binfmt for running arm64 containers -------------------------------

QEMU_NAMES = {"arm64": "aarch64", "amd64": "x86_64"}


def ensure_binfmt(platform: str = "linux/arm64") -> str:
    """Register QEMU for a foreign platform (running its containers); nothing to do for the host's own."""
    arch = platform.split("/")[1]
    if arch == _host_arch():
        return f"{platform} is this machine's own architecture; no emulation needed"
    name = f"qemu-{QEMU_NAMES.get(arch, arch)}"
    entry = Path("/proc/sys/fs/binfmt_misc") / name
    if entry.exists():
        return f"{name} registered"
    if not shutil.which(f"{name}-static"):
        apt_install("qemu-user-static", "binfmt-support")
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], check=False)
    subprocess.run(["update-binfmts", "--enable", name], check=False, capture_output=True)
    if entry.exists():
        return f"registered {name}"
    raise EnvironmentProblem(f"could not register {name} with binfmt_misc",
                             "run as root: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
                             f"update-binfmts --enable {name}")


def _host_arch() -> str:
    m = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def host_platform() -> str:
    return f"linux/{_host_arch()}"


def base_platforms(project) -> list[str]:
    """The project's platforms plus this machine's: pip stages run on the build platform."""
    return list(dict.fromkeys([*project.platforms, host_platform()]))


