"""Glue between the stages for the tasks: each function runs one job end to
end (load the spec, read or write locks, plan, render) so tasks.py stays a
thin layer of argument parsing and printing."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

from . import lock as lock_mod
from . import spec as spec_mod
from .build import load_all_locks
from .errors import UserError
from .files import atomic_write, held
from .plan import make_plan
from .render import HEADER, render_all

DOCKERFILE_DIR = "dockerfiles"


def load_project(path: str) -> spec_mod.Project:
    return spec_mod.load(path)


def lock(project: spec_mod.Project, log=print, upgrade: bool = False) -> list[Path]:
    """Re-resolve the (backend, platform) targets whose locks are stale, then the stale apt locks.

    Fresh locks are left alone unless upgrade is set, so re-running never
    moves a pin by itself.
    """
    changed: list[Path] = []
    stale_paths = {s.path for s in lock_mod.check(project)}
    for backend, platform in lock_mod.targets(project):
        paths = {Path(os.path.relpath(lock_mod.lock_path(project.root, backend.name, platform, layer), project.root))
                 for layer in lock_mod.expected_layers(project, backend, platform)}
        if not upgrade and not (paths & stale_paths):
            log(f"{backend.name} for {platform}: locks are up to date")
            continue
        log(f"locking {backend.name} for {platform}")
        previous = {} if upgrade else {
            layer: lock_mod.read_pins(lock_mod.lock_path(project.root, backend.name, platform, layer))
            for layer in lock_mod.expected_layers(project, backend, platform)}
        locks = lock_mod.resolve_backend(project, backend, platform, previous)
        for lk in locks:
            log(f"  {lk.layer:<16} {len(lk.pins):>3} packages")
        changed += lock_mod.write_locks(project, locks)
    changed += lock_mod.resolve_apt(project, upgrade=upgrade, log=log)
    for stale in lock_mod.check(project):
        if stale.reason == "no longer used by the project file":
            (project.root / stale.path).unlink()
            log(f"removed {stale.path} (no longer used)")
    return changed


RUN_LOCK = ".build/run.lock"


def registry_lock_path(host: str, state: Path | None = None) -> Path:
    """The lock pushes to a registry share and `engine.gc` takes alone (one file per registry host)."""
    from .state import state_dir

    return (state or state_dir()) / "locks" / ("registry-" + re.sub(r"[^A-Za-z0-9.-]", "_", host) + ".lock")


def _stderr(msg: str) -> None:
    # Waiting is news, not output: stdout may be JSON (--json).
    print(msg, file=sys.stderr, flush=True)


def _holder_pid(text: str) -> str:
    return text.split()[0] if text.split() else "unknown"


def _holder_what(text: str, default: str) -> str:
    return text.split(None, 1)[1] if len(text.split()) > 1 else default


@contextlib.contextmanager
def run_lock(project: spec_mod.Project, what: str, log=_stderr, state: Path | None = None):
    """What `invoke build`, `publish` and `lock` hold while they run.

    The project's run lock, alone: a second run on the same project waits
    (saying for whom), then finds in the registry what the first pushed and
    re-uses it; locks, Dockerfiles and manifests are never written by two
    runs at once. Then the registry's push lock, shared with every other
    push: `engine.gc` takes it alone, so it never deletes blobs a push has
    uploaded but not yet named in a manifest, and never stops the registry
    under a push.
    """
    def project_busy(holder: str) -> None:
        log(f"waiting for another {_holder_what(holder, 'build/publish')} of this project "
            f"(pid {_holder_pid(holder)}) to finish ({project.root / RUN_LOCK}) …")

    def gc_running(holder: str) -> None:
        log(f"waiting for {_holder_what(holder, 'engine.gc')} on {project.registry} (pid {_holder_pid(holder)}) "
            "to finish before pushing …")

    with held(project.root / RUN_LOCK, note=what, on_wait=project_busy), \
            held(registry_lock_path(project.registry, state), shared=True, note=what, on_wait=gc_running):
        yield


@contextlib.contextmanager
def gc_lock(host: str, log=_stderr, state: Path | None = None):
    """`engine.gc` holds the registry's push lock alone: it waits for running pushes, and new ones wait for it."""
    def pushing(holder: str) -> None:
        log(f"waiting for pushes to {host} to finish ({_holder_what(holder, 'a push')}, pid {_holder_pid(holder)}"
            " and any others) …")

    with held(registry_lock_path(host, state), note="engine.gc", on_wait=pushing):
        yield


