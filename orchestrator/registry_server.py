"""The embedded registry: Debian's docker-registry on 127.0.0.1, started when
nothing answers there, stopped by `engine.down`, garbage-collected by
`engine.gc`."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from .errors import EnvironmentProblem
from .registry import Registry
from .state import apt_install, say, state_dir

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
    log = state_dir() / "registry.log"
    say(f"starting docker-registry on {host} (storage: {root / 'data'})")
    with open(log, "ab") as fh:
        subprocess.Popen(["docker-registry", "serve", str(config)], stdout=fh, stderr=fh, start_new_session=True)
    for _ in range(60):
        if reg.ping():
            return f"started docker-registry (storage {root / 'data'})"
        time.sleep(0.5)
    raise EnvironmentProblem(f"docker-registry did not answer on {host} within 30 s; see {log}")


def down() -> list[str]:
    """Stop what engine.up started (the registry; dockerd only if we started it)."""
    done = []
    for name in ("docker-registry",):
        if subprocess.run(["pkill", "-f", f"{name} serve {state_dir()}"], capture_output=True).returncode == 0:
            done.append(f"stopped {name}")
    return done or ["nothing of ours was running"]


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gc(host: str) -> str:
    """Free blobs no manifest references (tests and re-builds leave them) in the embedded registry."""
    config = state_dir() / "registry.yml"
    data = state_dir() / "registry" / "data"
    if not config.exists() or not data.exists():
        return "the registry is not the embedded one; nothing to do (use your registry's own GC)"
    before = _tree_bytes(data)
    down()  # garbage-collect needs the registry stopped
    proc = subprocess.run(["docker-registry", "garbage-collect", str(config)], capture_output=True, text=True)
    ensure_registry(host)
    if proc.returncode != 0:
        raise EnvironmentProblem("docker-registry garbage-collect failed:\n" + proc.stderr[-1000:])
    return f"freed {(before - _tree_bytes(data)) / 1e6:,.0f} MB in {data}"
