"""SBOMs in a real registry (Debian's docker-registry 2.8, which lacks the
referrers API): after a publish of the mini fixture, every image's SBOM is
reachable from its digest and named by the backend manifest."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from orchestrator.project import lock as lock_mod
from orchestrator.release import publish
from orchestrator.oci import sbom
from orchestrator.oci.registry import OCI_INDEX, Registry, split_ref

from ..conftest import ROOT, copy_fixture

pytestmark = pytest.mark.engine  # `published` (tests/conftest.py): the mini fixture published once per session


def variants(manifest: dict):
    for platform, entry in manifest["platforms"].items():
        for backend, spec in entry["backends"].items():
            yield platform, backend, spec


def test_every_promoted_image_has_its_sbom_among_the_referrers_of_its_digest(mini_project, published):
    reg = Registry(mini_project.registry)
    manifest = json.loads(published.manifests["echo"].read_text())
    seen = 0
    for platform, backend, spec in variants(manifest):
        _, name, digest = split_ref(spec["image"])
        listed = sbom.referrers(reg, name, digest)
        assert spec["sbom"] in [d["digest"] for d in listed], (platform, backend)
        if reg.referrers(name, digest) is None:  # no referrers API: the tag schema holds them
            index = reg.get_manifest(name, sbom.referrers_tag(digest))
            assert index.media_type == OCI_INDEX
            assert spec["sbom"] in [d["digest"] for d in index.json["manifests"]]
        doc = json.loads(sbom.fetch(reg, name, digest, spec["sbom"]))
        assert doc["metadata"]["component"]["version"] == digest
        assert doc["metadata"]["component"]["properties"] == [{"name": "orchestrator:platform", "value": platform}]
        seen += 1
    assert seen == 5


def test_the_cuda_sbom_lists_the_cuda_wheels_with_their_lock_hashes(mini_project, published):
    image, data = publish.published_sbom(mini_project, "echo", "cuda", "linux/amd64")
    doc = json.loads(data)
    assert sbom.validation_errors(data) is None
    found = {c["name"]: c for c in doc["components"]}
    libs = lock_mod.load_locks(mini_project, mini_project.backends["cuda"], "linux/amd64")
    pins = [p for lk in libs if lk.layer == "cuda-libs" for p in lk.pins]
    assert [p.name for p in pins] == ["nvidia-cuda-runtime-cu12"]
    for pin in pins:
        component = found[pin.name]
        assert component["purl"] == f"pkg:pypi/{pin.name}@{pin.version}"
        assert {h["content"] for h in component["hashes"]} == set(sbom.HASH_RE.findall(pin.block))
        assert {h["alg"] for h in component["hashes"]} == {"SHA-256"}
    assert "ffmpeg" in found and found["ffmpeg"]["purl"].startswith("pkg:deb/debian/ffmpeg@")
    base = [c for c in doc["components"] if c["type"] == "container"]
    assert len(base) == 1 and base[0]["version"].startswith("sha256:")
    manifest = json.loads(published.manifests["echo"].read_text())
    spec = manifest["platforms"]["linux/amd64"]["backends"]["cuda"]
    assert image == spec["image"]
    _, name, _ = split_ref(image)
    artifact = Registry(mini_project.registry).get_manifest(name, spec["sbom"]).json
    assert artifact["subject"]["digest"] == image.split("@")[1]
    assert artifact["artifactType"] == sbom.MEDIA_TYPE


def invoke_sbom(project_file, *args):
    return subprocess.run([sys.executable, "-m", "invoke", "sbom", "--project", str(project_file), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_invoke_sbom_prints_it_and_refuses_what_the_project_lacks(mini_project, published):
    def invoke(*args):
        return invoke_sbom(mini_project.file, *args)

    ok = invoke("--service", "echo", "--backend", "cuda13", "--platform", "linux/arm64")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["bomFormat"] == "CycloneDX"
    _, expected = publish.published_sbom(mini_project, "echo", "cuda13", "linux/arm64")
    assert ok.stdout.encode() == expected
    for args, message in ((("--service", "nope", "--backend", "cuda"), "service 'nope' is not one of"),
                          (("--service", "echo", "--backend", "rocm"), "backend 'rocm' is not one of"),
                          (("--service", "echo", "--backend", "cuda", "--platform", "linux/arm64"),
                           "echo has no cuda image for linux/arm64")):
        bad = invoke(*args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_invoke_sbom_says_when_nothing_is_published_yet(engine_ready, tmp_path):
    never = copy_fixture("mini", tmp_path, f"orch-test-{uuid.uuid4().hex[:8]}")
    out = invoke_sbom(never, "--service", "echo", "--backend", "cuda", "--platform", "linux/amd64")
    assert out.returncode == 2
    assert "nothing is published for echo 0.1.0 yet" in out.stderr and "invoke publish" in out.stderr