def gc(host: str, keep: int, dry_run: bool = False, log=print, config: Path | None = None,
       state: Path | None = None):
    """`engine.gc`: apply the retention policy to a registry (see orchestrator.retention).

    A dry run reads only, so it takes no lock; a real run holds the push lock alone.
    """
    from . import registry_server

    if dry_run:
        return registry_server.gc(host, keep, dry_run=True, log=log, config=config)
    with gc_lock(host, log, state):
        return registry_server.gc(host, keep, dry_run=False, log=log, config=config)


def rendered(project: spec_mod.Project) -> dict[str, str]:
    locks = load_all_locks(project)
    return render_all(make_plan(project, locks, system=lock_mod.load_apt_locks(project)))


def _generated(directory: Path) -> list[Path]:
    marker = HEADER.split("{")[0]
    return [p for p in sorted(directory.glob("*.Dockerfile")) if p.read_text().startswith(marker)]


def render(project: spec_mod.Project, check: bool = False) -> list[str]:
    """Write dockerfiles/; with check, write nothing and return what differs."""
    out_dir = project.root / DOCKERFILE_DIR
    files = rendered(project)
    differ = []
    for name, text in sorted(files.items()):
        path = out_dir / name
        if not path.exists() or path.read_text() != text:
            differ.append(name)
            if not check:
                atomic_write(path, text)
    for path in _generated(out_dir) if out_dir.exists() else []:
        if path.name not in files:
            differ.append(path.name)
            if not check:
                path.unlink()
    return differ


def parse_list(value: str | None, known, what: str, file: str) -> list[str] | None:
    """'a,b' -> ['a','b'], 'all'/None -> None; unknown names are input errors."""
    if value in (None, "", "all"):
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    for item in items:
        if item not in known:
            raise UserError(f"unknown {what} {item!r}; {file} defines {sorted(known)}",
                            f"pick one of {sorted(known)} or 'all'")
    return items


def one(value: str | None, known, what: str, file: str) -> str:
    """Exactly one known name (select and run act on a single service)."""
    if not value:
        raise UserError(f"--{what} is required; {file} defines {sorted(known)}",
                        f"pass exactly one, e.g. --{what} {sorted(known)[0]}")
    if value not in known:
        raise UserError(f"{what} {value!r} is not one of {sorted(known)} in {file}",
                        f"pass exactly one, e.g. --{what} {sorted(known)[0]}")
    return value


def positive_seconds(value, option: str) -> float:
    """A CLI number of seconds (> 0); anything else is an input error, not a traceback."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{option} {value!r} is not a number of seconds above 0", f"e.g. {option} 180")
    return seconds


def count(value, option: str) -> int:
    """A CLI whole number >= 0; anything else is an input error, not a traceback."""
    text = str(value).strip()
    if not text.isdigit():
        raise UserError(f"{option} {value!r} is not a whole number of 0 or more", f"e.g. {option} 2")
    return int(text)


def read_gpu_report(path: str) -> dict:
    """A host report from runtime/gpus.py ({driver, gpus: [{index, uuid, name, cc}]}), checked enough to use."""
    import json

    try:
        report = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--gpus {path}: cannot read it ({e.strerror})", "pass the file `python3 gpus.py > FILE` wrote")
    except ValueError as e:
        raise UserError(f"--gpus {path}: not JSON ({e})", "pass the file `python3 gpus.py > FILE` wrote") from None
    if not isinstance(report, dict) or not isinstance(report.get("gpus", []), list) or \
            any(not isinstance(g, dict) or "index" not in g for g in report.get("gpus", [])):
        raise UserError(f"--gpus {path}: expected {{\"driver\": ..., \"gpus\": [{{\"index\": 0, \"cc\": \"9.0\", ...}}]}}",
                        "pass the file `python3 orchestrator/runtime/gpus.py > FILE` wrote")
    return report
