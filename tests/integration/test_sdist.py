"""A source-only dependency in the mini fixture (docopt 0.6.2: PyPI has only its sdist), both ways
the project file can say: refused at `invoke lock` (the default), or built once into a wheel that
the lock pins, reproducibly, and that the images install on amd64 and arm64.

Needs PyPI; the allowed path also needs the engine and the registry (the wheel is built in a
container of the pinned base).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from orchestrator.build import bases as base
from orchestrator.machine import daemon
from orchestrator.project import lock
from orchestrator import flow
from orchestrator.build import sdist
from orchestrator.project import spec
from orchestrator.common.errors import UserError

from ..conftest import cleanup_namespace, copy_fixture

INVOKE = Path(sys.executable).parent / "invoke"
ROOT = Path(__file__).resolve().parents[2]


def with_docopt(pf: Path, allow: str | None = None) -> spec.Project:
    req = pf.parent / "requirements" / "echo.in"
    req.write_text(req.read_text() + "docopt==0.6.2\n")
    if allow is not None:
        pf.write_text(pf.read_text().replace("system_packages: [jq]\n",
                                             f"system_packages: [jq]\nallow_sdist: {allow}\n"))
    return spec.load(pf)


def test_by_default_a_source_only_dependency_is_refused_at_lock_time_naming_the_fix(tmp_path):
    pf = copy_fixture("mini", tmp_path)
    with_docopt(pf)
    proc = subprocess.run([str(INVOKE), "-r", str(ROOT), "lock", "--project", str(pf)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "error: docopt 0.6.2 is published only as a source distribution for linux/amd64" in proc.stderr
    assert "hint: add `allow_sdist: [docopt]` to project.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Allowing another package does not let this one through.
    pf.write_text(pf.read_text().replace("system_packages: [jq]\n", "system_packages: [jq]\nallow_sdist: [six]\n"))
    with pytest.raises(UserError, match="docopt 0.6.2 is published only as a source distribution"):
        flow.lock(spec.load(pf), log=lambda *_: None)


def service_locks(project) -> dict[str, str]:
    return {p.relative_to(project.root).as_posix(): p.read_text()
            for p in (project.root / "locks").glob("*/service-echo.txt") if not p.parent.name.startswith("apt-")}


@pytest.fixture
def allowed(engine_ready, tmp_path, monkeypatch):
    """The mini fixture under its own namespace with docopt allowed, and an empty wheel cache."""
    pf = copy_fixture("mini", tmp_path / "proj", f"orch-test-{uuid.uuid4().hex[:8]}")
    project = with_docopt(pf, "[docopt]")
    for platform in daemon.base_platforms(project):
        base.ensure(project, platform, log=lambda *_: None)
    monkeypatch.setattr(sdist, "cache_dir", lambda: tmp_path / "wheels-1")
    yield project
    cleanup_namespace(project)


def test_an_allowed_sdist_is_built_once_into_a_wheel_the_lock_pins_and_both_platforms_install(
        allowed, tmp_path, monkeypatch):
    project = allowed
    flow.lock(project, log=lambda *_: None)
    assert lock.check(project) == []
    locks = service_locks(project)
    records = {path: sdist.recorded(next(p for p in lock.parse_pins(text) if p.name == "docopt").block)
               for path, text in locks.items()}
    assert len(records) == 5 and None not in records.values()
    # One pure-Python wheel: built on amd64 and, under QEMU, on arm64, to the same bytes.
    assert len(set(records.values())) == 1
    built = next(iter(records.values()))
    assert built.wheel == "docopt-0.6.2-py2.py3-none-any.whl"
    assert built.sdist_sha256 == "49b3a825280bd66b3aa83585ef59c4a8c82f2c8a522dbe754a8bc8d08c85c491"
    wheels = list((tmp_path / "wheels-1").glob("*/*.whl"))
    assert len(wheels) == 2  # once per platform (and base), not once per backend

    # A machine without the wheel (a second cold build: empty cache) builds it again at `invoke build` and
    # checks it against the lock: the same bytes as the lock recorded, on both platforms.
    monkeypatch.setattr(sdist, "cache_dir", lambda: tmp_path / "wheels-2")
    results = flow.build(spec.load(project.file), backends=["cpu"], log=lambda *_: None)
    client = daemon.docker_client()
    for r in (r for r in results if r.image.key == "echo"):
        out = client.containers.run(r.ref, entrypoint=["python3", "-c"], remove=True, platform=r.image.platform,
                                    command=["import docopt; print(docopt.__version__, docopt.__file__)"])
        assert out.decode().split() == ["0.6.2", "/opt/site/service-echo/docopt.py"], r.image.platform
    assert len(list((tmp_path / "wheels-2").glob("*/*.whl"))) == 2

    # Every Python lock re-resolved (deleted, so stale; the apt locks are not this test's) records the same
    # wheel: the same lock files. The cold rebuild of the wheels just above stands for this one.
    for path in locks:
        (project.root / path).unlink()
    flow.lock(spec.load(project.file), log=lambda *_: None)
    assert service_locks(project) == locks
