"""The base bootstrap takes nothing from the machine it runs on: not its environment,
not its hostname or resolver, so every machine bootstraps the same digest."""

from __future__ import annotations

import dataclasses

from orchestrator import base, spec
from tests.conftest import FIXTURES


def test_maintainer_scripts_get_a_fixed_environment_whatever_the_callers(monkeypatch):
    for k, v in {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPATH": "/x", "LANG": "de_DE.UTF-8", "LC_ALL": "POSIX",
                 "LC_CTYPE": "ja_JP", "TZ": "Asia/Tokyo", "LANGUAGE": "de"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE")
    env = base._bootstrap_env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # py3compile writes every .pyc hash-checked
    assert env["LC_ALL"] == "C.UTF-8" and env["TZ"] == "UTC"
    assert env["SOURCE_DATE_EPOCH"] == "315532800"
    assert not {"PYTHONPATH", "LANG", "LANGUAGE", "LC_CTYPE"} & set(env)
    assert env["PATH"]  # the rest of the environment (PATH, proxies) is the caller's


def test_the_hosts_hostname_and_resolver_do_not_land_in_the_base():
    assert any("/etc/hostname" in h and "/etc/resolv.conf" in h for h in base.BOOTSTRAP_HOOKS)


def test_a_pin_made_by_another_recipe_is_stale(monkeypatch):
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    before = base.inputs_hash(project)
    monkeypatch.setattr(base, "BOOTSTRAP_HOOKS", ())
    assert base.inputs_hash(project) != before
    other = dataclasses.replace(project, base=dataclasses.replace(project.base, include=("python3",)))
    assert base.inputs_hash(other) != before
