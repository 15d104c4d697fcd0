"""`engine.status`: what runs where (engine, build client, builders, registry, pinned bases)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.common.errors import EnvironmentProblem
from orchestrator.common.places import state_dir
from orchestrator.debian import basepin
from orchestrator.machine.daemon import (
    build_client,
    docker_client,
    engine_address,
    engine_platform,
    engine_running,
)
from orchestrator.oci.registry import Registry
from orchestrator.project.spec import Project


def status(project: Project) -> list[tuple[str, str]]:
    rows = []
    if engine_running():
        info = docker_client().info()
        rows.append(("engine", f"Docker {info.get('ServerVersion')} ({engine_address()})"))
        runtimes = ", ".join(sorted(info.get("Runtimes", {})))
        rows.append(("runtimes", runtimes + ("" if "nvidia" in runtimes else " (no NVIDIA runtime: GPU checks run as CPU fallback)")))
    else:
        rows.append(("engine", "not running (invoke engine.up)"))
    try:
        rows.append(("build client", build_client().description))
    except EnvironmentProblem as e:
        rows.append(("build client", str(e)))
    for platform, builder in project.builders.items():
        try:
            client = docker_client(timeout=10, builder=builder)
            rows.append((f"builder {platform}", f"{builder}: Docker {client.version().get('Version')}, "
                                                f"a {engine_platform(client, builder.host)} engine"))
        except EnvironmentProblem as e:
            rows.append((f"builder {platform}", e.message))
    reg = Registry(project.registry, retries=0, timeout=5, login=project.login)
    rows.append(("registry", f"{project.registry} " + ("answering" if reg.ping() else "not answering (invoke engine.up)")))
    for platform in project.platforms:
        pin = basepin.read_pins(project).get(platform)
        rows.append((f"base {platform}", f"{pin.config_digest[:19]} ({pin.source}, {basepin.PIN_FILE})" if pin
                     else "not pinned (invoke engine.up)"))
    rows.append(("arm64 emulation", "qemu-aarch64 registered" if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists()
                 else "not registered"))
    rows.append(("state", str(state_dir())))
    return rows


