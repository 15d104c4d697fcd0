"""A throwaway docker-registry on a loopback port with empty storage, for benchmarks."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.oci.registry import Registry  # noqa: E402


@contextlib.contextmanager
def scratch_registry(port: int):
    host = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="orch-bench-registry-") as tmp:
        cfg = Path(tmp) / "config.yml"
        cfg.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {tmp}/data\n"
                       f"http:\n  addr: {host}\n")
        proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            for _ in range(60):
                if Registry(host, retries=0, timeout=2).ping():
                    break
                time.sleep(0.5)
            else:
                raise SystemExit(f"scratch registry on {host} did not start")
            yield host
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def scratch_project(tmp: str, name: str, source: Path | None = None) -> Path:
    """The example project (or another, e.g. tests/fixtures/mini) copied into tmp under its own registry
    namespace; returns its project.yaml."""
    root = Path(__file__).resolve().parents[1]
    work = Path(tmp) / "project"
    shutil.copytree(source or root, work, ignore=shutil.ignore_patterns(".venv", ".git", ".build", "tests", "bench"))
    pf = work / "project.yaml"
    lines = pf.read_text().splitlines(keepends=True)
    pf.write_text("".join(f"project: {name}\n" if line.startswith("project:") else line for line in lines))
    return pf
