"""Running uv: which binary, in which environment, and never outliving the task.

`invoke lock` resolves with it (project/lock.py) and `invoke build` installs
the Python dependency layers with it (build/pydeps.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sysconfig
from pathlib import Path

from orchestrator.common.errors import EnvironmentProblem


def uv_env() -> dict[str, str]:
    """The environment uv runs in: this process's, less every UV_* setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("UV_")}


def uv_binary() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "uv"
    if candidate.exists():
        return str(candidate)
    try:
        from uv import find_uv_bin  # the uv wheel ships its binary

        return find_uv_bin()
    except Exception:  # noqa: BLE001 - any failure means "not installed" as a Python package
        on_path = shutil.which("uv")  # e.g. the Nix shell's uv
        if on_path:
            return on_path
        raise EnvironmentProblem("uv is not installed", "pip install -e . (uv is a runtime dependency)") from None



def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run with output captured, except that on Ctrl-C uv and the interpreter probes it
    started are killed and waited for (run() kills uv alone after 0.25 s), so none outlives the task."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:  # its own group: killed as one
        try:
            out, err = proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
