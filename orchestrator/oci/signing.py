"""Signatures that tools nobody here wrote verify: cosign's format, ECDSA P-256 keys.

For a manifest digest `sha256:<hex>` in repository R, the signature is an
OCI image manifest tagged `sha256-<hex>.sig` in R (cosign's tag scheme):
each layer is a simple-signing payload (media type
`application/vnd.dev.cosign.simplesigning.v1+json`)

    {"critical": {"identity": {"docker-reference": R},
                  "image": {"docker-manifest-digest": "sha256:<hex>"},
                  "type": "cosign container image signature"},
     "optional": {"io.orchestrator.keyid": KEYID}}

whose annotation `dev.cosignproject.cosign/signature` holds the base64 DER
ECDSA P-256 / SHA-256 signature over exactly the payload bytes. The
config blob and the JSON are byte for byte what cosign 2.x writes (through
go-containerregistry: an empty image's config plus one diff_id and one
empty history entry per layer), so `cosign verify --key PUB
--insecure-ignore-tlog`, `openssl dgst -sha256 -verify PUB -signature SIG
PAYLOAD` and securesystemslib accept them. Several signers append layers
to one manifest, as cosign does; an artifact is verified when any layer
carries a signature by a trusted key over a payload naming that digest.

The keyid in `optional` is a hint for messages only (which key says it
signed); trust comes from the signature alone. Keys: public keys are PEM
(PKIX) files a project lists under `trust:`; a private key comes from
$ORCH_SIGNING_KEY (the PEM, as CI secrets hold it) or
$ORCH_SIGNING_KEY_FILE (a path), or, for a registry on this machine's
loopback, is this machine's own key, made on first use under the state
directory. A Signer never shows its key: not in repr, str, errors or logs.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from orchestrator.common.errors import UserError
from orchestrator.common.files import held
from orchestrator.oci.registry import OCI_MANIFEST, Registry, sha256_digest

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
KEYID_HINT = "io.orchestrator.keyid"
SCHEME = "ecdsa-sha2-nistp256"  # securesystemslib's name for it
ENV_KEY = "ORCH_SIGNING_KEY"
ENV_KEY_FILE = "ORCH_SIGNING_KEY_FILE"
MACHINE_KEY_DIR = "signing"  # under the state directory: machine.key (0600), machine.pub
GIVE_A_KEY = (f"give the private key as ${ENV_KEY} (the PEM) or ${ENV_KEY_FILE} (a path); "
              "`invoke keys` makes a pair")
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time, as go-containerregistry writes it


# --- keys ------------------------------------------------------------------------

@dataclass(frozen=True)
class PublicKey:
    """An ECDSA P-256 public key and where it came from (a file, this machine)."""

    pem: bytes  # PKIX (SubjectPublicKeyInfo), as `openssl ec -pubout` and cosign write it
    source: str

    @property
    def keyid(self) -> str:
        """securesystemslib's default keyid: sha256 of the canonical JSON of the key (DSSE envelopes carry it)."""
        pem = self.pem.decode().replace("\\", "\\\\").replace('"', '\\"')
        canonical = f'{{"keytype":"ecdsa","keyval":{{"public":"{pem}"}},"scheme":"{SCHEME}"}}'
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def short(self) -> str:
        return self.keyid[:12]

    def verify(self, signature: bytes, data: bytes) -> bool:
        key = _loaded(self.pem)
        try:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, ValueError):
            return False

    def __str__(self) -> str:
        return f"{self.source} (keyid {self.short})"


@functools.lru_cache(maxsize=64)
def _loaded(pem: bytes) -> ec.EllipticCurvePublicKey:
    return serialization.load_pem_public_key(pem)


class Signer:
    """A private key held in memory only. Nothing here shows it: not repr, str, nor any error."""

    __slots__ = ("_key", "public")

    def __init__(self, key: ec.EllipticCurvePrivateKey, source: str):
        self._key = key
        self.public = PublicKey(_public_pem(key.public_key()), source)

    def sign(self, data: bytes) -> bytes:
        """The DER ECDSA P-256 / SHA-256 signature over data."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def __repr__(self) -> str:
        return f"Signer({self.public})"

    __str__ = __repr__

    def __reduce__(self):  # a private key is never pickled (into a process pool, a cache, a log)
        raise TypeError("a Signer holds a private key and is not pickled")


def _public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_problem(data: bytes) -> str | None:
    """Why data is not a PEM ECDSA P-256 public key, or None."""
    if b"PRIVATE KEY" in data:
        return "it holds a private key; commit only the public key (`invoke keys` writes both, *.pub is the public one)"
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "it is not a PEM public key (-----BEGIN PUBLIC KEY-----)"
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return f"it is a {type(key).__name__.lstrip('_')} key, not ECDSA P-256 (the curve cosign and this tool sign with)"
    return None


def load_public_key(data: bytes, source: str) -> PublicKey:
    if why := public_key_problem(data):
        raise UserError(f"{source}: {why}", "make a key pair with `invoke keys` and point trust.keys at its .pub file")
    return PublicKey(_public_pem(serialization.load_pem_public_key(data)), source)


def load_private_key(data: bytes, source: str) -> Signer:
    """A Signer from PEM bytes (PKCS#8 or SEC1, unencrypted). Errors name the source, never the content."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UserError(f"{source}: the private key is encrypted; this tool reads unencrypted PEM keys",
                        "decrypt it (`openssl pkey -in KEY -out KEY.pem`) and keep it as a CI secret") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UserError(f"{source} does not hold a PEM private key (-----BEGIN PRIVATE KEY-----)", GIVE_A_KEY) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UserError(f"{source}: the private key is not ECDSA P-256", "make a key pair with `invoke keys`")
    return Signer(key, source)


