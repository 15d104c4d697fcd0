"""Before `select` names an image or `run` starts one: does the registry still
serve what the backend manifest says?

Three ways a host could end up running something nobody published:
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
from orchestrator.oci.backends import (
    manifest_bytes,  # the bytes publish pushes: a file's formatting does not count
)
from orchestrator.oci.registry import Registry, sha256_digest, split_ref

REPUBLISH = "re-publish with `invoke publish` so the tags and the backend manifest agree again"


def check_file_matches_registry(manifest: dict, source: str, artifact_ref: str, registry: Registry | None = None,
                                login=None) -> None:
    """A manifest read from a file must be the one the registry serves for its release.

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
