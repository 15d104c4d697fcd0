"""System packages wired through the project: which apt locks exist, when they are stale, how they are
resolved on top of each other, and where their layers sit in each image. No network: the archive is a
small fake index."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.debian import locks as apt_locks
from orchestrator.debian import aptlock
from orchestrator.debian import archive
from orchestrator.debian import packages as debpackages
from orchestrator.debian import resolve as resolver
from orchestrator.debian import versions as debversions
from orchestrator import flow
from orchestrator.build import plan as plan_mod
from orchestrator.project import spec
from orchestrator.build.context import stage_context
from orchestrator.flow import load_all_locks
from orchestrator.common.errors import UserError

from ..conftest import FIXTURES, ROOT, unavailable

AMD, ARM = "linux/amd64", "linux/arm64"


@pytest.fixture
def mini(tmp_path):
    shutil.copytree(FIXTURES / "mini", tmp_path / "mini")
    return tmp_path / "mini"


def edit(root, old: str, new: str) -> spec.Project:
    path = root / "project.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return spec.load(path)


def stanza(name, version, depends="", arch="amd64"):
    return (f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\nDepends: {depends}\n"
            f"Filename: pool/main/{name[0]}/{name}/{name}_{version}_{arch}.deb\nSize: 10\nSHA256: {'a' * 64}\n")


def fake_archive(monkeypatch, stanzas: list[str]):
    """fetch_index answers from these stanzas (every platform), the way the real archive would."""
    index = debpackages.Index(debpackages.parse_packages("\n".join(stanzas), "http://deb.example/debian"))
    snap = tuple(archive.Snapshot(s, "Sat, 01 Jan 2026 00:00:00 UTC", "b" * 64, "gpgv TEST")
                 for s in archive.default_sources("bookworm"))
    monkeypatch.setattr(aptlock, "fetch_index", lambda *a, **k: (index, snap))


# --- which locks -------------------------------------------------------------------

def test_the_project_level_lock_comes_first_then_each_service_per_platform_it_is_built_for():
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    assert [(t.layer, t.platform, t.requests) for t in apt_locks.apt_targets(project)] == [
        ("system", AMD, ("jq",)), ("system", ARM, ("jq",)),
        ("service-echo", AMD, ("ffmpeg",)), ("service-echo", ARM, ("ffmpeg",))]
    assert [str(t.path(project.root).relative_to(project.root)) for t in apt_locks.apt_targets(project)][::2] == [
        "locks/apt-amd64/system.txt", "locks/apt-amd64/service-echo.txt"]


def test_the_committed_apt_locks_pin_nothing_twice_and_nothing_the_base_has():
    for path in (ROOT / "project.yaml", FIXTURES / "mini" / "project.yaml"):
        project = spec.load(path)
        locks = apt_locks.load_apt_locks(project)
        for (platform, layer), lk in locks.items():
            assert lk.platform == platform and lk.suite == project.base.suite
            assert all(p.architecture in (platform.split("/")[1], "all") for p in lk.pins)
            base = apt_locks.base_packages(project, platform)
            # A base package is pinned only to replace it with a newer version a request needs.
            same = {p.name for p in lk.pins if base.get(p.name) == p.version}
            assert not same, f"{layer} on {platform} pins what the base already has: {same}"
            assert all(debversions.compare_versions(p.version, base[p.name]) > 0 for p in lk.pins if p.name in base)
            if layer != "system" and (platform, "system") in locks:
                assert not lk.names() & locks[(platform, "system")].names(), (platform, layer)


# --- stale or fresh ---------------------------------------------------------------------

def test_adding_a_project_level_package_makes_its_locks_stale_by_name(mini):
    project = edit(mini, "system_packages: [jq]", "system_packages: [jq, file]")
    stale = {str(s.path): s.reason for s in flow.stale_locks(project)}
    assert stale == {"locks/apt-amd64/system.txt": "requests changed: +file",
                     "locks/apt-arm64/system.txt": "requests changed: +file"}


def test_a_changed_project_level_lock_makes_the_service_locks_above_it_stale(mini):
    path = mini / "locks/apt-arm64/system.txt"
    lk = aptlock.read_apt_lock(path)
    aptlock.write_apt_lock(path, aptlock.AptLock(lk.suite, lk.platform, lk.inputs_hash, lk.requests, lk.snapshots,
                                         lk.pins[:-1]))
    stale = {str(s.path): s.reason for s in flow.stale_locks(spec.load(mini / "project.yaml"))}
    assert stale == {"locks/apt-arm64/service-echo.txt":
                     "the packages below it changed: the base's, or the project-level system lock's"}


def test_a_hand_edited_apt_lock_and_an_orphaned_one_are_named(mini):
    path = mini / "locks/apt-amd64/service-echo.txt"
    path.write_text(path.read_text().replace("ffmpeg=7:", "ffmpeg=8:"))
    project = edit(mini, "system_packages: [jq]\n", "")
    stale = {str(s.path): s.reason for s in flow.stale_locks(project)}
    assert stale == {"locks/apt-amd64/service-echo.txt": "missing or edited by hand",
                     "locks/apt-amd64/system.txt": "no longer used by the project file",
                     "locks/apt-arm64/system.txt": "no longer used by the project file",
                     # Without the project level below, the service's lock must be resolved again too.
                     "locks/apt-arm64/service-echo.txt":
                         "the packages below it changed: the base's, or the project-level system lock's"}
    with pytest.raises(UserError, match="lock locks/apt-amd64/service-echo.txt is unreadable or edited by hand"):
        apt_locks.load_apt_locks(project)


def test_a_base_without_a_package_list_cannot_lock_system_packages(mini):
    (mini / "locks/base.json").unlink()
    project = spec.load(mini / "project.yaml")
    stale = {str(s.path): s.reason for s in apt_locks.apt_check(project)}
    assert "has no base pinned for linux/amd64" in stale["locks/apt-amd64/system.txt"]
    with pytest.raises(UserError, match="no base pinned for linux/amd64") as info:
        apt_locks.resolve_apt(project, log=lambda *_: None)
    assert "invoke engine.up" in info.value.hint


# --- resolving (a fake archive) ------------------------------------------------------------

def test_a_service_lock_counts_the_project_level_pins_as_installed(mini, monkeypatch):
    fake_archive(monkeypatch, [stanza("jq", "1.6-2", "libjq1 (>= 1.6)"), stanza("libjq1", "1.6-2"),
                               stanza("ffmpeg", "7:5.1-1", "libavcodec59, libjq1"), stanza("libavcodec59", "7:5.1-1")])
    for p in (mini / "locks").glob("apt-*"):
        shutil.rmtree(p)
    project = spec.load(mini / "project.yaml")
    changed = apt_locks.resolve_apt(project, log=lambda *_: None)
    assert sorted(str(p.relative_to(mini)) for p in changed) == [
        "locks/apt-amd64/service-echo.txt", "locks/apt-amd64/system.txt",
        "locks/apt-arm64/service-echo.txt", "locks/apt-arm64/system.txt"]
    locks = apt_locks.load_apt_locks(project)
    assert locks[(AMD, "system")].names() == {"jq", "libjq1"}
    assert locks[(AMD, "service-echo")].names() == {"ffmpeg", "libavcodec59"}  # libjq1 is below it
    assert apt_locks.apt_check(project) == []


def test_relocking_keeps_versions_and_upgrade_moves_them(mini, monkeypatch):
    fake_archive(monkeypatch, [stanza("jq", "1.6-2", "libjq1"), stanza("libjq1", "1.6-2"), stanza("file", "1:5.44-3"),
                               stanza("ffmpeg", "7:5.1-1"), stanza("libjq1", "1.6-3")])
    for p in (mini / "locks").glob("apt-*"):
        shutil.rmtree(p)
    project = spec.load(mini / "project.yaml")
    apt_locks.resolve_apt(project, upgrade=True, log=lambda *_: None)
    system = mini / "locks/apt-amd64/system.txt"
    lk = aptlock.read_apt_lock(system)
    older = [resolver.AptPin(p.name, "1.6-2", *[getattr(p, f) for f in ("architecture", "sha256", "size", "url")])
             if p.name == "libjq1" else p for p in lk.pins]
    aptlock.write_apt_lock(system, aptlock.AptLock(lk.suite, lk.platform, lk.inputs_hash, lk.requests, lk.snapshots,
                                           tuple(older)))
    project = edit(mini, "system_packages: [jq]", "system_packages: [jq, file]")
    apt_locks.resolve_apt(project, log=lambda *_: None)
    versions = {p.name: p.version for p in aptlock.read_apt_lock(system).pins}
    assert versions == {"jq": "1.6-2", "libjq1": "1.6-2", "file": "1:5.44-3"}  # adding file moved nothing
    before = system.read_text()
    assert apt_locks.resolve_apt(project, log=lambda *_: None) == []  # fresh: left alone
    apt_locks.resolve_apt(project, upgrade=True, log=lambda *_: None)
    assert {p.name: p.version for p in aptlock.read_apt_lock(system).pins}["libjq1"] == "1.6-3"
    assert system.read_text() != before


def test_an_unknown_package_names_the_package_suite_and_platform(mini, monkeypatch):
    fake_archive(monkeypatch, [stanza("jq", "1.6-2"), stanza("ffmpeg", "7:5.1-1")])
    project = edit(mini, "system_packages: [jq]", "system_packages: [jq, no-such-thing]")
    with pytest.raises(UserError, match="'no-such-thing' is not available in Debian bookworm for linux/amd64") as info:
        apt_locks.resolve_apt(project, log=lambda *_: None)
    assert info.value.exit_code == 2 and "packages.debian.org/bookworm/no-such-thing" in info.value.hint


# --- where the layers go ---------------------------------------------------------------

def _plan(project):
    return plan_mod.make_plan(project, load_all_locks(project), system=apt_locks.load_apt_locks(project))


def test_project_packages_sit_on_the_parent_and_a_services_own_just_below_its_python_layer():
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    images = {(i.key, i.backend.name, i.arch): i for i in _plan(project).images}
    cuda = images[("echo", "cuda", "amd64")]
    assert cuda.from_image == "cuda-libs"
    assert [s.name for s in cuda.stages()] == ["system", "shared", "system-echo", "service-echo"]
    assert [s.name for s in images[("echo", "cpu", "arm64")].stages()] == [
        "system", "shared", "system-echo", "service-echo"]
    assert cuda.system_packages() == ("jq", "ffmpeg")
    # The CUDA-libs image is shared by every service and project on its line: no Debian packages in it.
    assert images[("cuda-libs", "cuda", "amd64")].system == ()
    # Each platform gets its own architecture's lock.
    arm = images[("echo", "cpu", "arm64")]
    assert {p.architecture for s in arm.system for p in s.lock.pins} <= {"arm64", "all"}


def test_the_example_stt_service_gets_ffmpeg_and_tts_gets_no_debian_layer():
    project = spec.load(ROOT / "project.yaml")
    for image in _plan(project).images:
        if image.key == "stt":
            assert [s.name for s in image.stages()] == ["torch", "shared", "system-stt", "service-stt"]
            assert "ffmpeg" in image.system[0].lock.names()
        else:
            assert image.system == ()


def test_the_dockerfile_documents_the_debian_layers_it_does_not_install():
    text = flow.rendered(spec.load(FIXTURES / "mini" / "project.yaml"))["echo.cuda.Dockerfile"]
    assert ("# layers, rarest change first: base -> cuda-libs -> system -> shared -> system-echo -> service-echo "
            "-> app\n") in text
    assert "#   system-echo: ffmpeg (locks/apt-<arch>/service-echo.txt)\n" in text
    assert "a plain `docker build`\n# of this file does not install them" in text
    assert "apt-get" not in text and "COPY --from=system" not in text


def test_the_debian_pins_are_in_the_build_context_so_the_content_tag_follows_them(mini):
    project = spec.load(mini / "project.yaml")
    image = next(i for i in _plan(project).images if i.key == "echo" and i.platform == AMD)
    ctx, digest = stage_context(project, image, "FROM x")
    text = (ctx / "locks/system-echo.apt.txt").read_text()
    assert text.startswith("# apt layer ") and "\nffmpeg=7:" in text and "date=" not in text
    shutil.rmtree(ctx)
    path = mini / "locks/apt-amd64/service-echo.txt"
    lk = aptlock.read_apt_lock(path)
    aptlock.write_apt_lock(path, aptlock.AptLock(lk.suite, lk.platform, lk.inputs_hash, lk.requests, lk.snapshots,
                                         lk.pins[1:]))
    moved = next(i for i in _plan(project).images if i.key == "echo" and i.platform == AMD)
    ctx2, digest2 = stage_context(project, moved, "FROM x")
    shutil.rmtree(ctx2)
    assert digest2 != digest


# --- the smoke check ---------------------------------------------------------------------

class LocalContainer:
    """Runs the smoke's exec here: this Debian host plays the container."""

    def exec(self, argv):
        import subprocess
        from types import SimpleNamespace

        p = subprocess.run(argv, capture_output=True)
        return SimpleNamespace(exit_code=p.returncode, output=p.stdout + p.stderr)


def test_the_smoke_runs_each_declared_binary_and_finds_library_packages():
    if not Path("/var/lib/dpkg/status").exists() or not shutil.which("bash"):
        unavailable("needs a Debian host (dpkg status) with bash")
    from orchestrator.release import smoke

    ok = smoke.system_packages_check(LocalContainer(), ("bash", "libc6"))
    assert ok.ok and ok.name == "system packages", ok.detail
    assert "bash: GNU bash, version" in ok.detail and "libc6: installed (no /usr/bin/libc6)" in ok.detail
    missing = smoke.system_packages_check(LocalContainer(), ("bash", "no-such-package"))
    assert not missing.ok and missing.detail == "no-such-package: not installed"


def test_smoke_variants_carry_the_declared_packages_of_their_image():
    from types import SimpleNamespace

    from orchestrator.release import smoke

    project = spec.load(FIXTURES / "mini" / "project.yaml")
    image = next(i for i in _plan(project).images if i.key == "echo" and i.platform == ARM)
    (v,) = smoke.variants_from_builds(project, [SimpleNamespace(image=image, digest="sha256:" + "0" * 64)])
    assert v.system_packages == ("jq", "ffmpeg") and v.platform == ARM
