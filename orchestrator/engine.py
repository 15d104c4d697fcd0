"""Effects at the edge, one module each: orchestrator.daemon (Docker Engine,
build client, binfmt), orchestrator.registry_server (the embedded registry),
orchestrator.base (the base image). This module is what `engine.*` tasks
and older callers import: the status table and the names re-exported."""

from __future__ import annotations

from pathlib import Path

from . import base as base_mod
from .daemon import (BuildClient, CA_BUNDLE_CANDIDATES, _host_arch, base_platforms, build_client,  # noqa: F401
                     builder_env, builder_for, ca_bundle, default_builder, docker_client, engine_address,
                     engine_platform, engine_running, ensure_binfmt, ensure_engine, host_platform, is_local)
from .errors import EnvironmentProblem
from .registry import Registry
from .registry_server import down, ensure_registry, gc  # noqa: F401
from .spec import Project
from .state import state_dir  # noqa: F401


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
    reg = Registry(project.registry, retries=0, timeout=5)
    rows.append(("registry", f"{project.registry} " + ("answering" if reg.ping() else "not answering (invoke engine.up)")))
    for platform in project.platforms:
        pin = base_mod.read_pins(project).get(platform)
        rows.append((f"base {platform}", f"{pin.config_digest[:19]} ({pin.source}, {base_mod.PIN_FILE})" if pin
                     else "not pinned (invoke engine.up)"))
    rows.append(("arm64 emulation", "qemu-aarch64 registered" if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists()
                 else "not registered"))
    rows.append(("state", str(state_dir())))
    return rows


