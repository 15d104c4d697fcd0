"""Tampering: `invoke select` and `invoke run` check what the backend manifest
names against the registry before a host runs it, and refuse what differs.

Each case changes the real registry behind the published mini fixture's
back (a moved tag, an edited manifest, a deleted image, bytes altered in
storage), runs the real CLI, and puts the registry back as it was.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.oci import backends
from orchestrator.common import places as state
from orchestrator.oci.registry import OCI_INDEX, OCI_MANIFEST, Registry

from ..conftest import ROOT, unavailable

pytestmark = pytest.mark.engine

INVOKE = Path(sys.executable).parent / "invoke"
TAG = "0.1.0-backends"


def cli(project, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(INVOKE), "--search-root", str(ROOT), *args, "--project", str(project.file)],
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


def refused(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr
    assert "hint: " in proc.stderr


@pytest.fixture
def echo(mini_project, published):
    """(registry, repository name, the promoted backend manifest) for the echo service."""
    reg = Registry(mini_project.registry)
    name = f"{mini_project.name}/echo"
    return reg, name, backends.fetch_manifest(f"{mini_project.repository('echo')}:{TAG}")


@contextlib.contextmanager
def restored(reg: Registry, name: str, *tags: str):
    """Put the tags back to the manifests they named before the block."""
    saved = {t: reg.get_manifest(name, t) for t in tags}
    try:
        yield
    finally:
        for t, m in saved.items():
            reg.put_manifest(name, t, m.body, m.media_type)


def storage_blob(digest: str) -> Path:
    storage = state.state_dir() / "registry" / "data"
    blob = storage / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
    if not blob.exists():
        unavailable(f"registry storage {storage} is not ours to tamper with")
    return blob


def test_an_untouched_release_is_selected_and_verified(mini_project, echo):
    proc = cli(mini_project, "select", "--service", "echo", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verified"] is True and "@sha256:" in out["image"]


def test_a_human_tag_moved_to_another_index_is_refused_by_select_and_run(mini_project, echo):
    reg, name, manifest = echo
    cpu_tag, other = "0.1.0-cpu", reg.get_manifest(name, "0.1.0-cuda13")
    assert other.media_type == OCI_INDEX
    with restored(reg, name, cpu_tag):
        reg.put_manifest(name, cpu_tag, other.body, OCI_INDEX)  # someone re-tags behind the manifest's back
        for task in ("select", "run"):
            refused(cli(mini_project, task, "--service", "echo"),
                    f"{name}:{cpu_tag} now points at", "re-tagged behind the manifest's back", "invoke publish")
    assert cli(mini_project, "select", "--service", "echo").returncode == 0  # and back to normal


def test_a_manifest_file_that_differs_from_the_registry_is_refused(mini_project, echo, tmp_path):
    _, _, manifest = echo
    edited = json.loads(json.dumps(manifest))
    entry = edited["platforms"]["linux/amd64"]["backends"]["cpu"]
    entry["image"] = entry["image"].split("@")[0] + "@sha256:" + "0" * 64  # points hosts at other bytes
    path = tmp_path / "echo.backends.json"
    path.write_text(json.dumps(edited))
    for task in ("select", "run"):
        refused(cli(mini_project, task, "--service", "echo", "--manifest", str(path)),
                str(path), f"is not the one {mini_project.repository('echo')}:{TAG} serves")
    # The registry's own manifest, reformatted, is accepted: formatting does not count.
    path.write_text(json.dumps(manifest, indent=None))
    assert cli(mini_project, "select", "--service", "echo", "--manifest", str(path)).returncode == 0
    # --no-verify answers offline what-if questions, and says so.
    edited_path = tmp_path / "edited.json"
    edited_path.write_text(json.dumps(edited))
    proc = cli(mini_project, "select", "--service", "echo", "--manifest", str(edited_path), "--no-verify")
    assert proc.returncode == 0 and "not verified against the registry" in proc.stdout


def test_a_backend_manifest_altered_in_registry_storage_is_refused(mini_project, echo):
    reg, name, _ = echo
    blob = storage_blob(reg.get_manifest(name, TAG).json["layers"][0]["digest"])
    original = blob.read_bytes()
    try:
        blob.write_bytes(original.replace(b'"cpu"', b'"cpv"', 1))
        for task in ("select", "run"):
            refused(cli(mini_project, task, "--service", "echo"), "does not match its digest")
    finally:
        blob.write_bytes(original)


def test_a_backend_manifest_that_fails_its_schema_is_refused(mini_project, echo):
    reg, name, manifest = echo
    broken = dict(manifest, platforms={"linux/amd64": {"default": "cpu"}})  # no backends, no fallback
    with restored(reg, name, TAG):
        backends.push_artifact(reg, name, TAG, backends.manifest_bytes(broken), "broken.json")
        for task in ("select", "run"):
            refused(cli(mini_project, task, "--service", "echo"), "backend manifest invalid at", "platforms/linux/amd64")


def test_an_image_the_manifest_names_but_the_registry_lost_is_refused(mini_project, echo):
    reg, name, manifest = echo
    image = manifest["platforms"]["linux/amd64"]["backends"]["cpu"]["image"]
    digest = image.split("@")[1]
    saved = reg.get_manifest(name, digest)
    tags = [t for t in reg.tags(name) if reg.get_manifest(name, t).digest == digest]  # deleting drops them too
    reg.delete_manifest(name, digest)
    try:
        for task in ("select", "run"):
            refused(cli(mini_project, task, "--service", "echo"), image, "no longer has")
    finally:
        for t in tags or [digest]:
            reg.put_manifest(name, t, saved.body, OCI_MANIFEST)
    assert reg.get_manifest(name, digest).digest == digest
