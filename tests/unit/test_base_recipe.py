"""The base bootstrap takes nothing from the machine it runs on: not its environment,
not its hostname or resolver, so every machine bootstraps the same digest."""

from __future__ import annotations

import dataclasses

from orchestrator.build import bases as base

from orchestrator.debian import basepin

from orchestrator.debian import bootstrap as bootstrap_mod
from orchestrator.project import spec
from tests.conftest import FIXTURES


def test_maintainer_scripts_get_a_fixed_environment_whatever_the_callers(monkeypatch):
    for k, v in {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPATH": "/x", "LANG": "de_DE.UTF-8", "LC_ALL": "POSIX",
                 "LC_CTYPE": "ja_JP", "TZ": "Asia/Tokyo", "LANGUAGE": "de"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE")
    env = bootstrap_mod._bootstrap_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # py3compile writes every .pyc hash-checked
    assert env["LC_ALL"] == "C.UTF-8" and env["TZ"] == "UTC"
    assert env["SOURCE_DATE_EPOCH"] == "315532800"
    assert not {"PYTHONPATH", "LANG", "LANGUAGE", "LC_CTYPE"} & set(env)
    assert env["PATH"]  # the rest of the environment (PATH, proxies) is the caller's


def test_the_hosts_hostname_and_resolver_do_not_land_in_the_base():
    assert any("/etc/hostname" in h and "/etc/resolv.conf" in h for h in bootstrap_mod.BOOTSTRAP_HOOKS)


def test_a_pin_made_by_another_recipe_is_stale(monkeypatch):
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    before = basepin.inputs_hash(project)
    monkeypatch.setattr(bootstrap_mod, "BOOTSTRAP_HOOKS", ())
    assert basepin.inputs_hash(project) != before
    other = dataclasses.replace(project, base=dataclasses.replace(project.base, include=("python3",)))
    assert basepin.inputs_hash(other) != before


class _Bootstraps:
    """A stand-in for mmdebstrap and the Debian archive: counts bootstraps, returns a fixed image."""

    def __init__(self, monkeypatch, state="state-1"):
        self.state, self.runs = state, 0
        self.image = type("Img", (), {"config_digest": "sha256:" + "c" * 64, "layers": ()})()
        monkeypatch.setattr(bootstrap_mod, "archive_state", lambda suite, platform: self.state)
        monkeypatch.setattr(bootstrap_mod, "bootstrap", self.bootstrap)
        monkeypatch.setattr(base, "_from_registry", lambda reg, name, pin, c: self.image)

    def bootstrap(self, project, platform, cache, log):
        self.runs += 1
        return self.image, ("libc6=2.36-9",)


def _once(project, tmp_path, lines):
    from orchestrator.oci import layers

    cache = layers.BlobCache(tmp_path / "blobs")
    return base._bootstrap_once(project, "linux/arm64", None, "orchestrator/base-bookworm", cache,
                                layers.codec(project.compression), lines.append)


def test_a_recipe_is_bootstrapped_once_per_state_of_the_debian_archive(monkeypatch, tmp_path):
    # Why: after Debian updates a package under the committed pin, every project and test copy on a
    # fresh machine must move to the same new base; without this each one ran mmdebstrap (minutes under QEMU).
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    fake, lines = _Bootstraps(monkeypatch), []
    assert _once(project, tmp_path, lines) == (fake.image, ("libc6=2.36-9",))
    assert _once(project, tmp_path, lines) == (fake.image, ("libc6=2.36-9",))
    assert fake.runs == 1
    assert "bootstrapped from this state of the Debian archive before" in lines[-1]
    fake.state = "state-2"  # a package moved: bootstrap again
    _once(project, tmp_path, lines)
    assert fake.runs == 2


def test_a_bootstrap_is_not_remembered_when_the_archive_moved_while_it_ran_or_cannot_be_read(monkeypatch, tmp_path):
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    fake, lines = _Bootstraps(monkeypatch), []
    states = iter(["before", "after", "after", "after"])
    monkeypatch.setattr(bootstrap_mod, "archive_state", lambda suite, platform: next(states))
    _once(project, tmp_path, lines)  # read "before", bootstrapped, read "after": which did it install?
    _once(project, tmp_path, lines)
    assert fake.runs == 2
    monkeypatch.setattr(bootstrap_mod, "archive_state", lambda suite, platform: None)  # offline mirror index
    _once(project, tmp_path, lines)
    _once(project, tmp_path, lines)
    assert fake.runs == 4
    assert len(list((tmp_path / "blobs" / "bootstraps").iterdir())) == 1  # the second run's, made on "after"
