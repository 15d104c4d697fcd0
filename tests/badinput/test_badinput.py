"""The bad input corpus (cases.yaml) through the real CLI.

Each case edits a tmp copy of tests/fixtures/mini, runs the task from that
copy through Invoke's Program over the CLI's tasks (`orchestrator.cli.program`,
in this process: no 0.5 s of imports per case), and expects: exit 2, one
`error:` message naming the file or key, a `hint:` line, no traceback, and
nothing written into the repository checkout. A few cases of every kind also
run as real `invoke` processes, for the exit code and output a shell sees.
No case needs Docker or a registry; registry answers (backend manifests) are
also fed straight to backends.validate below.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.oci import backends
from orchestrator.common.errors import UserError

from ..conftest import FIXTURES, ROOT

HERE = Path(__file__).resolve().parent
CORPUS = yaml.safe_load((HERE / "cases.yaml").read_text())
INVOKE = Path(sys.executable).parent / "invoke"
DIGEST = "sha256:" + "a" * 64


def valid_manifest() -> dict:
    """A schemaVersion 2 manifest: two CUDA lines (newest first) and cpu on amd64, cuda13 and cpu on arm64."""
    repo = "127.0.0.1:5000/orch-mini/echo"
    archs13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]

    def cuda13():
        return {"image": f"{repo}@{DIGEST}", "size": 1, "torch": None,
                "requires": {"cuda": "13.0", "driver": ">=580.65.06", "archs": list(archs13)},
                "cuda_libs": {"tag": "cu130-v1", "digest": DIGEST}}

    return {
        "schemaVersion": 2, "project": "orch-mini", "service": "echo", "version": "0.1.0",
        "platforms": {
            "linux/amd64": {"default": "cuda13", "fallback": ["cuda13", "cuda", "cpu"], "backends": {
                "cuda13": cuda13(),
                "cuda": {"image": f"{repo}@{DIGEST}", "size": 1, "torch": None,
                         "requires": {"cuda": "12.4", "driver": ">=525.60.13",
                                      "archs": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]},
                         "cuda_libs": {"tag": "cu124-v1", "digest": DIGEST}},
                "cpu": {"image": f"{repo}@{DIGEST}", "size": 1, "torch": None}}},
            "linux/arm64": {"default": "cuda13", "fallback": ["cuda13", "cpu"], "backends": {
                "cuda13": cuda13(),
                "cpu": {"image": f"{repo}@{DIGEST}", "size": 1, "torch": None}}},
        },
    }


def _merge(into: dict, patch: dict) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def build_manifest(spec: dict) -> dict | list:
    m = valid_manifest()
    _merge(m, spec.get("patch") or {})
    for key in spec.get("drop") or ():
        del m[key]
    if "image" in spec:
        m["platforms"]["linux/amd64"]["backends"]["cpu"]["image"] = spec["image"]
    if "driver" in spec:
        m["platforms"]["linux/amd64"]["backends"]["cuda"]["requires"]["driver"] = spec["driver"]
    return m


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        data = data.setdefault(p, {})
    if value == "~":
        data.pop(last, None)
    else:
        data[last] = value


def cases():
    for group, entries in CORPUS.items():
        for case in entries:
            marks = [pytest.mark.xfail(reason="needs: " + case["needs"], strict=True)] if case.get("needs") else []
            yield pytest.param(group, case, id=f"{group}/{case['id']}", marks=marks)


ALL = list(cases())


def test_the_corpus_is_big_enough_and_ids_are_unique():
    ids = [p.id for p in ALL]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


def prepare(tmp_path: Path, case: dict) -> tuple[Path, Path]:
    """The tmp copy of the mini fixture, edited as the case says."""
    work = tmp_path / "work"
    shutil.copytree(FIXTURES / "mini", work / "mini")
    proj_dir = work / "mini"
    (tmp_path / "host").mkdir()  # an empty host root for select: no GPU
    for rel, text in (case.get("write") or {}).items():
        p = proj_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    for rel, hexdata in (case.get("bytes") or {}).items():
        (proj_dir / rel).write_bytes(bytes.fromhex(hexdata))
    for rel, target in (case.get("symlink") or {}).items():
        (proj_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, proj_dir / rel)
    for rel, (old, new) in (case.get("edit") or {}).items():
        p = proj_dir / rel
        text = p.read_text()
        assert old in text, f"{rel} has no {old!r}: fix the case"
        p.write_text(text.replace(old, new, 1))
    for rel in case.get("delete_files") or ():
        (proj_dir / rel).unlink()
    if case.get("set"):
        pf = proj_dir / "project.yaml"
        data = yaml.safe_load(pf.read_text())
        for dotted, value in case["set"].items():
            _set(data, dotted, value)
        pf.write_text(yaml.safe_dump(data, sort_keys=False))
    if "manifest" in case:
        (proj_dir / "m.json").write_text(json.dumps(build_manifest(case["manifest"] or {}), indent=2))
    elif "manifest_text" in case and case["manifest_text"] is not None:
        (proj_dir / "m.json").write_text(case["manifest_text"])
    return proj_dir, proj_dir / "project.yaml"


def checkout_state() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return set(out.splitlines())


def case_args(group: str, case: dict, project: Path, proj_dir: Path, tmp_path: Path) -> list[str]:
    default = ["lock", "--check", "--project", "{project}"]
    if group == "manifests":
        default = ["select", "--service", "echo", "--manifest", "{dir}/m.json", "--root", "{tmp}/host",
                   "--project", "{project}"]
    return [a.format(project=project, dir=proj_dir, tmp=tmp_path) for a in case.get("args", default)]


def case_env(case: dict, tmp_path: Path) -> dict[str, str | None]:
    """What the case changes in the environment (None: unset)."""
    env: dict[str, str | None] = {k: None for k in ("ORCH_REGISTRY", "ORCH_BACKEND", "ORCH_PROJECT")}
    env.update(case.get("env") or {})
    env["ORCH_STATE_DIR"] = str(tmp_path / "state")  # the engine's state, if anything reached for it
    return env


def in_process(argv: list[str], cwd: Path, env: dict, monkeypatch, capsys) -> tuple[int, str, str]:
    """The tasks through Invoke's Program (orchestrator.cli.program, the `orchestrator` command), in this
    process: (exit code, stdout, stderr). Any exception but the exit escapes, as a traceback would."""
    from orchestrator.cli import program

    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        program.run(["orchestrator", *argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def as_process(argv: list[str], cwd: Path, env: dict) -> tuple[int, str, str]:
    """`invoke <task>` as a user runs it: a process of its own, from the project copy."""
    environ = {k: v for k, v in os.environ.items() if env.get(k, "") is not None}
    environ.update({k: v for k, v in env.items() if v is not None})
    proc = subprocess.run([str(INVOKE), "--search-root", str(ROOT), *argv], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def assert_refused_as_bad_input(group: str, case: dict, project: Path, code: int, stdout: str, stderr: str) -> None:
    out = stdout + stderr
    assert "Traceback" not in out, out
    assert code == 2, out
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert any(ln.strip().startswith("hint: ") and len(ln.strip()) > len("hint: ") + 5
               for ln in stderr.splitlines()), stderr
    for fragment in case["expect"]:
        assert fragment in stderr, f"{fragment!r} not in:\n{stderr}"
    if group in ("project", "requirements"):
        assert str(project) in errors[0]  # names the project file, then the key


@pytest.mark.parametrize("group, case", ALL)
def test_bad_input_exits_2_with_one_message_a_hint_and_no_traceback(tmp_path, group, case, monkeypatch, capsys):
    proj_dir, project = prepare(tmp_path, case)
    before = checkout_state()
    code, stdout, stderr = in_process(case_args(group, case, project, proj_dir, tmp_path), proj_dir,
                                      case_env(case, tmp_path), monkeypatch, capsys)
    after = checkout_state()
    assert_refused_as_bad_input(group, case, project, code, stdout, stderr)
    assert not (after - before), f"written into the checkout: {sorted(after - before)}"


# The process path: a few cases of each kind as real `invoke` processes, so exit codes and the
# absence of a traceback are those a shell sees (the in-process runs above share the tasks).
AS_PROCESS = {"project/service-path-absolute", "project/registry-from-environment",
              "requirements/extra-index-url", "locks/lock-edited-by-hand", "manifests/manifest-not-json",
              "cli/run-bad-port", "cli/missing-project-file"}


@pytest.mark.parametrize("group, case", [p for p in ALL if p.id in AS_PROCESS])
def test_bad_input_as_a_real_invoke_process_exits_2_with_one_message_and_no_traceback(tmp_path, group, case):
    proj_dir, project = prepare(tmp_path, case)
    before = checkout_state()
    code, stdout, stderr = as_process(case_args(group, case, project, proj_dir, tmp_path), proj_dir,
                                      case_env(case, tmp_path))
    after = checkout_state()
    assert_refused_as_bad_input(group, case, project, code, stdout, stderr)
    assert not (after - before), f"written into the checkout: {sorted(after - before)}"


def test_the_process_cases_are_in_the_corpus():
    assert AS_PROCESS <= {p.id for p in ALL}


# --- registry answers: malformed backend manifests at the unit level -------------

MANIFEST_CASES = [c for c in CORPUS["manifests"] if c.get("manifest") is not None or c.get("manifest_text")]


@pytest.mark.parametrize("case", MANIFEST_CASES, ids=[c["id"] for c in MANIFEST_CASES])
def test_a_malformed_backend_manifest_is_refused_by_validate_or_load(tmp_path, case):
    if "manifest" in case:
        data = build_manifest(case["manifest"] or {})
        with pytest.raises(UserError) as e:
            backends.validate(copy.deepcopy(data), "registry answer")
        assert e.value.exit_code == 2 and e.value.message.startswith("registry answer: ")
        assert e.value.hint
        text = json.dumps(data)
    else:
        text = case["manifest_text"]
    f = tmp_path / "m.json"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        backends.load_manifest_file(str(f))
    assert e.value.exit_code == 2 and str(f) in e.value.message


def test_the_valid_manifest_the_corpus_starts_from_is_valid():
    backends.validate(valid_manifest(), "corpus")
