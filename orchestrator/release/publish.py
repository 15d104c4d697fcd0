"""Stage 6: publish. Images, then indexes, then the backend manifest last.

Order: blobs -> per-arch manifests under content tags (both by `build`,
which skips what the registry has) -> smoke tests of exactly those digests
-> promotion: each image's CycloneDX SBOM attached to it (orchestrator.sbom),
then one OCI image index per (service, version, backend) under its
human tags, then the nested backend manifest, pushed as an OCI artifact
under `<version>-backends` only after everything it names exists. A
publish that fails midway, or whose smoke fails, leaves the previous
backend manifest in place; a re-run with nothing changed uploads 0 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.common import places
from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.meter import Meter
from orchestrator.common.files import atomic_write
from orchestrator.debian import basepin
from orchestrator.oci import image as image_mod
from orchestrator.oci import sbom as sbom_mod
from orchestrator.oci.backends import (  # noqa: F401
    ARTIFACT_TYPE,
    SCHEMA_VERSION,
    artifact_tag,
    fetch_manifest,
    manifest_bytes,
    push_artifact,
    validate,
)
from orchestrator.oci.registry import (
    Registry,
    split_ref,
)
from orchestrator.project import compat as compat_mod
from orchestrator.project.spec import Project


@dataclass
class PublishReport:
    builds: list = field(default_factory=list)
    smoke: list = field(default_factory=list)
    manifests: dict[str, Path] = field(default_factory=dict)  # service -> file written
    artifacts: dict[str, str] = field(default_factory=dict)  # service -> ref@digest
    sboms: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (image, backend, platform) -> artifact digest
    uploaded_bytes: int = 0
    timings: Meter | None = None  # seconds and bytes per phase (build, export, compress, hash, upload, smoke, promote)


def fallback_order(project: Project) -> list[str]:
    """Newest CUDA line first, then older lines, then the CPU backends, as the project lists them."""
    lines = project.cuda_lines()
    cuda = sorted((b for b in project.backends.values() if b.is_cuda), key=lambda b: lines.index(b.cuda))
    return [b.name for b in cuda] + [b.name for b in project.backends.values() if not b.is_cuda]


def backend_manifest(project: Project, service: str, results: list, indexes: dict, smoke_ran: bool,
                     smoked: int = 0, sboms: dict | None = None) -> dict:
    """The nested manifest for one service from this run's build results.

    indexes: (key, backend) -> the index digest promoted for it.
    sboms: (key, backend, platform) -> the digest of the SBOM attached to that image.
    """
    compat = compat_mod.load()
    svc = project.services[service]
    by = {(r.image.key, r.image.backend.name, r.image.platform): r for r in results}
    platforms: dict[str, dict] = {}
    for platform in project.platforms:
        here = [b for b in fallback_order(project) if b in svc.backends and platform in project.backends[b].platforms]
        if not here:
            continue
        entry = {"default": here[0], "fallback": here, "backends": {}}
        for bname in here:
            backend = project.backends[bname]
            r = by.get((service, bname, platform))
            if r is None:
                raise EnvironmentProblem(f"{service}/{bname} for {platform} was not built in this run")
            spec = {"image": f"{r.image.repository}@{r.digest}",
                    "index": f"{r.image.repository}@{indexes[(service, bname)]}",
                    "size": r.assembled.size(), "torch": backend.torch_for(platform)}
            if sboms and (service, bname, platform) in sboms:
                spec["sbom"] = sboms[(service, bname, platform)]
            if backend.is_cuda:
                libs = by[("cuda-libs", bname, platform)]
                spec["requires"] = {"cuda": backend.cuda, "driver": ">=" + compat.cuda(backend.cuda).min_driver}
                torch = backend.torch_for(platform)
                if torch is not None:
                    spec["requires"]["archs"] = list(compat.archs(torch, backend.cuda, platform))
                spec["cuda_libs"] = {"tag": libs.image.human_tags[0], "digest": libs.digest}
            entry["backends"][bname] = spec
        platforms[platform] = entry
    manifest = {"schemaVersion": SCHEMA_VERSION, "project": project.name, "service": service, "version": svc.version,
                "platforms": platforms, "smoke": {"ran": smoke_ran, "variants": smoked}}
    validate(manifest, f"backend manifest for {service}")
    return manifest


def write_manifest(project: Project, manifest: dict) -> Path:
    path = project.root / "manifests" / f"{manifest['service']}-{manifest['version']}.backends.json"
    atomic_write(path, manifest_bytes(manifest))
    return path


def published_sbom(project: Project, service: str, backend: str, platform: str) -> tuple[str, bytes]:
    """The SBOM of the promoted image of one variant: (image ref, CycloneDX JSON bytes).

    The image comes from the promoted backend manifest; its SBOM is found
    through the referrers of the image digest, and every digest on the way
    is checked (see sbom.fetch).
    """
    svc = project.services[service]
    if backend not in svc.backends or platform not in project.backends[backend].platforms:
        offered = [b for b in svc.backends if platform in project.backends[b].platforms]
        raise UserError(f"{service} has no {backend} image for {platform} in {project.file.name}; "
                        f"there it has {offered}", f"pick one of {offered}, or another --platform")
    ref = f"{project.repository(service)}:{artifact_tag(svc.version)}"
    reg = Registry(project.registry)
    if not reg.has_manifest(split_ref(ref)[1], artifact_tag(svc.version)):
        raise UserError(f"nothing is published for {service} {svc.version} yet: {ref} is not in the registry",
                        "run `invoke publish` (it attaches an SBOM to every image it promotes)")
    manifest = fetch_manifest(ref)
    spec = ((manifest["platforms"].get(platform) or {}).get("backends") or {}).get(backend)
    if spec is None:
        raise UserError(f"{ref} names no {backend} image for {platform} (published before that variant existed)",
                        "run `invoke publish`")
    image = spec["image"]
    _, name, digest = split_ref(image)
    return image, sbom_mod.fetch(reg, name, digest, spec.get("sbom"))


def promote(project: Project, results: list, services: list[str], smoke_ran: bool, smoked: int,
            log=print) -> PublishReport:
    """Point the human tags at this run's images, then push each backend manifest (last).

    Per (image, backend): one OCI index over every platform built in this
    run, under its human tags (`0.1.0-cuda`, `cu124-v1`). The run built every
    platform, so an index never mixes revisions across platforms.
    """
    report = PublishReport(builds=results)
    reg = Registry(project.registry)
    # SBOMs before any human tag moves: an image reachable by tag has its SBOM attached.
    report.sboms, sent = attach_sboms(project, reg, results, log)
    report.uploaded_bytes += sent
    groups: dict[tuple[str, str], list] = {}
    for r in results:
        groups.setdefault((r.image.key, r.image.backend.name), []).append(r)
    indexes: dict[tuple[str, str], str] = {}
    for (key, bname), members in sorted(groups.items()):
        first = members[0].image
        missing = set(first.backend.platforms) - {m.image.platform for m in members}
        if missing:
            raise EnvironmentProblem(f"{key}/{bname} was not built for {sorted(missing)} in this run; an index "
                                     "must not mix revisions across platforms", "run `invoke publish` for all platforms")
        _, name, _ = split_ref(first.ref("x"))
        body = image_mod.index([(m.image.platform, m.assembled) for m in members])
        for human in first.human_tags:
            digest, sent = reg.put_manifest_if_changed(name, human, body, image_mod.OCI_INDEX)
            report.uploaded_bytes += sent
            log(f"{first.repository}:{human} -> index {digest[:19]} ({', '.join(sorted(m.image.platform for m in members))})"
                + ("" if sent else ", unchanged"))
        indexes[(key, bname)] = image_mod.digest_of(body)
    # Backend manifests last: everything they name now exists.
    for service in services:
        manifest = backend_manifest(project, service, results, indexes, smoke_ran, smoked, report.sboms)
        _, name, _ = split_ref(project.repository(service) + ":x")
        tag = artifact_tag(manifest["version"])
        title = f"{manifest['service']}-{manifest['version']}.backends.json"
        digest, sent = push_artifact(reg, name, tag, manifest_bytes(manifest), title)
        # Written locally only once it is in the registry.
        report.manifests[service] = write_manifest(project, manifest)
        report.uploaded_bytes += sent
        report.artifacts[service] = f"{project.repository(service)}:{tag}@{digest}"
        log(f"{project.repository(service)}:{tag} -> {digest[:19]}" + ("" if sent else " (unchanged)"))
    return report


def attach_sboms(project: Project, reg: Registry, results: list, log=print) -> tuple[dict, int]:
    """One CycloneDX SBOM per built image, attached as a referrer of its per-platform manifest.

    Returns ((key, backend, platform) -> SBOM artifact digest, bytes sent);
    an SBOM already attached sends nothing.
    """
    by = {(r.image.key, r.image.backend.name, r.image.platform): r for r in results}
    pins = basepin.read_pins(project)
    out: dict[tuple[str, str, str], str] = {}
    sent_total = 0
    for (key, bname, platform), r in sorted(by.items()):
        parent = by.get(("cuda-libs", bname, platform)) if r.image.from_image == "cuda-libs" else None
        if r.image.from_image == "cuda-libs" and parent is None:
            raise EnvironmentProblem(f"{key}/{bname} {platform}: its CUDA-libs image was not built in this run, "
                                     "so its SBOM cannot list the CUDA wheels", "run `invoke publish` for all images")
        payload = sbom_mod.cached_document(sbom_mod.contents(project.name, project.base.suite, r, parent,
                                                             pins.get(platform)), places.cache_root("sboms"))
        _, name, _ = split_ref(r.ref)
        manifest = r.assembled.manifest()
        if image_mod.digest_of(manifest) != r.digest:  # the subject's size must be the registry's: ask it
            found = reg.get_manifest(name, r.digest)
            manifest = found.body if found is not None else manifest
        digest, sent = sbom_mod.push(reg, name, r.digest, len(manifest), platform, payload)
        out[(key, bname, platform)] = digest
        sent_total += sent
        if sent:
            log(f"{r.image.repository}@{r.digest[:19]} ({platform}): SBOM {digest[:19]} attached "
                f"({len(payload):,} bytes)")
    return out, sent_total


def check_engine_pulls_zstd(version: str) -> None:
    """Smoke tests pull what is promoted: refuse zstd where this engine (of this version) cannot pull it."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < 23:
        raise UserError(f"compression: zstd cannot be published from here: this Docker Engine ({version}) cannot pull "
                        "zstd layers, so `invoke publish` could not smoke-test what it promotes",
                        "use `compression: gzip` (every engine pulls it), publish from an engine that pulls zstd "
                        "(Docker 23+, containerd 1.5+), or pass --no-smoke to publish untested zstd images")


def promoted_and_smoked(project: Project, services: list[str]) -> set[str]:
    """Image digests the currently promoted backend manifests name and recorded as smoke-tested."""
    out: set[str] = set()
    for service in services:
        ref = f"{project.repository(service)}:{artifact_tag(project.services[service].version)}"
        try:
            manifest = fetch_manifest(ref)
        except (UserError, EnvironmentProblem):
            continue  # none yet, or unreadable: smoke everything
        if (manifest.get("smoke") or {}).get("ran"):
            out |= {spec["image"] for entry in manifest["platforms"].values() for spec in entry["backends"].values()}
    return out


class SmokeFailed(EnvironmentProblem):
    def __init__(self, failed):
        self.failed = failed
        names = ", ".join(f"{r.variant.service}/{r.variant.backend} {r.variant.platform}" for r in failed)
        super().__init__(f"smoke failed for {names}; nothing was promoted (human tags and backend manifests "
                         "still name the previous release)",
                         "fix the image and re-run `invoke publish`; `invoke smoke` shows each check")
