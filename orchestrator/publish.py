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

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jsonschema

from . import build as build_mod
from . import compat as compat_mod
from . import image as image_mod
from . import sbom as sbom_mod
from .errors import EnvironmentProblem, UserError
from .files import atomic_write
from .registry import EMPTY_JSON, OCI_EMPTY, OCI_MANIFEST, Registry, sha256_digest, split_ref
from .select import check_schema_version
from .spec import Project

ARTIFACT_TYPE = "application/vnd.orchestrator.backends.v1+json"
MANIFEST_SCHEMA_VERSION = 2  # 2: several CUDA lines per platform, each with driver and GPU-arch requirements
SCHEMA_FILE = "manifests/backend-manifest.schema.json"  # a link to the packaged copy
# Preference when a platform offers several backends: the default is the first.


@dataclass
class PublishReport:
    builds: list = field(default_factory=list)
    smoke: list = field(default_factory=list)
    manifests: dict[str, Path] = field(default_factory=dict)  # service -> file written
    artifacts: dict[str, str] = field(default_factory=dict)  # service -> ref@digest
    sboms: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (image, backend, platform) -> artifact digest
    uploaded_bytes: int = 0


@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads(resources.files("orchestrator").joinpath("data/backend-manifest.schema.json").read_text())


def validate(manifest: dict, source: str) -> None:
    check_schema_version(manifest, source)  # an old shape gets its own message, not a schema dump
    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise UserError(f"{source}: backend manifest invalid at {where}: {e.message}",
                        f"it must match {SCHEMA_FILE}")


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
    manifest = {"schemaVersion": MANIFEST_SCHEMA_VERSION, "project": project.name, "service": service, "version": svc.version,
                "platforms": platforms, "smoke": {"ran": smoke_ran, "variants": smoked}}
    validate(manifest, f"backend manifest for {service}")
    return manifest


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def write_manifest(project: Project, manifest: dict) -> Path:
    path = project.root / "manifests" / f"{manifest['service']}-{manifest['version']}.backends.json"
    atomic_write(path, manifest_bytes(manifest))
    return path


def artifact_tag(version: str) -> str:
    return f"{version}-backends"


def push_artifact(reg: Registry, name: str, tag: str, payload: bytes, title: str) -> tuple[str, int]:
    """The JSON as the one layer of an OCI artifact with an empty config."""
    _, sent_config = reg.upload_blob(name, EMPTY_JSON)
    layer_digest, sent_layer = reg.upload_blob(name, payload)
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(EMPTY_JSON), "size": len(EMPTY_JSON)},
        "layers": [{"mediaType": ARTIFACT_TYPE, "digest": layer_digest, "size": len(payload),
                    "annotations": {"org.opencontainers.image.title": title}}],
    }, sort_keys=True, separators=(",", ":")).encode()
    digest, sent_manifest = reg.put_manifest_if_changed(name, tag, body, OCI_MANIFEST)
    return digest, sent_config + sent_layer + sent_manifest


def fetch_manifest(ref: str) -> dict:
    """Read a backend manifest artifact (repo:<version>-backends), verifying digests and schema."""
    host, name, reference = split_ref(ref)
    reg = Registry(host)
    m = reg.get_manifest(name, reference)
    if m is None:
        raise UserError(f"{ref} is not in the registry", "run `invoke publish` first, or pass --manifest FILE")
    body = m.json
    if body.get("artifactType") != ARTIFACT_TYPE or not body.get("layers"):
        raise UserError(f"{ref} is not a backend manifest artifact (artifactType {body.get('artifactType')!r})")
    data = reg.get_blob(name, body["layers"][0]["digest"])
    try:
        manifest = json.loads(data)
    except ValueError:
        raise UserError(f"{ref}: the backend manifest is not JSON") from None
    validate(manifest, ref)
    return manifest


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


def load_manifest_file(path: str) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read the backend manifest ({e.strerror})",
                        "check the path given to --manifest") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})",
                        "fetch it again (drop --manifest to read it from the registry) or re-run `invoke publish`") from None
    validate(manifest, path)
    return manifest


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
    from . import base as base_mod

    by = {(r.image.key, r.image.backend.name, r.image.platform): r for r in results}
    pins = base_mod.read_pins(project)
    out: dict[tuple[str, str, str], str] = {}
    sent_total = 0
    for (key, bname, platform), r in sorted(by.items()):
        parent = by.get(("cuda-libs", bname, platform)) if r.image.from_image == "cuda-libs" else None
        if r.image.from_image == "cuda-libs" and parent is None:
            raise EnvironmentProblem(f"{key}/{bname} {platform}: its CUDA-libs image was not built in this run, "
                                     "so its SBOM cannot list the CUDA wheels", "run `invoke publish` for all images")
        payload = sbom_mod.document(sbom_mod.contents(project.name, project.base.suite, r, parent, pins.get(platform)))
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


def publish(project: Project, services: list[str] | None = None, log=print, smoke: bool = True,
            ready_timeout: float = 180.0) -> PublishReport:
    """Build what is missing (pushed by content tag), smoke-test exactly those digests, then promote.

    A smoke failure promotes nothing: human tags, indexes and backend
    manifests keep naming the previous release.
    """
    services = services or list(project.services)
    if smoke and project.compression == "zstd":
        check_engine_pulls_zstd()
    results = build_mod.build(project, services=services, log=log)
    built_bytes = sum(r.uploaded_bytes for r in results)
    smoked = 0
    checked = []
    if smoke:
        from . import smoke as smoke_mod

        chosen = smoke_mod.variants_from_builds(project, results)
        passed = _promoted_and_smoked(project, services)
        todo = [v for v in chosen if v.image not in passed]
        if len(todo) < len(chosen):
            log(f"smoke: {len(chosen) - len(todo)} image(s) already passed smoke in the promoted release; not re-run")
        checked = smoke_mod.run(project, log=log, ready_timeout=ready_timeout, chosen=todo) if todo else []
        failed = [r for r in checked if not r.ok]
        if failed:
            raise SmokeFailed(failed)
        smoked = len(chosen)
    else:
        log("smoke tests skipped (--no-smoke): the backend manifest records smoke.ran = false")
    report = promote(project, results, services, smoke, smoked, log)
    report.uploaded_bytes += built_bytes
    report.smoke = checked
    return report


def check_engine_pulls_zstd() -> None:
    """Smoke tests pull what is promoted: refuse zstd where this engine cannot pull it."""
    from . import engine

    version = engine.docker_client().version().get("Version", "0")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < 23:
        raise UserError(f"compression: zstd cannot be published from here: this Docker Engine ({version}) cannot pull "
                        "zstd layers, so `invoke publish` could not smoke-test what it promotes",
                        "use `compression: gzip` (every engine pulls it), publish from an engine that pulls zstd "
                        "(Docker 23+, containerd 1.5+), or pass --no-smoke to publish untested zstd images")


def _promoted_and_smoked(project: Project, services: list[str]) -> set[str]:
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
