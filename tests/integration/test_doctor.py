"""`invoke doctor --json` against the real engine and registry: every required check passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..conftest import ROOT

pytestmark = pytest.mark.engine


def test_doctor_reports_a_ready_machine(engine_ready):
    env = dict(os.environ, ORCH_REGISTRY=engine_ready)
    proc = subprocess.run([sys.executable, "-m", "invoke", "doctor", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    failed = [f for f in report["findings"] if f["required"] and not f["ok"]]
    assert not failed, "\n".join(f"{f['name']}: {f['detail']} (fix: {f['fix']})" for f in failed)
    assert report["ok"] is True and proc.returncode == 0, proc.stderr
    names = {f["name"] for f in report["findings"]}
    for expected in ("docker engine", "buildkit", f"registry {engine_ready} reachable", f"registry {engine_ready} tls",
                     f"registry {engine_ready} writable", "disk", "ca bundle", "nvidia driver",
                     "nvidia container runtime", "bootstrap tools"):
        assert expected in names, f"doctor no longer checks {expected!r}"
    writable = next(f for f in report["findings"] if f["name"] == f"registry {engine_ready} writable")
    assert "uploaded" in writable["detail"]  # a real write, not a ping
    for f in report["findings"]:
        assert set(f) == {"name", "ok", "required", "detail", "fix"}
