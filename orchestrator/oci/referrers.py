"""Artifacts attached to an image: OCI referrers, with the referrers tag schema as fallback.

An artifact (an SBOM, a provenance attestation) names the image manifest it
describes as its `subject`. Registries with the referrers API (distribution
spec 1.1) list such artifacts themselves; for those without it (Debian's
docker-registry 2.8) the spec's fallback is kept up to date here: an OCI
index under the tag `sha256-<hex of the subject digest>` listing every
referrer, updated read-modify-write, so each attaching tool keeps the
others' entries.
"""

from __future__ import annotations

import json
import re
from typing import Callable

from orchestrator.common.errors import EnvironmentProblem
from orchestrator.oci.registry import OCI_INDEX, OCI_MANIFEST, Registry, sha256_digest


def referrers_tag(digest: str) -> str:
    """The referrers tag schema (distribution spec 1.1): `<alg>-<encoded>`, truncated to 32/64, tag-safe."""
    alg, _, encoded = digest.partition(":")
    return re.sub(r"[^a-zA-Z0-9._-]", "-", f"{alg[:32]}-{encoded[:64]}")


def descriptor(manifest: bytes) -> dict:
    """The referrers-list entry for an artifact manifest: artifactType and annotations copied, as the spec says."""
    body = json.loads(manifest)
    out = {"mediaType": OCI_MANIFEST, "digest": sha256_digest(manifest), "size": len(manifest),
           "artifactType": body.get("artifactType") or body["config"]["mediaType"]}
    if body.get("annotations"):
        out["annotations"] = body["annotations"]
    return out


def fallback_index(reg: Registry, name: str, subject: str) -> list[dict]:
    """The descriptors under the referrers tag; [] when there is none yet."""
    tag = referrers_tag(subject)
    found = reg.get_manifest(name, tag)
    if found is None:
        return []
    if found.media_type != OCI_INDEX or found.json.get("mediaType", OCI_INDEX) != OCI_INDEX:
        raise EnvironmentProblem(f"{reg.host}/{name}:{tag} should be the referrers index of {subject} but is a "
                                 f"{found.media_type or 'manifest of unknown type'}",
                                 "something else uses the referrers tag schema's name; delete that tag and re-publish")
    return list(found.json.get("manifests") or [])


def attach(reg: Registry, name: str, subject: str, manifest: bytes, replaces: Callable[[dict], bool]) -> int:
    """Make an artifact manifest (already in the registry) findable from its subject; returns bytes sent.

    replaces(descriptor): True for an entry this artifact supersedes (one
    SBOM per image: a new one replaces the one this tool attached before).
    Nothing is sent where the registry lists referrers itself, or where the
    fallback index lists this artifact already.
    """
    if reg.referrers(name, subject) is not None:
        return 0  # the registry lists referrers itself
    listed = fallback_index(reg, name, subject)
    digest = sha256_digest(manifest)
    if any(d.get("digest") == digest for d in listed):
        return 0
    kept = [d for d in listed if not replaces(d)]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": kept + [descriptor(manifest)]},
                       sort_keys=True, separators=(",", ":")).encode()
    return reg.put_manifest_if_changed(name, referrers_tag(subject), index, OCI_INDEX)[1]


def listed(reg: Registry, name: str, subject: str, artifact_type: str) -> list[dict]:
    """Descriptors of artifactType attached to subject: the referrers API where the registry has it, else the tag."""
    found = reg.referrers(name, subject, artifact_type)
    if found is None:
        try:
            found = fallback_index(reg, name, subject)
        except EnvironmentProblem:
            found = []  # the spec: no valid index under the tag means no referrers
    return [d for d in found if d.get("artifactType") == artifact_type]