def signer_from_environ(environ) -> Signer | None:
    """The private key CI gives: $ORCH_SIGNING_KEY (the PEM itself) or $ORCH_SIGNING_KEY_FILE (a path); None if neither."""
    pem, path = environ.get(ENV_KEY), environ.get(ENV_KEY_FILE)
    if pem and path:
        raise UserError(f"both ${ENV_KEY} and ${ENV_KEY_FILE} are set", "set one of them")
    if pem:
        return load_private_key(pem.encode(), f"${ENV_KEY}")
    if path:
        return signer_from_file(Path(path), f"${ENV_KEY_FILE} ({path})")
    return None


def signer_from_file(path: Path, source: str | None = None) -> Signer:
    source = source or str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{source}: cannot read the private key ({e.strerror})", GIVE_A_KEY) from None
    return load_private_key(data, source)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with its final mode from the start (no temp file, no moment readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_key_pair(private_path: Path, public_path: Path) -> PublicKey:
    """A new ECDSA P-256 pair: the private key (PKCS#8 PEM, mode 0600) and the public key (PKIX PEM).

    Refuses to overwrite either file: a key that signed releases is never replaced by accident.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    for p in (private_path, public_path):
        if p.exists():
            raise UserError(f"{p} exists; a key pair is never overwritten",
                            "pass other paths, or delete the old pair yourself if nothing it signed matters")
    key = ec.generate_private_key(ec.SECP256R1())
    for p in (private_path, public_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    _create(private_path, _private_pem(key), 0o600)
    try:
        _create(public_path, _public_pem(key.public_key()), 0o644)
    except BaseException:
        private_path.unlink()
        raise
    os.chmod(private_path, 0o600)  # whatever the umask
    return PublicKey(_public_pem(key.public_key()), str(public_path))


def machine_key_paths(state: Path) -> tuple[Path, Path]:
    d = Path(state) / MACHINE_KEY_DIR
    return d / "machine.key", d / "machine.pub"


def machine_public_key(state: Path) -> PublicKey | None:
    """This machine's public key, if it has made one (the hosts here trust it for loopback registries)."""
    _, public = machine_key_paths(state)
    try:
        return PublicKey(public.read_bytes(), "this machine's key")
    except OSError:
        return None


def machine_signer(state: Path) -> Signer:
    """This machine's signing key, made on first use (the embedded registry's releases need no key by hand)."""
    private, public = machine_key_paths(state)
    with held(private.with_name(".machine-key.lock")):  # two first publishes at once make one key
        if not private.exists():
            private.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(private.parent, 0o700)
            with contextlib.suppress(FileNotFoundError):
                public.unlink()  # a public key without its private half is of no use
            write_key_pair(private, public)
        signer = signer_from_file(private, "this machine's key")
    signer.public = PublicKey(signer.public.pem, "this machine's key")
    return signer


# --- the cosign layout (pure) -------------------------------------------------------

def signature_tag(digest: str) -> str:
    """cosign's tag for the signatures of digest: `sha256-<hex>.sig`."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}.sig"


def payload(repository: str, digest: str, keyid: str | None = None) -> bytes:
    """The simple-signing payload, as cosign's Go code marshals it (compact, struct order, sorted map keys)."""
    optional = {KEYID_HINT: keyid} if keyid else None
    body = {"critical": {"identity": {"docker-reference": repository},
                         "image": {"docker-manifest-digest": digest},
                         "type": SIGNATURE_TYPE},
            "optional": optional}
    return json.dumps(body, separators=(",", ":")).encode()


def layer(payload_bytes: bytes, signature: bytes) -> dict:
    """The manifest's descriptor of one signature: the payload blob, the signature as its annotation."""
    return {"mediaType": SIMPLESIGNING, "size": len(payload_bytes), "digest": sha256_digest(payload_bytes),
            "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()}}


def config_bytes(layer_digests: list[str]) -> bytes:
    """The config cosign 2.x writes: go-containerregistry's empty image with one diff_id and history entry per layer."""
    history = ",".join(f'{{"created":"{_ZERO_TIME}"}}' for _ in layer_digests)
    diff_ids = ",".join(f'"{d}"' for d in layer_digests)
    return (f'{{"architecture":"","created":"{_ZERO_TIME}","history":[{history}],"os":"",'
            f'"rootfs":{{"type":"layers","diff_ids":[{diff_ids}]}},"config":{{}}}}').encode()


def _descriptor_json(d: dict) -> dict:
    # go-containerregistry's Descriptor field order: mediaType, size, digest, ..., annotations.
    out = {"mediaType": d["mediaType"], "size": d["size"], "digest": d["digest"]}
    if d.get("annotations"):
        out["annotations"] = dict(sorted(d["annotations"].items()))
    return out


def signature_manifest(layers: list[dict]) -> tuple[bytes, bytes]:
    """(manifest, config) of a signature image holding these layers, byte for byte as cosign writes them."""
    config = config_bytes([d["digest"] for d in layers])
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "size": len(config), "digest": sha256_digest(config)},
            "layers": [_descriptor_json(d) for d in layers]}
    return json.dumps(body, separators=(",", ":")).encode(), config


