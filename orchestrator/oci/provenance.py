"""Provenance: what made an image, signed, attached to it in the registry.

One in-toto Statement v1 per image manifest (its subject), with an SLSA
provenance v1 predicate: the project file's hash, every lock the image was
made from, the base pin, the compatibility data, the layer codec, the
tool's version and commit, and the engine that built the platform. Time
stamps live here (when the publish ran), never in the image.

The statement travels in a DSSE envelope (payloadType
`application/vnd.in-toto+json`), signed with the release key over DSSE's
pre-authentication encoding; the envelope's keyid is securesystemslib's
default keyid of the public key, so `Envelope.verify` there accepts it.
In the registry the envelope is the one layer of an OCI artifact whose
`subject` is the image manifest, found like the SBOM through the referrers
API or the referrers tag schema (orchestrator.oci.referrers).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from orchestrator.common.errors import UserError
from orchestrator.oci import referrers
from orchestrator.oci.registry import EMPTY_JSON, OCI_EMPTY, OCI_MANIFEST, Registry, sha256_digest
from orchestrator.oci.signing import PublicKey, Signer

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
ARTIFACT_TYPE = "application/vnd.dsse.envelope.v1+json"
PREDICATE_ANNOTATION = "in-toto.io/predicate-type"
FILE_NAME = "provenance.intoto.dsse.json"
BUILD_TYPE = "urn:orchestrator:buildtype:publish:v1"
BUILDER_ID = "urn:orchestrator:builder"


# --- the statement and its envelope (pure) --------------------------------------------

def dependency(name: str, sha256: str, uri: str | None = None) -> dict:
    """An SLSA ResourceDescriptor: a file or image by its sha256 (hex)."""
    out = {"name": name, "digest": {"sha256": sha256.removeprefix("sha256:")}}
    if uri:
        out["uri"] = uri
    return out


def predicate(external: dict, internal: dict, dependencies: list[dict], builder_version: dict,
              metadata: dict) -> dict:
    """An SLSA provenance v1 predicate (buildDefinition and runDetails)."""
    return {"buildDefinition": {"buildType": BUILD_TYPE, "externalParameters": external,
                                "internalParameters": internal,
                                "resolvedDependencies": sorted(dependencies, key=lambda d: d["name"])},
            "runDetails": {"builder": {"id": BUILDER_ID, "version": builder_version}, "metadata": metadata}}


def statement(name: str, digest: str, predicate_body: dict) -> bytes:
    """The in-toto Statement v1 whose one subject is the image manifest name@digest."""
    body = {"_type": STATEMENT_TYPE,
            "subject": [{"name": name, "digest": {"sha256": digest.removeprefix("sha256:")}}],
            "predicateType": PREDICATE_TYPE, "predicate": predicate_body}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature covers."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def envelope(statement_bytes: bytes, signer: Signer) -> bytes:
    sig = signer.sign(pae(PAYLOAD_TYPE, statement_bytes))
    return json.dumps({"payload": base64.b64encode(statement_bytes).decode(), "payloadType": PAYLOAD_TYPE,
                       "signatures": [{"keyid": signer.public.keyid, "sig": base64.b64encode(sig).decode()}]},
                      sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Opened:
    statement: dict | None  # None: not verified
    key: PublicKey | None = None
    reason: str = ""


def open_envelope(data: bytes, subject: str, trusted: tuple[PublicKey, ...]) -> Opened:
    """The statement in a DSSE envelope, if a trusted key signed it and its subject is this digest."""
    try:
        env = json.loads(data)
        body = base64.b64decode(env["payload"], validate=True)
        sigs = [base64.b64decode(s["sig"], validate=True) for s in env.get("signatures") or []]
        ptype = env["payloadType"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return Opened(None, reason="it is not a DSSE envelope")
    if ptype != PAYLOAD_TYPE:
        return Opened(None, reason=f"its payloadType is {ptype!r}, not {PAYLOAD_TYPE}")
    key = next((k for k in trusted for sig in sigs if k.verify(sig, pae(ptype, body))), None)
    if key is None:
        return Opened(None, reason="it is not signed by a key this project trusts, or was altered after signing")
    try:
        st = json.loads(body)
        digests = [s["digest"].get("sha256") for s in st["subject"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return Opened(None, reason="its statement is not an in-toto statement")
    if st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != PREDICATE_TYPE:
        return Opened(None, reason="its statement is not an in-toto SLSA provenance statement")
    if subject.removeprefix("sha256:") not in digests:
        return Opened(None, reason=f"its subject is sha256:{(digests or ['?'])[0]}, not this image")
    return Opened(st, key)


# --- the registry -----------------------------------------------------------------------

def artifact_manifest(envelope_bytes: bytes, subject_digest: str, subject_size: int) -> bytes:
    body = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(EMPTY_JSON), "size": len(EMPTY_JSON)},
        "layers": [{"mediaType": ARTIFACT_TYPE, "digest": sha256_digest(envelope_bytes), "size": len(envelope_bytes),
                    "annotations": {"org.opencontainers.image.title": FILE_NAME,
                                    PREDICATE_ANNOTATION: PREDICATE_TYPE}}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": subject_size},
        "annotations": {PREDICATE_ANNOTATION: PREDICATE_TYPE},
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _ours(d: dict) -> bool:
    return d.get("artifactType") == ARTIFACT_TYPE and \
        (d.get("annotations") or {}).get(PREDICATE_ANNOTATION) == PREDICATE_TYPE


def push(reg: Registry, name: str, subject_digest: str, subject_size: int, envelope_bytes: bytes) -> tuple[str, int]:
    """Attach a provenance envelope to its image; returns (artifact digest, bytes sent).

    A provenance attestation attached before (a previous, unverifiable one)
    drops out of the fallback index: one provenance per image.
    """
    manifest = artifact_manifest(envelope_bytes, subject_digest, subject_size)
    sent = reg.upload_blob(name, EMPTY_JSON)[1] + reg.upload_blob(name, envelope_bytes)[1]
    digest, put = reg.put_manifest_if_changed(name, sha256_digest(manifest), manifest, OCI_MANIFEST)
    return digest, sent + put + referrers.attach(reg, name, subject_digest, manifest, _ours)


@dataclass(frozen=True)
class Found:
    digest: str  # the artifact manifest
    envelope: bytes
    statement: dict
    key: PublicKey


def find(reg: Registry, name: str, subject: str, trusted: tuple[PublicKey, ...],
         expected: str | None = None) -> tuple[Found | None, str]:
    """The verified provenance attached to subject, newest first; (None, why) when there is none.

    expected: the artifact digest the backend manifest names (only that one is considered).
    """
    listed = [d for d in referrers.listed(reg, name, subject, ARTIFACT_TYPE) if _ours(d)]
    if expected is not None:
        listed = [d for d in listed if d.get("digest") == expected]
        if not listed:
            return None, f"the backend manifest names provenance {expected[:19]}, but the image's referrers do not list it"
    if not listed:
        return None, "it has no provenance attached"
    why = ""
    for d in reversed(listed):  # the newest push is last in a fallback index
        artifact = reg.get_manifest(name, d["digest"])  # checked against its digest by the client
        if artifact is None:
            why = f"the provenance {d['digest'][:19]} its referrers list is not in the registry"
            continue
        body = artifact.json
        if (body.get("subject") or {}).get("digest") != subject or not body.get("layers"):
            why = f"{d['digest'][:19]} is listed as its provenance but is not attached to it"
            continue
        data = reg.get_blob(name, body["layers"][0]["digest"])
        opened = open_envelope(data, subject, trusted)
        if opened.statement is None:
            why = f"its provenance {d['digest'][:19]}: {opened.reason}"
            continue
        return Found(d["digest"], data, opened.statement, opened.key), ""
    return None, why


def fetch(reg: Registry, name: str, subject: str, trusted: tuple[PublicKey, ...], expected: str | None = None) -> Found:
    found, why = find(reg, name, subject, trusted, expected)
    if found is None:
        raise UserError(f"{reg.host}/{name}@{subject}: {why}", "re-run `invoke publish` with the release key")
    return found
