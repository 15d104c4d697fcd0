"""The Docker Engine and its build client: start dockerd when none answers,
find a client that runs BuildKit builds, register binfmt for foreign
platforms. Idempotent: a machine that is ready is left as it is.

Builders: each platform builds on the engine `builders:` names for it
(unix://, tcp:// with TLS, ssh://), the rest on the default engine
($DOCKER_HOST or the local socket). docker-py and every docker CLI started
for a builder get that builder's DOCKER_HOST (and TLS variables)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.common import hostinfo
from orchestrator.common.errors import EnvironmentProblem
from orchestrator.common.places import state_dir
from orchestrator.machine.system import apt_install, is_root, say
from orchestrator.project.spec import Builder


def ca_bundle() -> str:
    """The CA bundle builds get as a BuildKit secret (orchestrator.common.hostinfo's order)."""
    found = hostinfo.ca_bundle()
    if found is None:
        raise EnvironmentProblem("no CA bundle found",
                                 "set SSL_CERT_FILE to your CA bundle (builds need it as a secret), or install "
                                 "ca-certificates")
    return found


# --- the engine ---------------------------------------------------------

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"


def engine_address(builder: Builder | None = None) -> str:
    """Where the engine is: the builder's host, else $DOCKER_HOST, which docker-py and every docker CLI we start honour."""
    return builder.host if builder is not None else os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def docker_client(timeout: int = 600, builder: Builder | None = None):
    """A docker-py client of the default engine, or of a builder; EnvironmentProblem when none answers."""
    address = engine_address(builder)
    configured = builder is not None and builder.key
    if configured and builder.cert_path:
        missing = [f for f in CERT_FILES if not (Path(builder.cert_path) / f).is_file()]
        if missing:
            raise EnvironmentProblem(f"{builder.key}.cert_path {builder.cert_path} lacks {', '.join(missing)}",
                                     "put the engine's CA (ca.pem) and this client's certificate and key "
                                     "(cert.pem, key.pem) there, as for DOCKER_CERT_PATH")
    try:
        client = _from_env(builder_env(builder), timeout, ssh=address.startswith("ssh://"))
        client.ping()
        return client
    except Exception as e:  # noqa: BLE001 - docker-py raises several kinds
        if configured:
            raise EnvironmentProblem(f"no Docker Engine answers at {address} ({builder.key}; {type(e).__name__})",
                                     f"start that engine, or fix {builder.key} in the project file; "
                                     + _reach_hint(builder)) from None
        raise EnvironmentProblem(f"no Docker Engine answers at {address} ({type(e).__name__})",
                                 "start one with `invoke engine.up` (as root) or set DOCKER_HOST") from None


def _from_env(env: dict, timeout: int, ssh: bool):
    """docker.from_env(environment=env), except that an engine's TLS trusts DOCKER_CERT_PATH's ca.pem only.

    requests lets REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE) replace a session's
    CA on every request, so with a system bundle in the environment the
    engine's own CA was ignored and its certificate refused.
    """
    import docker

    kwargs = docker.utils.kwargs_from_env(environment=env)
    if "tls" not in kwargs:
        return docker.DockerClient(timeout=timeout, use_ssh_client=ssh, **kwargs)

    class EngineAPI(docker.APIClient):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            settings["verify"] = self.verify if verify is None else verify
            return settings

    client = docker.DockerClient.__new__(docker.DockerClient)  # DockerClient.__init__ only makes its APIClient
    client.api = EngineAPI(timeout=timeout, **kwargs)
    return client


def engine_running(builder: Builder | None = None) -> bool:
    try:
        docker_client(timeout=5, builder=builder)
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


# --- builders: the engine each platform builds on ----------------------

CERT_FILES = ("ca.pem", "cert.pem", "key.pem")  # Docker's DOCKER_CERT_PATH layout
TLS_ENV = ("DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")


def default_builder(environ=None) -> Builder:
    """The engine platforms without a `builders:` entry build on: $DOCKER_HOST or the local socket."""
    environ = os.environ if environ is None else environ
    return Builder(environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST)


def builder_for(project, platform: str, environ=None) -> Builder:
    """The engine that builds platform: its `builders:` entry, else the default engine."""
    return project.builders.get(platform) or default_builder(environ)


def smoke_engine_for(project, platform: str) -> Builder | None:
    """The engine that runs platform's smoke containers: `smoke.engines`, else `builders:`, else None (the default)."""
    return project.smoke.engines.get(platform) or project.builders.get(platform)


def builder_env(builder: Builder | None, environ=None) -> dict[str, str]:
    """The environment for a docker CLI or docker-py that talks to builder.

    The default engine keeps the environment as it is (DOCKER_HOST,
    DOCKER_TLS_VERIFY, DOCKER_CERT_PATH: Docker's own convention). A
    configured builder gets its DOCKER_HOST (a DOCKER_CONTEXT would override
    it, so it goes); with cert_path also DOCKER_TLS_VERIFY=1 and
    DOCKER_CERT_PATH; a tcp:// builder without cert_path keeps the TLS
    variables the environment has, while unix:// and ssh:// drop them.
    """
    env = dict(os.environ if environ is None else environ)
    if builder is None or not builder.key:
        return env
    env.pop("DOCKER_CONTEXT", None)
    env["DOCKER_HOST"] = builder.host
    if builder.cert_path:
        env.update(DOCKER_TLS_VERIFY="1", DOCKER_CERT_PATH=builder.cert_path)
    elif builder.scheme != "tcp":
        for k in TLS_ENV:
            env.pop(k, None)
    return env


def _reach_hint(builder: Builder) -> str:
    if builder.scheme == "ssh":
        return f"`docker -H {builder.host} version` must work (key-based ssh login, docker on the remote PATH)"
    if builder.scheme == "tcp":
        return ("TLS: cert_path with ca.pem, cert.pem and key.pem, or DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH "
                f"in the environment; `docker -H {builder.host} --tlsverify version` must work")
    return f"is the socket {builder.host[len('unix://'):]} there and readable by this user?"


def engine_platform(client, address: str) -> str:
    """The platform an engine runs natively (its BUILDPLATFORM): linux/amd64 or linux/arm64."""
    info = client.info()
    arch = info.get("Architecture", "")
    platform = hostinfo.host_platform(arch) if arch in hostinfo.ARCHES else None
    if platform is None or info.get("OSType", "linux") != "linux":
        raise EnvironmentProblem(f"the Docker Engine at {address} runs {info.get('OSType')}/{arch}; "
                                 "builds need a linux/amd64 or linux/arm64 engine")
    return platform


def is_local(builder: Builder) -> bool:
    """Whether the builder runs on this machine, so it sees this machine's loopback registry."""
    return builder.scheme == "unix" or hostinfo.is_loopback(builder.host)


# --- binfmt for running arm64 containers -------------------------------

QEMU_NAMES = {"arm64": "aarch64", "amd64": "x86_64"}


def ensure_binfmt(platform: str = "linux/arm64") -> str:
    """Register QEMU for a foreign platform (running its containers); nothing to do for the host's own."""
    arch = platform.split("/")[1]
    if arch == hostinfo.host_arch():
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


def host_platform() -> str:
    return hostinfo.host_platform()


def base_platforms(project) -> list[str]:
    """The project's platforms plus this machine's: pip stages run on the build platform."""
    return list(dict.fromkeys([*project.platforms, host_platform()]))


