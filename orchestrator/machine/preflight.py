"""Preflight: every external command `engine.up` may call, checked before it starts.

`engine.up` starts dockerd, the embedded registry, registers QEMU with
binfmt_misc and bootstraps base images with mmdebstrap. Each of those is a
Debian package; a machine that lacks one should hear which package to
install before anything is started, not halfway through a bootstrap (for
example mmdebstrap failing on a foreign architecture because arch-test,
which it only recommends, is missing).

`required_tools` is pure (project + host architecture -> tools);
`check` looks them up on PATH; `ensure` installs what is missing with one
apt-get call as root and otherwise says exactly what to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Iterable

from orchestrator.common.errors import EnvironmentProblem
from orchestrator.common.hostinfo import host_arch, is_loopback
from orchestrator.project.spec import Project

# Debian architecture -> the name QEMU uses for its user-mode emulator.
QEMU_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Tool:
    command: str  # looked up on PATH
    package: str  # the Debian package that ships it
    why: str  # which step of engine.up calls it


def foreign_arches(project: Project, arch: str) -> list[str]:
    """The project's platform architectures this host cannot run natively."""
    return [a for a in dict.fromkeys(p.split("/")[1] for p in project.platforms) if a != arch]


def required_tools(project: Project, host_arch: str, docker_host: str | None = None) -> list[Tool]:
    """Every external command `engine.up` may call for this project on a host of this architecture.

    Pure. `docker_host` is $DOCKER_HOST: a remote (tcp://, ssh://) engine is
    not started here, so dockerd is not needed then.
    """
    tools: list[Tool] = []
    if not docker_host or docker_host.startswith("unix://"):
        tools.append(Tool("dockerd", "docker.io", "the Docker Engine (started when none answers)"))
    tools.append(Tool("docker", "docker.io", "the BuildKit build client (base image builds)"))
    if is_loopback(project.registry):
        tools.append(Tool("docker-registry", "docker-registry",
                          f"the embedded registry on {project.registry} (started when none answers)"))
    tools.append(Tool("mmdebstrap", "mmdebstrap",
                      f"bootstrapping the {project.base.suite} base when {project.base.image} is not pulled"))
    foreign = foreign_arches(project, host_arch)
    if foreign:
        tools.append(Tool("arch-test", "arch-test",
                          f"mmdebstrap's check that {', '.join(foreign)} binaries run (foreign architecture)"))
        for a in foreign:
            q = QEMU_ARCH.get(a, a)
            tools.append(Tool(f"qemu-{q}-static", "qemu-user-static", f"running linux/{a} binaries under emulation"))
        tools.append(Tool("update-binfmts", "binfmt-support", "registering QEMU with binfmt_misc"))
        tools.append(Tool("mount", "mount", "mounting /proc/sys/fs/binfmt_misc when it is not mounted"))
    return tools


def packages(tools: Iterable[Tool]) -> list[str]:
    """The Debian packages for these tools, each once, in first-seen order."""
    return list(dict.fromkeys(t.package for t in tools))


def apt_command(pkgs: Iterable[str], sudo: bool = True) -> str:
    prefix = "sudo " if sudo else ""
    return (f"{prefix}apt-get update && {prefix}apt-get install -y --no-install-recommends "
            + " ".join(pkgs))


def check(project: Project, path: str | None = None, arch: str | None = None,
          docker_host: str | None = None) -> list[Tool]:
    """The required tools not found on PATH (or on `path`, an os.pathsep list)."""
    if docker_host is None:
        docker_host = os.environ.get("DOCKER_HOST")
    tools = required_tools(project, arch or host_arch(), docker_host)
    return [t for t in tools if shutil.which(t.command, path=path) is None]


def describe(missing: list[Tool]) -> str:
    return "; ".join(f"{t.command} ({t.package}: {t.why})" for t in missing)


def ensure(project: Project, install: bool, *, path: str | None = None, arch: str | None = None,
           is_root: bool | None = None, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
           log: Callable[[str], None] | None = None) -> list[str]:
    """Make sure every tool `engine.up` may call is there; returns the packages installed.

    As root with `install`, all missing packages are installed at once (one
    `apt-get update`, one `apt-get install`). Otherwise raises
    EnvironmentProblem naming the packages and the command to run.
    """
    missing = check(project, path=path, arch=arch)
    if not missing:
        return []
    pkgs = packages(missing)
    root = os.geteuid() == 0 if is_root is None else is_root
    if not (install and root):
        why = "not running as root" if install else "installing was not asked for"
        raise EnvironmentProblem(f"missing tools: {describe(missing)} ({why})",
                                 f"install the Debian packages {', '.join(pkgs)}: {apt_command(pkgs, sudo=not root)}")
    if log:
        log(f"installing {' '.join(pkgs)} with apt-get (for {', '.join(t.command for t in missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = (["apt-get", "update", "-qq"],
             ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs])
    for cmd in steps:
        proc = run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EnvironmentProblem(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                                     + ((proc.stderr or "") + (proc.stdout or ""))[-1500:],
                                     f"fix apt (sources, network, proxy), then run: {apt_command(pkgs, sudo=False)}")
    still = check(project, path=path, arch=arch)
    if still:
        raise EnvironmentProblem(f"installed {' '.join(pkgs)}, but still missing on PATH: {describe(still)}",
                                 "add /usr/sbin and /usr/bin to PATH")
    return pkgs
