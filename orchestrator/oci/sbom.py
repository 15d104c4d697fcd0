"""Supply chain: one CycloneDX SBOM per image, attached to it in the registry.

The SBOM is made from what built the image, not from scanning it: every
wheel of every Python layer (the CUDA-libs image's too, for a CUDA service)
with its version and the sha256 hashes its lock allows, every Debian package
of its apt locks with the .deb's sha256, the base image by digest, and the
Debian packages locks/base.json records for a bootstrapped base (name and
version only: mmdebstrap's .debs are not pinned by hash).

Same inputs, same bytes: the serial number is a uuid5 of the image digest,
the timestamp is SOURCE_DATE_EPOCH, components are sorted, and no registry
host is named, so an image has one SBOM digest in every registry.

In the registry the SBOM is an OCI artifact whose `subject` is the image's
per-platform manifest. Registries with the referrers API (distribution spec
1.1) list it themselves; for those without (Debian's docker-registry 2.8),
the referrers tag schema is kept up to date: an OCI index under the tag
`sha256-<hex of the image digest>` listing every referrer.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import atomic_write
from orchestrator.oci import referrers as referrers_mod
from orchestrator.oci.layers import SOURCE_DATE_EPOCH
from orchestrator.oci.referrers import descriptor, referrers_tag  # noqa: F401 - part of this module's interface
from orchestrator.oci.registry import (
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_MANIFEST,
    Registry,
    sha256_digest,
)

MEDIA_TYPE = "application/vnd.cyclonedx+json"  # IANA-registered; what scanners look for as artifactType
SPEC_VERSION = "1.6"
FILE_NAME = "sbom.cdx.json"
CREATED = "org.opencontainers.image.created"
PLATFORM_ANNOTATION = "io.orchestrator.sbom.platform"
# uuid5 namespace for serial numbers: a fixed, arbitrary uuid, so the same image always gets the same serial.
SERIAL_NAMESPACE = uuid.UUID("4f6b3a52-6c0e-5e8a-9d1f-0b8f3c2a7e61")
HASH_RE = re.compile(r"--hash=sha256:([0-9a-f]{64})")
BASE_NAME_LABEL = "org.opencontainers.image.base.name"
BASE_DIGEST_LABEL = "org.opencontainers.image.base.digest"


@dataclass(frozen=True)
class Wheel:
    name: str  # canonical
    version: str
    sha256: tuple[str, ...]  # every file the lock allows; pip installed the one for the platform (--require-hashes)
    layer: str


@dataclass(frozen=True)
class Deb:
    name: str
    version: str
    architecture: str
    sha256: str
    layer: str


@dataclass(frozen=True)
class Contents:
    """What went into one image, as the SBOM describes it."""

    name: str  # <project>/<image>, without a registry host
    digest: str  # the per-platform image manifest
    platform: str
    base_name: str
    base_digest: str
    suite: str  # the Debian suite of the base (the purl's distro)
    wheels: tuple[Wheel, ...]
    debs: tuple[Deb, ...]
    base_packages: tuple[tuple[str, str], ...] = ()  # (name, version) in the base, as locks/base.json lists them

    @property
    def arch(self) -> str:
        return self.platform.split("/")[1]


def wheel_hashes(block: str, where: str) -> tuple[str, ...]:
    found = tuple(sorted(set(HASH_RE.findall(block))))
    if not found:
        raise UserError(f"{where}: {block.split()[0]} has no sha256 hash", "run `invoke lock` (locks carry hashes)")
    return found


def contents(project_name: str, suite: str, result, parent=None, base_pin=None) -> Contents:
    """Contents of one built image (a build.BuildResult); parent: its CUDA-libs image's result, if any.

    A CUDA service image holds its parent's layers, so its SBOM lists the
    CUDA wheels too: a reader of one SBOM sees everything in the image.
    base_pin: the platform's base.Pin; its package list is used only when
    the image's bottom layers are that pin's.
    """
    image = result.image
    wheels = []
    for plan in ([parent.image] if parent is not None else []) + [image]:
        for stage in plan.layers:
            where = f"locks/{plan.backend.name}-{plan.arch}/{stage.lock.layer}.txt"
            wheels += [Wheel(p.name, p.version, wheel_hashes(p.block, where), stage.name) for p in stage.lock.pins]
    debs = [Deb(p.name, p.version, p.architecture, p.sha256, stage.name)
            for stage in image.system for p in stage.lock.pins]
    config = json.loads(result.assembled.config)
    labels = config.get("config", {}).get("Labels") or {}
    diff_ids = tuple(config.get("rootfs", {}).get("diff_ids") or ())
    packages: tuple[tuple[str, str], ...] = ()
    if base_pin is not None and base_pin.diff_ids and diff_ids[:len(base_pin.diff_ids)] == base_pin.diff_ids:
        packages = tuple(tuple(p.split("=", 1)) for p in base_pin.packages if "=" in p)
    if BASE_DIGEST_LABEL not in labels:
        raise EnvironmentProblem(f"{image.key}/{image.backend.name} {image.platform}: the image config has no "
                                 f"{BASE_DIGEST_LABEL} label", "rebuild it with `invoke build --force`")
    return Contents(f"{project_name}/{image.key}", result.digest, image.platform, labels.get(BASE_NAME_LABEL, "base"),
                    labels[BASE_DIGEST_LABEL], suite, tuple(wheels), tuple(debs), packages)


# --- the document (pure) ------------------------------------------------------

def _purl_pypi(w: Wheel):
    from packageurl import PackageURL

    return PackageURL(type="pypi", name=w.name, version=w.version)


def _purl_deb(name: str, version: str, arch: str | None, suite: str):
    from packageurl import PackageURL

    qualifiers = {"arch": arch, "distro": suite} if arch else {"distro": suite}
    return PackageURL(type="deb", namespace="debian", name=name, version=version, qualifiers=qualifiers)


def _purl_oci(name: str, digest: str, arch: str | None):
    from packageurl import PackageURL

    return PackageURL(type="oci", name=name.rsplit("/", 1)[-1], version=digest,
                      qualifiers={"arch": arch} if arch else None)


def document(c: Contents) -> bytes:
    """The CycloneDX 1.6 JSON document for one image. Same Contents, same bytes."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6

    def sha256(hexes):
        return [HashType(alg=HashAlgorithm.SHA_256, content=h) for h in hexes]

    def layer(name: str):
        return [Property(name="orchestrator:layer", value=name)]

    components: dict[str, Component] = {}  # by purl: one component per package, even if two layers named it
    base_purl = _purl_oci(c.base_name, c.base_digest, c.arch)
    components[str(base_purl)] = Component(
        type=ComponentType.CONTAINER, name=c.base_name, version=c.base_digest, purl=base_purl,
        bom_ref=str(base_purl), hashes=sha256([c.base_digest.removeprefix("sha256:")]), properties=layer("base"))
    for w in c.wheels:
        purl = _purl_pypi(w)
        components.setdefault(str(purl), Component(
            type=ComponentType.LIBRARY, name=w.name, version=w.version, purl=purl, bom_ref=str(purl),
            hashes=sha256(w.sha256), properties=layer(w.layer)))
    for d in c.debs:
        purl = _purl_deb(d.name, d.version, d.architecture, c.suite)
        components.setdefault(str(purl), Component(
            type=ComponentType.LIBRARY, name=d.name, version=d.version, purl=purl, bom_ref=str(purl),
            hashes=sha256([d.sha256]), properties=layer(d.layer)))
    in_base = []
    for name, version in c.base_packages:
        # The base list has no architecture (amd64 or all): the purl leaves it out rather than guess.
        purl = _purl_deb(name, version, None, c.suite)
        if str(purl) not in components:
            components[str(purl)] = Component(type=ComponentType.LIBRARY, name=name, version=version, purl=purl,
                                              bom_ref=str(purl), properties=layer("base"))
            in_base.append(components[str(purl)])
    image_purl = _purl_oci(c.name, c.digest, c.arch)
    root = Component(type=ComponentType.CONTAINER, name=c.name, version=c.digest, purl=image_purl,
                     bom_ref=str(image_purl), hashes=sha256([c.digest.removeprefix("sha256:")]),
                     properties=[Property(name="orchestrator:platform", value=c.platform)])
    bom = Bom(serial_number=uuid.uuid5(SERIAL_NAMESPACE, c.digest),
              metadata=BomMetaData(component=root, timestamp=datetime.datetime.fromtimestamp(
                  SOURCE_DATE_EPOCH, tz=datetime.timezone.utc)),
              components=[components[k] for k in sorted(components)])
    base = components[str(base_purl)]
    # By identity: Component equality compares every field, and this list is hundreds long.
    base_ids = {id(x) for x in in_base}
    bom.register_dependency(root, [x for x in components.values() if id(x) not in base_ids])
    bom.register_dependency(base, in_base)  # the base's own packages hang off the base
    text = JsonV1Dot6(bom).output_as_string(indent=2)
    # The library sorts sets itself; a round trip through sort_keys makes key order ours too.
    return (json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n").encode()


def cached_document(c: Contents, cache_dir: Path) -> bytes:
    """document(c), remembered on disk by what it is made from: its bytes depend on nothing else, and
    the CycloneDX model takes most of a second per image, which a no-op publish of many images felt."""
    from importlib import metadata, resources

    try:
        library = metadata.version("cyclonedx-python-lib")
    except metadata.PackageNotFoundError:
        library = "unknown"
    h = hashlib.sha256(json.dumps(dataclasses.asdict(c), sort_keys=True).encode())
    h.update(library.encode() + resources.files("orchestrator").joinpath("oci/sbom.py").read_bytes())
    path = cache_dir / f"{h.hexdigest()}.json"
    try:
        return path.read_bytes()
    except OSError:
        pass
    data = document(c)
    atomic_write(path, data)
    return data


def validation_errors(data: bytes) -> str | None:
    """The CycloneDX 1.6 JSON schema's complaint about data, or None (the library's validator, offline)."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(data.decode())
    return None if error is None else str(error)


# --- the registry: push and find referrers -----------------------------------

def artifact_manifest(payload: bytes, subject_digest: str, subject_size: int, platform: str) -> bytes:
    body = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": MEDIA_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(EMPTY_JSON), "size": len(EMPTY_JSON)},
        "layers": [{"mediaType": MEDIA_TYPE, "digest": sha256_digest(payload), "size": len(payload),
                    "annotations": {"org.opencontainers.image.title": FILE_NAME}}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": subject_size},
        # Fixed, so the same SBOM is the same artifact; readers filter referrers by these.
        "annotations": {CREATED: datetime.datetime.fromtimestamp(SOURCE_DATE_EPOCH, tz=datetime.timezone.utc)
                        .strftime("%Y-%m-%dT%H:%M:%SZ"), PLATFORM_ANNOTATION: platform},
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _ours(d: dict) -> bool:
    return d.get("artifactType") == MEDIA_TYPE and PLATFORM_ANNOTATION in (d.get("annotations") or {})


def push(reg: Registry, name: str, subject_digest: str, subject_size: int, platform: str,
         payload: bytes) -> tuple[str, int]:
    """Attach the SBOM to its image; returns (artifact digest, bytes sent). Nothing is sent for what exists."""
    manifest = artifact_manifest(payload, subject_digest, subject_size, platform)
    sent = reg.upload_blob(name, EMPTY_JSON)[1] + reg.upload_blob(name, payload)[1]
    digest, put = reg.put_manifest_if_changed(name, sha256_digest(manifest), manifest, OCI_MANIFEST)
    # Every other referrer (signatures, provenance, other tools' SBOMs) is kept, but not an SBOM this
    # tool made for the image before: one SBOM per image.
    return digest, sent + put + referrers_mod.attach(reg, name, subject_digest, manifest, _ours)


def referrers(reg: Registry, name: str, subject: str) -> list[dict]:
    """SBOM descriptors attached to subject: the referrers API where the registry has it, else the tag schema."""
    return referrers_mod.listed(reg, name, subject, MEDIA_TYPE)


def fetch(reg: Registry, name: str, subject: str, expected: str | None = None) -> bytes:
    """The SBOM of an image, found through its referrers and checked: digests, subject and the document's own claim.

    expected: the artifact digest the backend manifest names; it must be among the referrers.
    """
    where = f"{reg.host}/{name}@{subject}"
    found = referrers(reg, name, subject)
    if expected is not None:
        found = [d for d in found if d.get("digest") == expected]
        if not found:
            raise UserError(f"{where}: the backend manifest names SBOM {expected}, but the image's referrers do not "
                            "list it", "re-run `invoke publish` to attach it again")
    if not found:
        raise UserError(f"{where} has no SBOM attached (published before SBOMs, or by another tool)",
                        "run `invoke publish` to attach one")
    digest = found[-1]["digest"]  # the newest push is last in a fallback index
    artifact = reg.get_manifest(name, digest)  # verified against its digest by the client
    if artifact is None:
        raise UserError(f"{where}: the SBOM {digest} its referrers list is not in the registry",
                        "re-run `invoke publish`")
    body = artifact.json
    if (body.get("subject") or {}).get("digest") != subject or body.get("artifactType") != MEDIA_TYPE:
        raise UserError(f"{where}: {digest} is listed as its SBOM but is not one attached to it",
                        "the referrers index was altered; re-run `invoke publish`")
    data = reg.get_blob(name, body["layers"][0]["digest"])  # verified against its digest
    try:
        described = json.loads(data)["metadata"]["component"]["version"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{where}: the SBOM {digest} is not a CycloneDX JSON document") from None
    if described != subject:
        raise UserError(f"{where}: the SBOM {digest} describes {described}, not this image",
                        "re-run `invoke publish`")
    return data
