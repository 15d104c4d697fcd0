"""Before `select` names an image or `run` starts one: does the registry still
serve what the backend manifest says?

Whoever can write to the registry could replace an image, its index and
the backend manifest consistently; so first, signatures: the backend
manifest artifact, and every image and index a host may start, must carry
a signature (cosign's format, orchestrator.oci.signing) by a key the
project trusts (`trust.keys`, plus this machine's own key for a registry on
its loopback). Unsigned, signed by another key, a signature moved from
another digest, a payload altered after signing: each is refused, naming
the artifact and why.

Then three ways a host could end up running something nobody published:
- the manifest itself was edited or is stale (a file that differs from the
  artifact the registry serves for that release);
- an image or index it names is gone, or its bytes no longer hash to the
  digest (the client checks every manifest it reads against its digest);
- a human tag (`0.1.0-cuda`) was moved to another index behind the
  manifest's back, so `docker pull repo:0.1.0-cuda` and the manifest disagree.

Each is refused with a UserError (exit 2) that names what differs and the fix.
Images are started by digest, so a verified choice is exactly what runs.
"""

from __future__ import annotations

from orchestrator.common.errors import UserError
from orchestrator.oci import signing
from orchestrator.oci.backends import (
    manifest_bytes,  # the bytes publish pushes: a file's formatting does not count
)
from orchestrator.oci.registry import Registry, sha256_digest, split_ref

REPUBLISH = "re-publish with `invoke publish` so the tags and the backend manifest agree again"
UNVERIFIED = "`invoke select --no-verify` still answers what-if questions, unverified"


def check_trust(trusted: tuple, project_file: str, registry: str) -> None:
    """Something to verify with: a release nobody can check is refused, not run."""
    if not trusted:
        raise UserError(f"{project_file} lists no trust.keys, so no signature from {registry} can be verified",
                        "add the public key the releases are signed with (`trust: {keys: [keys/release.pub]}`; "
                        "`invoke keys` makes a pair); " + UNVERIFIED)


def check_signature(reg: Registry, name: str, digest: str, trusted: tuple, what: str, source: str,
                    unsigned_release: bool = False) -> None:
    """digest (in repository name) carries a signature by a trusted key over a payload naming it; else exit 2."""
    verdict = signing.verify(reg, name, digest, trusted)
    if verdict.ok:
        return
    reason = verdict.reason
    if unsigned_release and reason.startswith("it has no signature"):
        reason = "it was published unsigned (`invoke publish --unsigned`, recorded as signed: false)"
        hint = "publish it with the release key ($ORCH_SIGNING_KEY or $ORCH_SIGNING_KEY_FILE); " + UNVERIFIED
    elif reason.startswith("it has no signature"):
        hint = ("publish with the release key ($ORCH_SIGNING_KEY or $ORCH_SIGNING_KEY_FILE), which signs every "
                "image, index and backend manifest; " + UNVERIFIED)
    elif "does not trust" in reason:
        hint = ("if you trust that key, add its public key file to trust.keys; otherwise someone else wrote to the "
                "registry: re-publish with the release key, and find out who can write there")
    else:
        hint = "someone altered the registry: re-publish with the release key, and find out who can write there"
    raise UserError(f"{source}: {what} {reg.host}/{name}@{digest[:19]}: {reason}", hint)


def check_backend_signatures(manifest: dict, platform: str, backend: str, source: str, trusted: tuple,
                             registry: Registry | None = None, login=None) -> None:
    """The image a backend entry names, and its index, carry trusted signatures."""
    spec = manifest["platforms"][platform]["backends"][backend]
    unsigned = manifest.get("signed") is False
    for key, what in (("image", f"the {backend} image for {platform}"), ("index", f"the {backend} index")):
        if not spec.get(key):
            continue
        host, name, digest = split_ref(spec[key])
        reg = registry or Registry(host, login=login)
        check_signature(reg, name, digest, trusted, what, source, unsigned)


def check_file_matches_registry(manifest: dict, source: str, artifact_ref: str, registry: Registry | None = None,
                                login=None) -> str:
    """A manifest read from a file must be the one the registry serves for its release; returns that artifact's digest.

    login: the environment's login (registry.EnvLogin), sent only to its own host."""
    host, name, tag = split_ref(artifact_ref)
    reg = registry or Registry(host, login=login)
    served = reg.get_manifest(name, tag)
    if served is None:
        raise UserError(f"{source}: the registry has no backend manifest {artifact_ref} to check this file against",
                        "publish it first (`invoke publish`), or drop --manifest to read what the registry serves")
    layers = served.json.get("layers") or [{}]
    want = layers[0].get("digest")
    got = sha256_digest(manifest_bytes(manifest))
    if got != want:
        raise UserError(f"{source}: this backend manifest ({got[:19]}) is not the one {artifact_ref} serves "
                        f"({str(want)[:19]}): it was edited, or a newer release replaced it",
                        "drop --manifest to use the registry's, or fetch it again")
    return served.digest


def check_backend(manifest: dict, platform: str, backend: str, source: str, registry: Registry | None = None,
                  login=None) -> None:
    """The image and index a backend entry names exist, hash to their digests, and the human tag still points there."""
    spec = manifest["platforms"][platform]["backends"][backend]
    host, name, image_digest = split_ref(spec["image"])
    if not image_digest.startswith("sha256:"):
        raise UserError(f"{source}: {backend} for {platform} names {spec['image']}, not an image by digest",
                        "a backend manifest names images by digest only; " + REPUBLISH)
    reg = registry or Registry(host, login=login)
    image = reg.get_manifest(name, image_digest)  # raises if the bytes do not hash to the digest
    if image is None:
        raise UserError(f"{source}: {backend} for {platform} names {spec['image']}, which {host} no longer has",
                        "the image was deleted or garbage-collected; " + REPUBLISH)
    index_ref = spec.get("index")
    if not index_ref:
        return
    _, index_name, index_digest = split_ref(index_ref)
    index = reg.get_manifest(index_name, index_digest)
    if index is None:
        raise UserError(f"{source}: {backend} names the index {index_ref}, which {host} no longer has",
                        "the index was deleted or garbage-collected; " + REPUBLISH)
    listed = {d.get("digest") for d in index.json.get("manifests") or []}
    if image_digest not in listed:
        raise UserError(f"{source}: the index {index_digest[:19]} of {backend} does not list the {platform} image "
                        f"{image_digest[:19]} the backend manifest names", REPUBLISH)
    tag = f"{manifest['version']}-{backend}"
    current = reg.get_manifest(index_name, tag)
    if current is None:
        raise UserError(f"{source}: {host}/{index_name}:{tag} is gone, but the backend manifest still names it "
                        f"(index {index_digest[:19]})", REPUBLISH)
    if current.digest != index_digest:
        raise UserError(f"{source}: {host}/{index_name}:{tag} now points at {current.digest[:19]}, not the index "
                        f"{index_digest[:19]} the backend manifest names: it was re-tagged behind the manifest's back",
                        REPUBLISH + ", or find out who pushed that tag")
