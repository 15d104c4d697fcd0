"""The tool's own Python environment is locked: requirements/tool.lock pins, with
hashes, every dependency pyproject.toml declares (the test extra included), for
Python 3.11 on linux x86_64 and aarch64, and ci/setup.sh installs from it.
Blob digests depend on isal's exact output, so isal is pinned exactly."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "tool.lock"

# The machines ci/setup.sh and ci/jobs/setup.sh install on.
TARGETS = {
    f"linux-{machine}": {"python_version": "3.11", "python_full_version": "3.11.2", "sys_platform": "linux",
                         "platform_system": "Linux", "os_name": "posix", "platform_machine": machine,
                         "implementation_name": "cpython", "platform_python_implementation": "CPython",
                         "extra": ""}
    for machine in ("x86_64", "aarch64")}


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def locked() -> dict[str, list[tuple[Version, Marker | None, list[str]]]]:
    """name -> [(version, marker, hashes)] from the lock's `name==version [; marker]` entries."""
    entries: dict[str, list] = {}
    text = LOCK.read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        first = block.split("\n", 1)[0].rstrip(" \\")
        if first.startswith("#") or not first.strip():
            continue
        req, _, marker = first.partition(";")
        name, _, version = req.strip().partition("==")
        assert version, f"{LOCK.name}: {first!r} does not pin one version"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        entries.setdefault(canonicalize_name(name), []).append(
            (Version(version), Marker(marker.strip()) if marker.strip() else None, hashes))
    return entries


def test_every_locked_entry_has_hashes():
    lock = locked()
    assert lock
    for name, entries in lock.items():
        for version, _, hashes in entries:
            assert hashes, f"{name}=={version} has no --hash: pip install --require-hashes refuses it"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_lock_pins_every_pyproject_dependency_for_python_3_11_on(target):
    env, lock = TARGETS[target], locked()
    for req in declared():
        for_here = [v for v, marker, _ in lock.get(canonicalize_name(req.name), [])
                    if marker is None or marker.evaluate(env)]
        assert len(for_here) == 1, (f"requirements/tool.lock has {len(for_here)} pins of {req.name} for {target}: "
                                    "regenerate it (the command is in ci/setup.sh)")
        assert req.specifier.contains(for_here[0], prereleases=True), (
            f"requirements/tool.lock pins {req.name}=={for_here[0]}, outside pyproject.toml's {req}: regenerate it "
            "(the command is in ci/setup.sh)")


def test_isal_is_pinned_exactly_in_pyproject_and_the_lock():
    [isal] = [r for r in declared() if r.name == "isal"]
    [spec] = list(isal.specifier)
    assert spec.operator == "==" and "*" not in spec.version, f"pyproject.toml: {isal} must pin one version"
    [(version, _, _)] = locked()["isal"]
    assert str(version) == spec.version


def test_ci_setup_installs_the_lock_with_hashes_and_says_how_to_regenerate_it():
    setup = (ROOT / "ci" / "setup.sh").read_text()
    assert "pip install -q --require-hashes -r requirements/tool.lock" in setup
    assert "pip install -q --no-deps -e ." in setup
    command = LOCK.read_text().splitlines()[1].lstrip("# ").strip()  # uv writes the command it ran
    assert command.startswith("uv pip compile pyproject.toml") and "--generate-hashes" in command
    assert command in setup, "ci/setup.sh must document the command that made requirements/tool.lock"
    assert "requirements/tool.lock" in setup.split("want=", 1)[1].split("\n", 1)[0]  # a new lock re-installs
