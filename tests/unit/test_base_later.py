"""A base made under QEMU (arm64 on an amd64 machine: minutes of maintainer scripts) is not
waited for up front: `engine.up` leaves it to the build, and the build makes it in the
background while the native platform builds. That is only safe when a bootstrap now gives the
pinned digest, so it is decided from the Debian archive: every pinned version still the newest."""

from __future__ import annotations

import threading

import pytest

from orchestrator.debian import packages as debpackages
from orchestrator.build import bases as base
from orchestrator.debian import bootstrap as bootstrap_mod

PINNED = ("base-files=12.4+deb12u15", "libpam0g=1.5.2-6+deb12u3", "python3=3.11.2-1+b1")


def _pkg(name: str, version: str, priority: str = "optional", essential: bool = False) -> debpackages.Package:
    return debpackages.Package(name, version, "arm64", f"pool/{name}.deb", 1, "0" * 64, priority=priority, essential=essential)


def _archive(*extra: debpackages.Package) -> debpackages.Index:
    return debpackages.Index([_pkg("base-files", "12.4+deb12u15", "required", True), _pkg("libpam0g", "1.5.2-6+deb12u3"),
                      _pkg("libpam0g", "1.5.2-6+deb12u2"), _pkg("python3", "3.11.2-1+b1"),
                      _pkg("cowsay", "3.03+dfsg2-8"), *extra])


def test_an_archive_with_every_pinned_version_as_its_newest_reproduces_the_pin():
    assert bootstrap_mod.packages_moved(PINNED, _archive()) is None  # older versions and other packages do not matter


def test_a_newer_version_of_a_pinned_package_means_a_bootstrap_now_would_move_the_pin():
    moved = bootstrap_mod.packages_moved(PINNED, _archive(_pkg("libpam0g", "1.5.2-6+deb12u4")))
    assert moved == "the Debian archive moved: libpam0g 1.5.2-6+deb12u3 -> 1.5.2-6+deb12u4"


def test_a_new_required_package_or_a_removed_one_moves_it_too():
    moved = bootstrap_mod.packages_moved(PINNED, _archive(_pkg("sysvinit-utils", "3.06-4", "required")))
    assert "sysvinit-utils - -> 3.06-4 (required)" in moved
    index = debpackages.Index([p for p in _archive().versions("base-files")] + _archive().versions("libpam0g"))
    assert "python3 3.11.2-1+b1 -> gone" in bootstrap_mod.packages_moved(PINNED, index)
    assert bootstrap_mod.packages_moved((), _archive()) == "the pin lists no packages"


class _Ensure:
    """base.ensure as seen by Bases: the native base is there, the foreign one needs a bootstrap that
    runs until released."""

    def __init__(self):
        self.release = threading.Event()
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, project, platform, reg=None, cache=None, log=print, repin=True, defer=False):
        self.calls.append((platform, defer))
        if platform == "linux/amd64":
            return f"base {platform}", "pinned, in the registry"
        if defer:
            return None, "not bootstrapped yet"
        assert self.release.wait(10)
        return f"bootstrapped {platform}", "bootstrapped, matches the pin"


def test_a_build_gets_the_native_base_at_once_and_the_foreign_one_from_a_background_bootstrap(monkeypatch):
    fake, lines = _Ensure(), []
    monkeypatch.setattr(base, "ensure", fake)
    bases = base.Bases(None, ["linux/amd64", "linux/arm64"], ["linux/arm64"], None, None, log=lines.append)
    try:
        assert bases.get("linux/amd64") == "base linux/amd64"
        assert bases.pending == {"linux/arm64"}  # the build orders these images last
        assert any("linux/arm64: bootstrapping in the background" in line for line in lines)
        fake.release.set()
        assert bases.get("linux/arm64") == "bootstrapped linux/arm64"
        assert bases.pending == set()
    finally:
        fake.release.set()
        bases.close()
    assert fake.calls == [("linux/amd64", False), ("linux/arm64", True), ("linux/arm64", False)]


def test_a_failed_background_bootstrap_is_raised_where_its_platform_is_built(monkeypatch):
    def ensure(project, platform, reg=None, cache=None, log=print, repin=True, defer=False):
        if defer:
            return None, "not bootstrapped yet"
        raise base.EnvironmentProblem("mmdebstrap failed for linux/arm64")

    monkeypatch.setattr(base, "ensure", ensure)
    bases = base.Bases(None, ["linux/arm64"], ["linux/arm64"], None, None, log=lambda line: None)
    try:
        with pytest.raises(base.EnvironmentProblem, match="mmdebstrap failed"):
            bases.get("linux/arm64")
    finally:
        bases.close()
