"""Signatures in cosign's format, provenance in DSSE envelopes, and the keys behind them.

What cosign, openssl and securesystemslib read is checked byte for byte
(payload, config, manifest) and by those verifiers themselves; the
registry side runs against the fake registry of test_registry_transport
(no referrers API, like Debian's docker-registry 2.8).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from securesystemslib.dsse import Envelope
from securesystemslib.signer import Signature, SSlibKey

from orchestrator import flow
from orchestrator.common.errors import SpecError, UserError
from orchestrator.oci import provenance, signing
from orchestrator.oci.registry import OCI_MANIFEST, Registry, sha256_digest
from orchestrator.project import spec
from orchestrator.release import retention

from ..conftest import FIXTURES
from .test_registry_transport import fake, isolated  # noqa: F401 - fixtures

IMAGE = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
REPO = "127.0.0.1:5000/morgan/tts"


@pytest.fixture
def keys(tmp_path):
    """Two key pairs: the release key and someone else's."""
    signing.write_key_pair(tmp_path / "release.key", tmp_path / "release.pub")
    signing.write_key_pair(tmp_path / "other.key", tmp_path / "other.pub")
    release = signing.signer_from_file(tmp_path / "release.key")
    other = signing.signer_from_file(tmp_path / "other.key")
    return release, other


def sslib_key(public: signing.PublicKey) -> SSlibKey:
    return SSlibKey.from_crypto(serialization.load_pem_public_key(public.pem), scheme="ecdsa-sha2-nistp256")


# -- keys -----------------------------------------------------------------------------

