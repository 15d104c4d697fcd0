"""The embedded registry: Debian's docker-registry on 127.0.0.1, started when
nothing answers there, stopped by `engine.down`; where a registry served from
a config file keeps its storage, and how to stop and start it again (what
`engine.gc`, in orchestrator.release.gc, needs around the registry's own
garbage collection)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import atomic_write
from orchestrator.common.places import state_dir
from orchestrator.machine.system import apt_install, say
from orchestrator.oci.registry import Registry

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
"""


def ensure_registry(host: str) -> str:
    reg = Registry(host, retries=0, timeout=5)
    if reg.ping():
        return "answering (left as it is)"
    if not (host.startswith("127.0.0.1:") or host.startswith("localhost:")):
        raise EnvironmentProblem(f"registry {host} is unreachable",
                                 "check the address and your network, or use the embedded default 127.0.0.1:5000")
    if not shutil.which("docker-registry"):
        apt_install("docker-registry")
    root = state_dir() / "registry"
    root.mkdir(parents=True, exist_ok=True)
    config = state_dir() / "registry.yml"
    config.write_text(REGISTRY_CONFIG.format(root=root / "data", addr=host.replace("localhost", "127.0.0.1")))
    say(f"starting docker-registry on {host} (storage: {root / 'data'})")
    serve(config, host, state_dir() / "registry.log")
    return f"started docker-registry (storage {root / 'data'})"


def serve(config: Path, host: str, log: Path) -> int:
    """Start `docker-registry serve config` and wait until it answers on host; returns its pid."""
    reg = Registry(host, retries=0, timeout=5)
    pid = start(config, log)
    for _ in range(60):
        if reg.ping():
            return pid
        time.sleep(0.5)
    raise EnvironmentProblem(f"docker-registry did not answer on {host} within 30 s; see {log}")


def start(config: Path, log: Path) -> int:
    """Start `docker-registry serve config` in its own session and record its pid next to config."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=fh, stderr=fh,
                                start_new_session=True)
    atomic_write(pid_file(config), f"{proc.pid}\n")
    return proc.pid


def pid_file(config: Path) -> Path:
    """Where start() records the pid of the registry it started from config (the embedded one: the state dir)."""
    return config.with_suffix(".pid")


def recorded_pid(config: Path) -> int | None:
    try:
        return int(pid_file(config).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def down() -> list[str]:
    """Stop the registry engine.up started: exactly the pid it recorded, if that still serves our config.

    Nothing is matched by name or pattern: a registry someone else runs,
    from another config (or from ours, started by hand), is left alone.
    """
    config = state_dir() / "registry.yml"
    ours, running = recorded_pid(config), serving(config)
    if ours is not None and ours in running:
        stop(config, pids=[ours])
        pid_file(config).unlink(missing_ok=True)
        return [f"stopped docker-registry (pid {ours}, serving {config})"]
    pid_file(config).unlink(missing_ok=True)  # what it names is gone, or is now another process
    if running:
        pids = " ".join(map(str, running))
        return [f"docker-registry serving {config} (pid {pids}) was not started by engine.up here (no pid "
                f"recorded in {pid_file(config)}); left running: stop it with `kill {pids}` if it is yours"]
    return ["nothing of ours was running"]


def serving(config: Path) -> list[int]:
    """Pids of the `docker-registry serve <config>` processes (exactly that config, nothing matched loosely)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) >= 3 and os.path.basename(argv[0]) == b"docker-registry" and argv[1] == b"serve" \
                and argv[2] == str(config).encode():
            pids.append(int(entry.name))
    return pids


def stop(config: Path, timeout: float = 30.0, pids: list[int] | None = None) -> list[int]:
    """Stop the registry serving config (SIGTERM, then wait for it to exit); returns the pids stopped.

    pids: only these, of those serving config.
    """
    pids = [pid for pid in serving(config) if pids is None or pid in pids]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise EnvironmentProblem(f"docker-registry (pid {', '.join(map(str, pids))}) did not stop within "
                                     f"{timeout:.0f} s", "stop it yourself, then re-run `invoke engine.gc`")
        time.sleep(0.1)
    return pids


def _alive(pid: int) -> bool:
    """A zombie (exited, not yet reaped by its parent) counts as stopped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class Local:
    """A registry this machine serves from a config file: where its storage is, how to restart it."""

    config: Path
    storage: Path
    log: Path
    embedded: bool

    def tag_link(self, repository: str, tag: str) -> Path:
        return (self.storage / "docker/registry/v2/repositories" / repository / "_manifests/tags" / tag
                / "current/link")

    def pushed(self, repository: str, tag: str) -> float:
        """When the tag was last written: the mtime of its link file (0 when unknown)."""
        try:
            return self.tag_link(repository, tag).stat().st_mtime
        except OSError:
            return 0.0


def local_registry(host: str, config: Path | None = None) -> Local | None:
    """The registry on host as served from config (default: the embedded one); None if it is not ours."""
    embedded = config is None
    config = Path(config) if config else state_dir() / "registry.yml"
    if not config.exists():
        if embedded:
            return None
        raise UserError(f"registry config {config} does not exist", "pass the config docker-registry serves")
    try:
        data = yaml.safe_load(config.read_text()) or {}
        root = Path(data["storage"]["filesystem"]["rootdirectory"])
        addr = str((data.get("http") or {}).get("addr", ""))
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"{config}: not a filesystem-backed docker-registry config ({e})") from None
    if addr.replace("localhost", "127.0.0.1") != host.replace("localhost", "127.0.0.1"):
        if embedded:
            return None  # the project's registry is not the embedded one
        raise UserError(f"{config} serves {addr}, not {host}")
    return Local(config, root, (state_dir() / "registry.log") if embedded else config.with_suffix(".log"), embedded)