# --- verdicts (pure) ---------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""  # why not, in words
    key: PublicKey | None = None  # the trusted key that signed (ok)


def _claims(payload_bytes: bytes) -> tuple[str | None, str | None]:
    """(the digest a payload says it signs, the keyid it names), None where unreadable."""
    try:
        body = json.loads(payload_bytes)
        digest = body["critical"]["image"]["docker-manifest-digest"]
        if body["critical"].get("type") != SIGNATURE_TYPE or not isinstance(digest, str):
            return None, None
        return digest, ((body.get("optional") or {}).get(KEYID_HINT) or None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, None


def judge(signatures: list[tuple[dict, bytes]], digest: str, trusted: tuple[PublicKey, ...]) -> Verdict:
    """Does any (layer descriptor, payload) sign digest with a trusted key? If none does, the likeliest why.

    In order of what it says about the registry: a valid signature over
    another digest (moved from another artifact), a payload a trusted key
    claims but whose signature fails (altered after signing), a signature
    by a key the project does not trust.
    """
    trusted_ids = {k.keyid: k for k in trusted}
    moved, altered, other = [], [], []
    for desc, data in signatures:
        if desc.get("mediaType") != SIMPLESIGNING:
            continue
        try:
            sig = base64.b64decode((desc.get("annotations") or {}).get(SIGNATURE_ANNOTATION) or "", validate=True)
        except (binascii.Error, ValueError):
            sig = b""
        claimed, keyid = _claims(data)
        key = next((k for k in trusted if sig and k.verify(sig, data)), None)
        if key is not None and claimed == digest:
            return Verdict(True, key=key)
        if key is not None:
            moved.append(claimed or "an unreadable payload")
        elif keyid in trusted_ids or claimed is None:
            altered.append(keyid)
        else:
            other.append(keyid)
    if moved:
        return Verdict(False, f"its signature (by a trusted key) is for {moved[0]}, not this digest: "
                              "a signature moved here from another artifact")
    if altered:
        return Verdict(False, "its signature does not match its payload: the payload or the signature was altered "
                              "after signing")
    if other:
        ids = ", ".join(sorted({(k or "unnamed")[:12] for k in other}))
        names = ", ".join(k.short for k in trusted)
        return Verdict(False, f"it is signed only by a key this project does not trust (keyid {ids}; trusted: {names})")
    return Verdict(False, "it has no signature")


# --- the registry -------------------------------------------------------------------------

def signatures(reg: Registry, name: str, digest: str) -> list[tuple[dict, bytes]] | None:
    """Every (layer descriptor, payload) of digest's signature manifest; None when there is none."""
    found = reg.get_manifest(name, signature_tag(digest))
    if found is None:
        return None
    try:
        layers = [d for d in found.json.get("layers") or [] if isinstance(d, dict)]
    except ValueError:
        return []
    return [(d, reg.get_blob(name, d["digest"])) for d in layers if d.get("mediaType") == SIMPLESIGNING
            and isinstance(d.get("digest"), str)]


def verify(reg: Registry, name: str, digest: str, trusted: tuple[PublicKey, ...]) -> Verdict:
    """The verdict on digest's signatures in repository name (every blob read is checked against its digest)."""
    found = signatures(reg, name, digest)
    if not found:
        return Verdict(False, f"it has no signature (no {signature_tag(digest)} in {reg.host}/{name})")
    return judge(found, digest, trusted)


def sign(reg: Registry, name: str, repository: str, digest: str, signer: Signer,
         trusted: tuple[PublicKey, ...]) -> int:
    """Sign digest unless a trusted key already has; returns bytes sent (0 when it was signed).

    ECDSA signatures are randomized, so signing again would change the
    signature manifest on every publish; a valid one is left as it is.
    Other layers (other signers' signatures) are kept, as cosign keeps them.
    """
    found = signatures(reg, name, digest) or []
    if found and judge(found, digest, trusted + (signer.public,)).ok:
        return 0
    data = payload(repository, digest, signer.public.keyid)
    layers = [d for d, _ in found] + [layer(data, signer.sign(data))]
    manifest, config = signature_manifest(layers)
    sent = reg.upload_blob(name, data)[1] + reg.upload_blob(name, config)[1]
    reg.put_manifest(name, signature_tag(digest), manifest, OCI_MANIFEST)
    return sent + len(manifest)