def test_a_key_pair_is_a_0600_pkcs8_private_key_and_a_pkix_public_key_and_is_never_overwritten(tmp_path):
    public = signing.write_key_pair(tmp_path / "k" / "release.key", tmp_path / "k" / "release.pub")
    private_file, public_file = tmp_path / "k" / "release.key", tmp_path / "k" / "release.pub"
    assert stat.S_IMODE(private_file.stat().st_mode) == 0o600
    assert private_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_file.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----") and public.pem == public_file.read_bytes()
    key = serialization.load_pem_public_key(public_file.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    before = private_file.read_bytes()
    with pytest.raises(UserError, match="never overwritten"):
        signing.write_key_pair(private_file, tmp_path / "k" / "new.pub")
    with pytest.raises(UserError, match="never overwritten"):
        signing.write_key_pair(tmp_path / "k" / "new.key", public_file)
    assert private_file.read_bytes() == before and not (tmp_path / "k" / "new.key").exists()


def test_the_keyid_is_securesystemslibs_default_keyid(keys):
    release, _ = keys
    assert release.public.keyid == sslib_key(release.public).keyid


def test_a_signer_never_shows_its_private_key(keys, tmp_path):
    release, _ = keys
    pem = (tmp_path / "release.key").read_text()
    body = "".join(pem.splitlines()[1:-1])
    for text in (repr(release), str(release), str(release.public)):
        assert body[10:40] not in text and "PRIVATE" not in text
    with pytest.raises(TypeError):
        __import__("pickle").dumps(release)


def test_the_private_key_comes_from_the_environment_as_ci_secrets_give_it(keys, tmp_path):
    release, _ = keys
    pem = (tmp_path / "release.key").read_text()
    assert signing.signer_from_environ({}) is None
    from_pem = signing.signer_from_environ({signing.ENV_KEY: pem})
    from_file = signing.signer_from_environ({signing.ENV_KEY_FILE: str(tmp_path / "release.key")})
    assert from_pem.public.keyid == from_file.public.keyid == release.public.keyid
    with pytest.raises(UserError, match="both"):
        signing.signer_from_environ({signing.ENV_KEY: pem, signing.ENV_KEY_FILE: "x"})


def test_a_bad_private_key_is_named_by_its_source_and_never_echoed(tmp_path):
    secret = "not-a-key-" + "s3cr3t" * 5
    with pytest.raises(UserError) as e:
        signing.signer_from_environ({signing.ENV_KEY: secret})
    assert "$ORCH_SIGNING_KEY" in str(e.value) and secret not in str(e.value) and e.value.exit_code == 2
    with pytest.raises(UserError, match="cannot read the private key"):
        signing.signer_from_environ({signing.ENV_KEY_FILE: str(tmp_path / "missing.key")})
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    with pytest.raises(UserError, match="not ECDSA P-256"):
        signing.signer_from_environ({signing.ENV_KEY: pem})


def test_this_machine_makes_its_key_once_on_first_use_even_when_two_ask_at_once(tmp_path):
    assert signing.machine_public_key(tmp_path) is None
    made: list = []
    threads = [threading.Thread(target=lambda: made.append(signing.machine_signer(tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({s.public.keyid for s in made}) == 1
    private, _ = signing.machine_key_paths(tmp_path)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    assert signing.machine_public_key(tmp_path).keyid == made[0].public.keyid
    assert signing.machine_signer(tmp_path).public.keyid == made[0].public.keyid  # reused, not remade


# -- cosign's layout, byte for byte ------------------------------------------------------

def test_the_payload_is_cosigns_simple_signing_json_byte_for_byte():
    assert signing.payload(REPO, IMAGE) == (
        b'{"critical":{"identity":{"docker-reference":"127.0.0.1:5000/morgan/tts"},"image":{"docker-manifest-digest":"'
        + IMAGE.encode() + b'"},"type":"cosign container image signature"},"optional":null}')
    assert signing.payload(REPO, IMAGE, "k1").endswith(b'"optional":{"io.orchestrator.keyid":"k1"}}')


def test_the_signature_manifest_and_config_are_what_cosign_2_writes(keys):
    release, _ = keys
    data = signing.payload(REPO, IMAGE)
    sig = release.sign(data)
    manifest, config = signing.signature_manifest([signing.layer(data, sig)])
    digest = sha256_digest(data)
    # go-containerregistry's empty image plus one layer: 233 bytes with one diff_id, as cosign's .sig configs are.
    assert config == (b'{"architecture":"","created":"0001-01-01T00:00:00Z","history":[{"created":"0001-01-01T00:00:00Z"}],'
                      b'"os":"","rootfs":{"type":"layers","diff_ids":["' + digest.encode() + b'"]},"config":{}}')
    assert len(config) == 233
    assert manifest == (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":'
        b'"application/vnd.oci.image.config.v1+json","size":233,"digest":"' + sha256_digest(config).encode() + b'"},'
        b'"layers":[{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","size":' + str(len(data)).encode()
        + b',"digest":"' + digest.encode() + b'","annotations":{"dev.cosignproject.cosign/signature":"'
        + base64.b64encode(sig) + b'"}}]}')
    assert signing.signature_tag(IMAGE) == "sha256-" + "a" * 64 + ".sig"


@pytest.mark.skipif(not shutil.which("openssl"), reason="the openssl CLI is not installed (ci/setup.sh installs it)")
def test_openssl_and_securesystemslib_verify_a_payload_signature_and_refuse_an_edited_one(keys, tmp_path):
    release, other = keys
    data = signing.payload(REPO, IMAGE, release.public.keyid)
    (tmp_path / "payload").write_bytes(data)
    (tmp_path / "edited").write_bytes(data.replace(b"a" * 64, b"b" * 64))
    (tmp_path / "sig.der").write_bytes(release.sign(data))
    (tmp_path / "other.der").write_bytes(other.sign(data))

    def openssl(payload: str, sig: str) -> int:
        return subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "release.pub"), "-signature",
                               str(tmp_path / sig), str(tmp_path / payload)], capture_output=True).returncode

    assert openssl("payload", "sig.der") == 0
    assert openssl("edited", "sig.der") != 0 and openssl("payload", "other.der") != 0
    key = sslib_key(release.public)
    key.verify_signature(Signature(key.keyid, (tmp_path / "sig.der").read_bytes().hex()), data)
    for payload, sig in ((data.replace(b"a" * 64, b"b" * 64), "sig.der"), (data, "other.der")):
        with pytest.raises(Exception, match="(?i)verif|fail"):
            key.verify_signature(Signature(key.keyid, (tmp_path / sig).read_bytes().hex()), payload)


# -- verdicts ---------------------------------------------------------------------------------

def signed(signer, digest=IMAGE, edit=None):
    data = signing.payload(REPO, digest, signer.public.keyid)
    desc = signing.layer(data, signer.sign(data))
    return desc, (edit(data) if edit else data)


def test_a_signature_by_a_trusted_key_over_this_digest_verifies(keys):
    release, other = keys
    verdict = signing.judge([signed(other), signed(release)], IMAGE, (release.public,))
    assert verdict.ok and verdict.key.keyid == release.public.keyid


def test_each_way_a_signature_fails_says_why(keys):
    release, other = keys
    trusted = (release.public,)
    assert signing.judge([], IMAGE, trusted).reason == "it has no signature"
    assert "does not trust (keyid " + other.public.short in signing.judge([signed(other)], IMAGE, trusted).reason
    moved = signing.judge([signed(release, digest=OTHER)], IMAGE, trusted).reason
    assert f"is for {OTHER}, not this digest" in moved
    edited = signing.judge([signed(release, edit=lambda d: d.replace(b'"optional":{', b'"optional": {'))], IMAGE, trusted)
    assert "altered after signing" in edited.reason
    junk = signing.judge([signed(release, edit=lambda d: b"not json")], IMAGE, trusted)
    assert "altered after signing" in junk.reason
    assert not any(v.ok for v in (edited, junk))


# -- in a registry ---------------------------------------------------------------------------

def test_signing_pushes_cosigns_layout_once_and_a_second_signer_appends(fake, keys):
    release, other = keys
    reg = Registry(fake().host)
    assert not signing.verify(reg, "morgan/tts", IMAGE, (release.public,)).ok
    sent = signing.sign(reg, "morgan/tts", REPO, IMAGE, release, (release.public,))
    assert sent > 0
    m = reg.get_manifest("morgan/tts", signing.signature_tag(IMAGE))
    assert m.media_type == OCI_MANIFEST and len(m.json["layers"]) == 1
    assert signing.verify(reg, "morgan/tts", IMAGE, (release.public,)).ok
    # ECDSA is randomized: signing again would change the manifest; a valid signature is left alone.
    assert signing.sign(reg, "morgan/tts", REPO, IMAGE, release, (release.public,)) == 0
    assert reg.get_manifest("morgan/tts", signing.signature_tag(IMAGE)).digest == m.digest
    # Someone else signs too: their layer is appended, ours stays, each verifies for its own key.
    assert signing.sign(reg, "morgan/tts", REPO, IMAGE, other, (other.public,)) > 0
    both = reg.get_manifest("morgan/tts", signing.signature_tag(IMAGE)).json
    assert len(both["layers"]) == 2
    config = json.loads(reg.get_blob("morgan/tts", both["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == [d["digest"] for d in both["layers"]] and len(config["history"]) == 2
    assert signing.verify(reg, "morgan/tts", IMAGE, (release.public,)).ok
    assert signing.verify(reg, "morgan/tts", IMAGE, (other.public,)).ok


def test_provenance_is_a_signed_dsse_envelope_securesystemslib_verifies_attached_once(fake, keys):
    release, other = keys
    reg = Registry(fake().host)
    body = provenance.predicate({"image": "tts"}, {}, [provenance.dependency("project.yaml", "c" * 64)],
                                {"orchestrator": "0"}, {"invocationId": "urn:uuid:x"})
    statement = provenance.statement("morgan/tts", IMAGE, body)
    env = provenance.envelope(statement, release)
    envelope = Envelope.from_dict(json.loads(env))
    assert envelope.payload_type == "application/vnd.in-toto+json" and envelope.payload == statement
    assert set(envelope.verify([sslib_key(release.public)], 1)) == {release.public.keyid}
    with pytest.raises(Exception, match="(?i)threshold|verif"):
        envelope.verify([sslib_key(other.public)], 1)
    st = json.loads(statement)
    assert st["_type"] == "https://in-toto.io/Statement/v1" and st["predicateType"] == "https://slsa.dev/provenance/v1"
    assert st["subject"] == [{"name": "morgan/tts", "digest": {"sha256": "a" * 64}}]

    digest, sent = provenance.push(reg, "morgan/tts", IMAGE, 1234, env)
    assert sent > 0 and provenance.push(reg, "morgan/tts", IMAGE, 1234, env) == (digest, 0)
    found = provenance.fetch(reg, "morgan/tts", IMAGE, (release.public,))
    assert (found.digest, found.statement, found.envelope) == (digest, st, env)
    assert provenance.find(reg, "morgan/tts", IMAGE, (other.public,))[0] is None
    assert "not signed by a key this project trusts" in provenance.find(reg, "morgan/tts", IMAGE, (other.public,))[1]
    with pytest.raises(UserError, match="no provenance attached"):
        provenance.fetch(reg, "morgan/tts", OTHER, (release.public,))


def test_a_provenance_envelope_for_another_subject_or_edited_is_refused(keys):
    release, _ = keys
    statement = provenance.statement("morgan/tts", OTHER, {})
    env = provenance.envelope(statement, release)
    assert "its subject is sha256:" + "b" * 64 in provenance.open_envelope(env, IMAGE, (release.public,)).reason
    edited = json.loads(env)
    edited["payload"] = base64.b64encode(statement.replace(b"b" * 64, b"a" * 64)).decode()
    opened = provenance.open_envelope(json.dumps(edited).encode(), IMAGE, (release.public,))
    assert opened.statement is None and "altered after signing" in opened.reason


# -- the project file and who signs a publish ------------------------------------------------------

def mini(tmp_path: Path, trust: str | None = None, files: dict[str, bytes] | None = None) -> Path:
    work = tmp_path / "mini"
    shutil.copytree(FIXTURES / "mini", work)
    for rel, data in (files or {}).items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(data)
    if trust is not None:
        pf = work / "project.yaml"
        pf.write_text(pf.read_text() + trust)
    return work / "project.yaml"


def test_trust_keys_are_read_from_the_project_file(tmp_path, keys):
    release, other = keys
    pub = (tmp_path / "release.pub").read_bytes()
    project = spec.load(mini(tmp_path, "trust:\n  keys: [keys/release.pub, keys/other.pub]\n",
                             {"keys/release.pub": pub, "keys/other.pub": (tmp_path / "other.pub").read_bytes()}))
    assert [k.keyid for k in project.trust] == [release.public.keyid, other.public.keyid]
    assert spec.load(FIXTURES / "mini" / "project.yaml").trust == ()  # the fixture needs no key committed


@pytest.mark.parametrize("files, key, message", [
    ({}, "trust.keys[0]", "does not exist"),
    ({"keys/release.pub": b"hello\n"}, "trust.keys[0]", "not a PEM public key"),
    ({"keys/release.pub": "private"}, "trust.keys[0]", "holds a private key; commit only the public key"),
    ({"keys/release.pub": "rsa"}, "trust.keys[0]", "not ECDSA P-256"),
])
def test_a_trust_key_that_is_missing_or_not_a_p256_public_key_is_a_spec_error(tmp_path, keys, files, key, message):
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    stand_in = {"private": (tmp_path / "release.key").read_bytes(), "rsa": rsa_pub}
    files = {k: stand_in.get(v, v) if isinstance(v, str) else v for k, v in files.items()}
    with pytest.raises(SpecError) as e:
        spec.load(mini(tmp_path, "trust:\n  keys: [keys/release.pub]\n", files))
    assert e.value.key == key and message in str(e.value) and e.value.hint


def test_publish_signs_with_the_key_given_or_this_machines_for_a_loopback_registry(tmp_path, keys, monkeypatch):
    release, other = keys
    monkeypatch.delenv("ORCH_REGISTRY", raising=False)
    pub = (tmp_path / "release.pub").read_bytes()
    project = spec.load(mini(tmp_path, "trust:\n  keys: [keys/release.pub]\n", {"keys/release.pub": pub}))
    state = tmp_path / "state"
    chosen = flow.release_signing(project, release, False, log=lambda *_: None, state=state)
    assert chosen.signer is release and [k.keyid for k in chosen.trusted] == [release.public.keyid]
    machine = flow.release_signing(project, None, False, log=lambda *_: None, state=state)  # loopback: made here
    assert machine.signer.public.keyid == signing.machine_public_key(state).keyid
    assert {k.keyid for k in flow.trusted_keys(project, state)} == {release.public.keyid, machine.signer.public.keyid}
    with pytest.raises(UserError, match="is not one project.yaml trusts") as e:
        flow.release_signing(project, other, False, log=lambda *_: None, state=state)
    assert e.value.exit_code == 2
    said: list[str] = []
    assert flow.release_signing(project, None, True, log=said.append, state=state) is None
    assert "--unsigned" in said[0]


def test_publish_to_another_registry_without_a_key_is_refused_saying_how_to_give_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_REGISTRY", "registry.example.com/acme")
    project = spec.load(mini(tmp_path))
    with pytest.raises(UserError) as e:
        flow.release_signing(project, None, False, log=lambda *_: None, state=tmp_path / "state")
    assert "no signing key to publish to registry.example.com/acme" in e.value.message
    assert "ORCH_SIGNING_KEY" in e.value.hint and "--unsigned" in e.value.hint
    assert not (tmp_path / "state" / "signing").exists()  # no machine key for a remote registry
    assert flow.trusted_keys(project, tmp_path / "state") == ()


# -- retention ---------------------------------------------------------------------------------

def test_gc_deletes_an_images_signature_and_provenance_with_it_and_keeps_a_kept_images():
    def d(name: str) -> str:
        return "sha256:" + __import__("hashlib").sha256(name.encode()).hexdigest()

    manifests, tags = {}, []
    for n, (name, pushed) in enumerate((("old", 1.0), ("new", 2.0))):
        image = d(name)
        manifests[image] = retention.ManifestInfo(image, (d("base"), d(name + " app")), (), (), "linux/amd64", True)
        tags.append(retention.Tag("p/svc", f"0.1.0-cpu-{n:012x}", image, pushed))
        sig, prov, referrers = d("sig " + name), d("provenance " + name), d("referrers " + name)
        manifests[sig] = retention.ManifestInfo(sig, (d("payload " + name),))
        manifests[prov] = retention.ManifestInfo(prov)
        manifests[referrers] = retention.ManifestInfo(referrers, children=(prov,))
        tags += [retention.Tag("p/svc", f"sha256-{image[7:]}.sig", sig, pushed),
                 retention.Tag("p/svc", f"sha256-{image[7:]}", referrers, pushed)]
    p = retention.plan(retention.Inventory(tuple(tags), manifests), keep=1)
    gone = {x.digest for x in p.delete}
    assert gone == {d("old"), d("sig old"), d("referrers old"), d("provenance old")}
    assert {(x.repository, t) for x in p.delete for t in x.tags} == {
        ("p/svc", "0.1.0-cpu-000000000000"), ("p/svc", f"sha256-{d('old')[7:]}.sig"), ("p/svc", f"sha256-{d('old')[7:]}")}


def test_nothing_of_the_private_key_is_left_in_a_temp_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    signing.write_key_pair(tmp_path / "k.key", tmp_path / "k.pub")
    signing.machine_signer(tmp_path / "state")
    assert os.listdir(tmp_path / "tmp") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.pub", "state", "tmp"]
    assert sorted(p.name for p in (tmp_path / "state" / "signing").iterdir()) == [
        ".machine-key.lock", "machine.key", "machine.pub"]


def test_provenance_names_the_tools_commit_read_from_its_checkout_without_running_git(tmp_path):
    commit, other = "1" * 40, "2" * 40
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "refs" / "heads" / "main").write_text(commit + "\n")
    assert flow.tool_commit(repo) == commit
    (repo / ".git" / "refs" / "heads" / "main").unlink()
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{other} refs/heads/main\n")
    assert flow.tool_commit(repo) == other
    # A worktree: .git is a file naming its git dir, whose commondir holds the shared refs.
    wt = tmp_path / "wt"
    gitdir = repo / ".git" / "worktrees" / "wt"
    gitdir.mkdir(parents=True)
    (wt).mkdir()
    (wt / ".git").write_text(f"gitdir: {gitdir}\n")
    (gitdir / "commondir").write_text("../..\n")
    (gitdir / "HEAD").write_text("ref: refs/heads/main\n")
    assert flow.tool_commit(wt) == other
    (gitdir / "HEAD").write_text(commit + "\n")  # detached
    assert flow.tool_commit(wt) == commit
    assert flow.tool_commit(tmp_path / "not-a-checkout") is None


def test_invoke_keys_writes_a_pair_for_ci_and_the_project_and_says_how_to_trust_it(tmp_path):
    import sys

    project = mini(tmp_path)
    proc = subprocess.run([str(Path(sys.executable).parent / "invoke"), "--search-root", str(FIXTURES.parents[1]),
                           "keys", "--project", str(project)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    keys_dir = project.parent / "keys"
    private, public = keys_dir / "release.key", keys_dir / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.read_text().startswith("-----BEGIN PUBLIC KEY")
    assert "*.key" in (keys_dir / ".gitignore").read_text()  # never committed by accident
    out = proc.stdout + proc.stderr
    assert "keys: [keys/release.pub]" in out and "ORCH_SIGNING_KEY" in out
    body = "".join(private.read_text().splitlines()[1:-1])
    assert body[:40] not in out and "PRIVATE KEY" not in out
    # The project now trusts it once listed, and the key signs for it.
    project.write_text(project.read_text() + "trust:\n  keys: [keys/release.pub]\n")
    loaded = spec.load(project)
    assert [k.keyid for k in loaded.trust] == [signing.signer_from_file(private).public.keyid]
