"""Signed releases in a real registry, checked by verifiers nobody here wrote.

`published` (tests/conftest.py) is the mini fixture published once per
session with a release key made for the session (the project trusts its
public key). Every image, index and backend manifest carries a signature in
cosign's format; securesystemslib and `openssl dgst` verify each one
reading only the registry (plain HTTP requests, not the tool's client), and
refuse an unsigned, a wrongly signed and an edited one. `invoke select` and
`invoke run` refuse each tampering with exit 2, naming the artifact; the
tampering cases change the registry behind the release's back and put it
back as it was.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import subprocess
from importlib import resources
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from securesystemslib.dsse import Envelope
from securesystemslib.signer import Signature, SSlibKey

from orchestrator import __version__, flow
from orchestrator.oci import backends, provenance, signing
from orchestrator.oci.layers import codec
from orchestrator.oci.referrers import referrers_tag
from orchestrator.oci.registry import OCI_INDEX, OCI_MANIFEST, Registry, split_ref

from ..conftest import cleanup_namespace, ready_mini, trusting
from .test_gc import Pusher, private_registry  # noqa: F401 - fixture
from .test_tamper import cli, refused

pytestmark = pytest.mark.engine
TAG = "0.1.0-backends"
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX])


# -- what the release holds, and a verifier that is not ours --------------------------------

def artifacts(project) -> list[tuple[str, str, str]]:
    """(what, repository name, digest) of everything the release signs: images, indexes, backend manifest."""
    reg = Registry(project.registry)
    name = f"{project.name}/echo"
    manifest = backends.fetch_manifest(f"{project.repository('echo')}:{TAG}")
    found = {("backend manifest", name, reg.get_manifest(name, TAG).digest)}
    libs = f"{project.name}/cuda-libs"
    for platform, entry in manifest["platforms"].items():
        for backend, spec in entry["backends"].items():
            found.add((f"{backend} image {platform}", name, split_ref(spec["image"])[2]))
            found.add((f"{backend} index", name, split_ref(spec["index"])[2]))
            if "cuda_libs" in spec:
                found.add((f"cuda-libs {spec['cuda_libs']['tag']} {platform}", libs, spec["cuda_libs"]["digest"]))
    for tag in ("cu124-v1", "cu130-v1"):
        found.add((f"cuda-libs {tag} index", libs, reg.get_manifest(libs, tag).digest))
    return sorted(found)


def http_get(host: str, path: str, **headers) -> requests.Response:
    return requests.get(f"http://{host}/v2/{path}", headers=headers, timeout=30)


def third_party_verdicts(host: str, name: str, digest: str, public_pem: Path, tmp: Path) -> tuple[bool, bool]:
    """(securesystemslib accepts, openssl accepts) a signature of digest, reading only the registry.

    Accepting means: some layer's signature verifies over its payload with
    the public key, and the payload names exactly this digest.
    """
    resp = http_get(host, f"{name}/manifests/sha256-{digest[7:]}.sig", Accept=OCI_MANIFEST)
    if resp.status_code == 404:
        return False, False  # unsigned
    key = SSlibKey.from_crypto(serialization.load_pem_public_key(public_pem.read_bytes()),
                               scheme="ecdsa-sha2-nistp256")
    sslib = openssl = False
    for i, layer in enumerate(resp.json()["layers"]):
        payload = http_get(host, f"{name}/blobs/{layer['digest']}").content
        der = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
        try:
            claimed = json.loads(payload)["critical"]["image"]["docker-manifest-digest"]
        except (ValueError, KeyError, TypeError):
            claimed = None
        try:
            key.verify_signature(Signature(key.keyid, der.hex()), payload)
            sslib |= claimed == digest
        except Exception:  # noqa: BLE001 - securesystemslib's UnverifiedSignatureError and kin
            pass
        (tmp / f"payload{i}").write_bytes(payload)
        (tmp / f"sig{i}.der").write_bytes(der)
        ok = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(public_pem), "-signature",
                             str(tmp / f"sig{i}.der"), str(tmp / f"payload{i}")], capture_output=True).returncode == 0
        openssl |= ok and claimed == digest
    return sslib, openssl


@contextlib.contextmanager
def signature_replaced(reg: Registry, name: str, digest: str, body: bytes | None):
    """The signature manifest beside digest replaced by body (None: deleted), then put back."""
    tag = signing.signature_tag(digest)
    saved = reg.get_manifest(name, tag)
    try:
        if body is None:
            reg.delete_manifest(name, saved.digest)  # drops the tag with it
        else:
            reg.put_manifest(name, tag, body, OCI_MANIFEST)  # the tag moves; nothing else is touched
        yield
    finally:
        reg.put_manifest(name, tag, saved.body, saved.media_type)
    assert reg.get_manifest(name, tag).digest == saved.digest


def signed_by(reg: Registry, name: str, repository: str, digest: str, signer) -> bytes:
    """A whole signature manifest for digest by signer (its blobs uploaded), without putting it under the tag."""
    data = signing.payload(repository, digest, signer.public.keyid)
    manifest, config = signing.signature_manifest([signing.layer(data, signer.sign(data))])
    reg.upload_blob(name, data)
    reg.upload_blob(name, config)
    return manifest


def edited(reg: Registry, name: str, digest: str) -> bytes:
    """The signature manifest beside digest with its payload edited after signing (the signature kept)."""
    body = reg.get_manifest(name, signing.signature_tag(digest)).json
    layer = body["layers"][0]
    payload = reg.get_blob(name, layer["digest"]).replace(b'"optional":{', b'"optional": {')
    reg.upload_blob(name, payload)
    changed = dict(layer, digest="sha256:" + hashlib.sha256(payload).hexdigest(), size=len(payload))
    manifest, config = signing.signature_manifest([changed])
    reg.upload_blob(name, config)
    return manifest


@pytest.fixture(scope="module")
def other_key(tmp_path_factory):
    d = tmp_path_factory.mktemp("other-key")
    signing.write_key_pair(d / "other.key", d / "other.pub")
    return signing.signer_from_file(d / "other.key")


# -- the release as published -----------------------------------------------------------------

def test_every_image_index_and_backend_manifest_carries_a_signature_in_cosigns_layout(mini_project, published):
    reg = Registry(mini_project.registry)
    found = artifacts(mini_project)
    assert len(found) == 14  # 8 images (5 echo, 3 cuda-libs), 5 indexes, 1 backend manifest
    manifest = json.loads(published.manifests["echo"].read_text())
    assert manifest["signed"] is True
    for what, name, digest in found:
        sig = reg.get_manifest(name, signing.signature_tag(digest))
        assert sig is not None and sig.media_type == OCI_MANIFEST, what
        body = sig.json
        assert body["mediaType"] == OCI_MANIFEST and body["config"]["mediaType"] == signing.OCI_CONFIG
        assert [x["mediaType"] for x in body["layers"]] == [signing.SIMPLESIGNING], what
        config = reg.get_blob(name, body["config"]["digest"])
        assert config == signing.config_bytes([x["digest"] for x in body["layers"]])  # cosign's config, byte for byte
        assert sig.body == signing.signature_manifest(body["layers"])[0]  # and cosign's manifest JSON
        payload = json.loads(reg.get_blob(name, body["layers"][0]["digest"]))
        assert payload["critical"]["image"]["docker-manifest-digest"] == digest
        assert payload["critical"]["identity"]["docker-reference"] == f"{mini_project.registry}/{name}"
        assert payload["critical"]["type"] == "cosign container image signature"


def test_securesystemslib_and_openssl_verify_every_signature_with_the_projects_public_key(
        mini_project, published, release_key, tmp_path):
    for what, name, digest in artifacts(mini_project):
        assert third_party_verdicts(mini_project.registry, name, digest, release_key.public, tmp_path) == (True, True), what


def test_the_provenance_referrer_names_the_image_and_the_hashes_of_what_made_it(
        mini_project, published, release_key, tmp_path):
    Registry(mini_project.registry)
    manifest = json.loads(published.manifests["echo"].read_text())
    key = SSlibKey.from_crypto(serialization.load_pem_public_key(release_key.public.read_bytes()),
                               scheme="ecdsa-sha2-nistp256")
    root = mini_project.root
    compat = hashlib.sha256(resources.files("orchestrator").joinpath("data/compat.yaml").read_bytes()).hexdigest()
    for platform, entry in manifest["platforms"].items():
        for backend, spec in entry["backends"].items():
            _, name, digest = split_ref(spec["image"])
            # Reachable from the image digest alone: the referrers tag schema (this registry lacks the API).
            index = http_get(mini_project.registry, f"{name}/manifests/{referrers_tag(digest)}", Accept=OCI_INDEX).json()
            listed = [d for d in index["manifests"] if d["artifactType"] == provenance.ARTIFACT_TYPE]
            assert [d["digest"] for d in listed] == [spec["provenance"]]
            artifact = http_get(mini_project.registry, f"{name}/manifests/{spec['provenance']}",
                                Accept=OCI_MANIFEST).json()
            assert artifact["subject"]["digest"] == digest
            data = http_get(mini_project.registry, f"{name}/blobs/{artifact['layers'][0]['digest']}").content
            envelope = Envelope.from_dict(json.loads(data))
            assert envelope.payload_type == "application/vnd.in-toto+json"
            assert set(envelope.verify([key], 1)) == {key.keyid}  # securesystemslib checks the DSSE signature
            st = json.loads(envelope.payload)
            assert st["_type"] == "https://in-toto.io/Statement/v1"
            assert st["predicateType"] == "https://slsa.dev/provenance/v1"
            assert st["subject"] == [{"name": f"{mini_project.name}/echo", "digest": {"sha256": digest[7:]}}]
            build = st["predicate"]["buildDefinition"]
            deps = {d["name"]: d["digest"]["sha256"] for d in build["resolvedDependencies"]}
            arch = platform.split("/")[1]
            for rel in ("project.yaml", "locks/base.json", f"locks/{backend}-{arch}/service-echo.txt",
                        f"locks/apt-{arch}/system.txt", f"locks/apt-{arch}/service-echo.txt"):
                assert deps[rel] == hashlib.sha256((root / rel).read_bytes()).hexdigest(), (platform, backend, rel)
            if backend != "cpu":  # a CUDA service names its CUDA-libs lock too
                assert deps[f"locks/{backend}-{arch}/cuda-libs.txt"] == \
                    hashlib.sha256((root / f"locks/{backend}-{arch}/cuda-libs.txt").read_bytes()).hexdigest()
            assert deps["orchestrator/data/compat.yaml"] == compat and deps["base"]
            ext = build["externalParameters"]
            assert (ext["image"], ext["backend"], ext["platform"]) == ("echo", backend, platform)
            assert build["internalParameters"]["codec"] == codec(mini_project.compression).key
            assert build["internalParameters"]["engine"]  # the engine that built the platform
            run = st["predicate"]["runDetails"]
            assert run["builder"]["version"]["orchestrator"] == __version__
            assert {"invocationId", "startedOn", "finishedOn"} <= set(run["metadata"])
    # `invoke provenance` prints the statement, checked against its subject.
    proc = cli(mini_project, "provenance", "--service", "echo", "--backend", "cuda13", "--platform", "linux/arm64")
    assert proc.returncode == 0, proc.stderr
    spec = manifest["platforms"]["linux/arm64"]["backends"]["cuda13"]
    assert json.loads(proc.stdout)["subject"][0]["digest"]["sha256"] == spec["image"].split("@sha256:")[1]
    assert f"provenance of {spec['image']}" in proc.stderr and "keys/release.pub" in proc.stderr


def test_select_and_run_accept_the_signed_release(mini_project, published):
    proc = cli(mini_project, "select", "--service", "echo", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["verified"] is True, proc.stderr
    proc = cli(mini_project, "run", "--service", "echo", "--backend", "cpu")
    try:
        assert proc.returncode == 0, proc.stderr
        assert "echo serving on cpu" in proc.stdout
    finally:
        subprocess.run(["docker", "rm", "-f", f"orch-{mini_project.name}-echo"], capture_output=True)


def test_a_second_publish_with_nothing_changed_signs_nothing_even_with_another_trusted_key(mini_project, published):
    reg = Registry(mini_project.registry)
    before = {(n, d): reg.get_manifest(n, signing.signature_tag(d)).digest for _, n, d in artifacts(mini_project)}
    again = flow.publish(mini_project, log=lambda *_: None)  # no key given: this machine's, trusted for loopback
    assert (again.uploaded_bytes, again.signatures) == (0, 0)
    assert {(n, d): reg.get_manifest(n, signing.signature_tag(d)).digest for _, n, d in artifacts(mini_project)} == before


# -- tampering: hosts refuse, and so do verifiers nobody here wrote ----------------------------

def cpu_image(project) -> tuple[str, str]:
    manifest = backends.fetch_manifest(f"{project.repository('echo')}:{TAG}")
    _, name, digest = split_ref(manifest["platforms"]["linux/amd64"]["backends"]["cpu"]["image"])
    return name, digest


def both_refuse(project, release_key, tmp_path, name, digest, *fragments) -> None:
    assert third_party_verdicts(project.registry, name, digest, release_key.public, tmp_path) == (False, False)
    for task in ("select", "run"):
        refused(cli(project, task, "--service", "echo"), *fragments)


def test_an_unsigned_image_is_refused(mini_project, published, release_key, tmp_path):
    reg = Registry(mini_project.registry)
    name, digest = cpu_image(mini_project)
    with signature_replaced(reg, name, digest, None):
        both_refuse(mini_project, release_key, tmp_path, name, digest,
                    f"the cpu image for linux/amd64 {mini_project.registry}/{name}@{digest[:19]}",
                    "it has no signature")
    assert cli(mini_project, "select", "--service", "echo").returncode == 0  # and back to normal


def test_an_image_signed_by_another_key_is_refused(mini_project, published, release_key, other_key, tmp_path):
    reg = Registry(mini_project.registry)
    name, digest = cpu_image(mini_project)
    forged = signed_by(reg, name, f"{mini_project.registry}/{name}", digest, other_key)
    with signature_replaced(reg, name, digest, forged):
        both_refuse(mini_project, release_key, tmp_path, name, digest, "the cpu image for linux/amd64",
                    f"signed only by a key this project does not trust (keyid {other_key.public.short}")


def test_a_signature_moved_from_another_digest_is_refused(mini_project, published, release_key, tmp_path):
    reg = Registry(mini_project.registry)
    name, digest = cpu_image(mini_project)
    manifest = backends.fetch_manifest(f"{mini_project.repository('echo')}:{TAG}")
    other = split_ref(manifest["platforms"]["linux/amd64"]["backends"]["cuda13"]["image"])[2]
    moved = reg.get_manifest(name, signing.signature_tag(other)).body  # a valid signature, of the cuda13 image
    with signature_replaced(reg, name, digest, moved):
        both_refuse(mini_project, release_key, tmp_path, name, digest, "the cpu image for linux/amd64",
                    f"is for {other}, not this digest")


def test_a_payload_edited_after_signing_is_refused(mini_project, published, release_key, tmp_path):
    reg = Registry(mini_project.registry)
    name, digest = cpu_image(mini_project)
    with signature_replaced(reg, name, digest, edited(reg, name, digest)):
        both_refuse(mini_project, release_key, tmp_path, name, digest, "the cpu image for linux/amd64",
                    "does not match its payload")


def test_an_unsigned_backend_manifest_or_index_is_refused(mini_project, published, other_key):
    reg = Registry(mini_project.registry)
    name = f"{mini_project.name}/echo"
    artifact = reg.get_manifest(name, TAG).digest
    with signature_replaced(reg, name, artifact, None):
        for task in ("select", "run"):
            refused(cli(mini_project, task, "--service", "echo"),
                    f"the backend manifest {mini_project.registry}/{name}@{artifact[:19]}", "it has no signature")
    manifest = backends.fetch_manifest(f"{mini_project.repository('echo')}:{TAG}")
    index = split_ref(manifest["platforms"]["linux/amd64"]["backends"]["cpu"]["index"])[2]
    forged = signed_by(reg, name, mini_project.repository("echo"), index, other_key)
    with signature_replaced(reg, name, index, forged):
        for task in ("select", "run"):
            refused(cli(mini_project, task, "--service", "echo"), f"the cpu index {mini_project.registry}/{name}",
                    "does not trust")
    proc = cli(mini_project, "select", "--service", "echo", "--no-verify")  # --no-verify stays, and says so
    assert proc.returncode == 0 and "not verified against the registry" in proc.stdout


# -- a second release: unsigned, then signed; and nothing secret in either --------------------------

@pytest.fixture(scope="module")
def fresh(engine_ready, first_build, release_key, tmp_path_factory):
    """The mini fixture in a namespace of its own, published signed with the session key, its log kept."""
    project = ready_mini(tmp_path_factory.mktemp("fresh"), prefix="orch-sign", edit=trusting(release_key.public))
    logged: list[str] = []
    flow.publish(project, log=lambda *a: logged.append(" ".join(map(str, a))), smoke=False,
                 signer=signing.signer_from_environ(release_key.env))
    yield project, logged
    cleanup_namespace(project)


def test_nothing_of_the_private_key_is_in_any_artifact_or_log_line_of_a_signed_publish(fresh, release_key):
    from ..secrets_scan import private_key_needles, scan

    project, logged = fresh
    needles = private_key_needles(release_key.private.read_bytes())
    # Every tag: images, indexes, configs, layers, SBOMs, signatures, provenance (decoded), backend manifests.
    hits, blobs = scan(Registry(project.registry), [f"{project.name}/{r}" for r in ("cuda-libs", *project.services)],
                       needles)
    assert blobs > 40 and hits == []
    log = "\n".join(logged).encode()
    assert "signed with" in log.decode() and [label for label, needle in needles.items() if needle in log] == []


def test_an_unsigned_publish_is_recorded_and_hosts_refuse_to_run_it(fresh, release_key):
    project, _ = fresh
    reg = Registry(project.registry)
    name = f"{project.name}/echo"
    report = flow.publish(project, log=lambda *_: None, smoke=False, unsigned=True)
    try:
        assert report.signed is False and report.signatures == 0
        manifest, digest = backends.fetch_artifact(f"{project.repository('echo')}:{TAG}")
        assert manifest["signed"] is False
        assert reg.get_manifest(name, signing.signature_tag(digest)) is None  # nothing signed it
        for task in ("select", "run"):
            refused(cli(project, task, "--service", "echo"), f"the backend manifest {project.registry}/{name}",
                    "published unsigned (`invoke publish --unsigned`")
    finally:
        flow.publish(project, log=lambda *_: None, smoke=False, signer=signing.signer_from_environ(release_key.env))
    assert cli(project, "select", "--service", "echo").returncode == 0


# -- engine.gc keeps the signatures and provenance of what it keeps ---------------------------------------

def test_gc_deletes_an_images_signature_and_provenance_with_it_and_keeps_a_kept_images(
        private_registry, release_key):  # noqa: F811 - the fixture, imported
    p = Pusher(private_registry)
    signer = signing.signer_from_environ(release_key.env)
    trusted = (signer.public,)
    old = p.image("p/svc", "0.1.0-cpu-" + "a" * 12, [("base", 1024), ("app-a", 2048)], 3)
    new = p.image("p/svc", "0.1.0-cpu-" + "b" * 12, [("base", 1024), ("app-b", 2048)], 1)
    for image in (old, new):
        signing.sign(p.reg, "p/svc", f"{p.reg.host}/p/svc", image["digest"], signer, trusted)
        statement = provenance.statement("p/svc", image["digest"], {})
        image["provenance"], _ = provenance.push(p.reg, "p/svc", image["digest"], 100,
                                                 provenance.envelope(statement, signer))
    report = flow.gc(private_registry.host, keep=1, log=lambda *_: None, config=private_registry.config,
                     state=private_registry.state)
    assert {(d.repository, t) for d in report.plan.delete for t in d.tags} == {
        ("p/svc", "0.1.0-cpu-" + "a" * 12), ("p/svc", signing.signature_tag(old["digest"])),
        ("p/svc", referrers_tag(old["digest"]))}
    reg = Registry(private_registry.host)
    assert reg.get_manifest("p/svc", signing.signature_tag(old["digest"])) is None
    assert reg.get_manifest("p/svc", old["provenance"]) is None
    assert signing.verify(reg, "p/svc", new["digest"], trusted).ok
    assert provenance.fetch(reg, "p/svc", new["digest"], trusted).digest == new["provenance"]
