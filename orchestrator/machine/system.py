"""What the engine modules share about this machine: speaking as `[engine]`, being root, installing
Debian packages (engine.up installs what is missing, as root, and names it otherwise)."""

from __future__ import annotations

import os
import subprocess

from orchestrator.common.errors import EnvironmentProblem


def say(msg: str) -> None:
    print(f"[engine] {msg}", flush=True)


def is_root() -> bool:
    return os.geteuid() == 0


def apt_install(*packages: str) -> None:
    if not is_root():
        raise EnvironmentProblem(f"{', '.join(packages)} missing and not running as root",
                                 f"install them: sudo apt-get install -y {' '.join(packages)}")
    say(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise EnvironmentProblem(f"apt-get install {' '.join(packages)} failed")


