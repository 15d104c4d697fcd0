"""Stage 6: publish. Images, then indexes, then the backend manifest last.

Order: blobs -> per-arch manifests under content tags (both by `build`,
which skips what the registry has) -> smoke tests of exactly those digests
-> promotion: each image's CycloneDX SBOM attached to it (orchestrator.sbom),
each image signed (cosign's format, orchestrator.oci.signing) with its
signed SLSA provenance attached (orchestrator.oci.provenance), then one OCI
image index per (service, version, backend), signed, under its human tags,
then the nested backend manifest, signed, pushed as an OCI artifact under
`<version>-backends` only after everything it names exists. Every
signature is in the registry before any human tag names its digest. A
publish that fails midway, or whose smoke fails, leaves the previous
backend manifest in place; a re-run with nothing changed signs nothing
again and uploads 0 bytes.

The manifest records, per image, what its smoke test ran (`SmokeGate`):
"ran" (the service started and answered /health, /ready and /info) or
"partial" (it never started, and why), promoted only where the project
allows that variant by name (`smoke.allow_partial`). A digest the promoted
release already smoke-tested is not tested again: its record is reused,
and the manifest's count of smoke-tested variants leaves it out.
"""

from __future__ import annotations

import copy
import datetime
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from orchestrator import __version__
from orchestrator.common import places
from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import atomic_write, sha256_file
from orchestrator.common.meter import Meter
from orchestrator.debian import basepin
from orchestrator.oci import image as image_mod
from orchestrator.oci import layers as layers_mod
from orchestrator.oci import provenance as provenance_mod
from orchestrator.oci import sbom as sbom_mod
from orchestrator.oci import signing as signing_mod
from orchestrator.oci.backends import (  # noqa: F401
    ARTIFACT_TYPE,
    SCHEMA_VERSION,
    artifact_manifest,
    artifact_tag,
    fetch_manifest,
    manifest_bytes,
    push_artifact,
    validate,
)
from orchestrator.oci.registry import (
    Registry,
    sha256_digest,
    split_ref,
)
from orchestrator.project import compat as compat_mod
from orchestrator.project.lockfile import lock_path
from orchestrator.project.spec import Project


from orchestrator.release.smoke.variant import DEFAULT_ENGINE, variant_label


ALLOW_PARTIAL = "smoke.allow_partial"


@dataclass
class SmokeGate:
    """What one publish's smoke gate found, for the backend manifests it promotes.

    ran: smoke gated this publish (False: --no-smoke); records: image ref -> its smoke record
    (see VariantResult.record; "reused" where an earlier publish tested that digest);
    previous: service -> the backend manifest promoted before this publish.
    """

    ran: bool = False
    records: dict[str, dict] = field(default_factory=dict)
    previous: dict[str, dict] = field(default_factory=dict)

    def tested_here(self) -> list[dict]:
        return [r for r in self.records.values() if not r.get("reused")]


@dataclass
class PublishReport:
    builds: list = field(default_factory=list)
    smoke: list = field(default_factory=list)  # VariantResults of the variants smoke-tested by this publish
    reused: dict[str, dict] = field(default_factory=dict)  # image -> the earlier publish's record, not tested again
    manifests: dict[str, Path] = field(default_factory=dict)  # service -> file written
    artifacts: dict[str, str] = field(default_factory=dict)  # service -> ref@digest
    sboms: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (image, backend, platform) -> artifact digest
    provenance: dict[tuple[str, str, str], str] = field(default_factory=dict)  # likewise, the provenance artifact
    signed: bool = False
    signatures: int = 0  # signatures made by this run (0 when every digest was signed already)
    uploaded_bytes: int = 0
    published: dict[str, dict] = field(default_factory=dict)  # service -> the backend manifest promoted
    timings: Meter | None = None  # seconds and bytes per phase (build, export, compress, hash, upload, smoke, promote)


@dataclass(frozen=True)
class Signing:
    """Who signs a release, and whose signatures already on a digest count (the signer's key among them)."""

    signer: signing_mod.Signer
    trusted: tuple[signing_mod.PublicKey, ...]


@dataclass(frozen=True)
class RunFacts:
    """What the provenance of every image says about the publish run itself."""

    invocation: str  # urn:uuid:..., one per run
    started: str  # RFC 3339, UTC
    engines: dict[str, str] = field(default_factory=dict)  # platform -> the engine that builds it
    commit: str | None = None  # the tool's git commit, when it runs from a checkout

    @staticmethod
    def now(engines: dict[str, str] | None = None, commit: str | None = None) -> "RunFacts":
        return RunFacts(f"urn:uuid:{uuid.uuid4()}", _utc_now(), dict(engines or {}), commit)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fallback_order(project: Project) -> list[str]:
    """Newest CUDA line first, then older lines, then the CPU backends, as the project lists them."""
    lines = project.cuda_lines()
    cuda = sorted((b for b in project.backends.values() if b.is_cuda), key=lambda b: lines.index(b.cuda))
    return [b.name for b in cuda] + [b.name for b in project.backends.values() if not b.is_cuda]


def backend_manifest(project: Project, service: str, results: list, indexes: dict, smoke_ran: bool,
                     smoked: int = 0, sboms: dict | None = None, records: dict[str, dict] | None = None,
                     provenance: dict | None = None, signed: bool | None = None) -> dict:
    """The nested manifest for one service from this run's build results.

    indexes: (key, backend) -> the index digest promoted for it.
    sboms, provenance: (key, backend, platform) -> the digest of the SBOM / provenance attached to that image.
    signed: whether this release is signed (None: not said, as before signatures).
    records: image ref -> its smoke record (SmokeGate.records); with them, smoked is the number
    of this service's records not reused from an earlier publish, and partial ones are listed.
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
            if provenance and (service, bname, platform) in provenance:
                spec["provenance"] = provenance[(service, bname, platform)]
            if records and spec["image"] in records:
                spec["smoke"] = copy.deepcopy(records[spec["image"]])
            if backend.is_cuda:
                libs = by[("cuda-libs", bname, platform)]
                spec["requires"] = {"cuda": backend.cuda, "driver": ">=" + compat.cuda(backend.cuda).min_driver}
                torch = backend.torch_for(platform)
                if torch is not None:
                    spec["requires"]["archs"] = list(compat.archs(torch, backend.cuda, platform))
                spec["cuda_libs"] = {"tag": libs.image.human_tags[0], "digest": libs.digest}
            entry["backends"][bname] = spec
        platforms[platform] = entry
    smoke: dict = {"ran": smoke_ran, "variants": smoked}
    if records:
        mine = [(p, b, spec["smoke"]) for p, entry in platforms.items() for b, spec in entry["backends"].items()
                if "smoke" in spec]
        smoke["variants"] = sum(not rec.get("reused") for _, _, rec in mine)
        partial = sorted(f"{service}/{b} {p}" for p, b, rec in mine if rec["result"] == "partial")
        if partial:
            smoke["partial"] = partial
    manifest = {"schemaVersion": SCHEMA_VERSION, "project": project.name, "service": service, "version": svc.version,
                "platforms": platforms, "smoke": smoke}
    if signed is not None:
        manifest["signed"] = signed
    validate(manifest, f"backend manifest for {service}")
    return manifest


def _without_smoke_news(manifest: dict) -> dict:
    """The manifest less what only says which publish ran the smoke tests (the count, `reused`)."""
    m = copy.deepcopy(manifest)
    (m.get("smoke") or {}).pop("variants", None)
    for entry in (m.get("platforms") or {}).values():
        for spec in (entry.get("backends") or {}).values():
            (spec.get("smoke") or {}).pop("reused", None)
    return m


def same_release(previous: dict | None, manifest: dict) -> bool:
    """The promoted manifest names the same images, indexes and smoke records: a publish that changed
    nothing and tested nothing keeps it as it is (the record of the publish that tested them)."""
    return previous is not None and _without_smoke_news(previous) == _without_smoke_news(manifest)


def write_manifest(project: Project, manifest: dict) -> Path:
    path = project.root / "manifests" / f"{manifest['service']}-{manifest['version']}.backends.json"
    atomic_write(path, manifest_bytes(manifest))
    return path


def promoted_image(project: Project, service: str, backend: str, platform: str, what: str) -> tuple[Registry, dict]:
    """The promoted backend manifest's entry for one variant: (registry, its spec), every digest on the way checked."""
    svc = project.services[service]
    if backend not in svc.backends or platform not in project.backends[backend].platforms:
        offered = [b for b in svc.backends if platform in project.backends[b].platforms]
        raise UserError(f"{service} has no {backend} image for {platform} in {project.file.name}; "
                        f"there it has {offered}", f"pick one of {offered}, or another --platform")
    ref = f"{project.repository(service)}:{artifact_tag(svc.version)}"
    reg = Registry(project.registry, login=project.login)
    if not reg.has_manifest(split_ref(ref)[1], artifact_tag(svc.version)):
        raise UserError(f"nothing is published for {service} {svc.version} yet: {ref} is not in the registry",
                        f"run `invoke publish` (it attaches {what} to every image it promotes)")
    manifest = fetch_manifest(ref, project.login)
    spec = ((manifest["platforms"].get(platform) or {}).get("backends") or {}).get(backend)
    if spec is None:
        raise UserError(f"{ref} names no {backend} image for {platform} (published before that variant existed)",
                        "run `invoke publish`")
    return reg, spec


def published_sbom(project: Project, service: str, backend: str, platform: str) -> tuple[str, bytes]:
    """The SBOM of the promoted image of one variant: (image ref, CycloneDX JSON bytes).

    The image comes from the promoted backend manifest; its SBOM is found
    through the referrers of the image digest, and every digest on the way
    is checked (see sbom.fetch).
    """
    reg, spec = promoted_image(project, service, backend, platform, "an SBOM")
    image = spec["image"]
    _, name, digest = split_ref(image)
    return image, sbom_mod.fetch(reg, name, digest, spec.get("sbom"))


def published_provenance(project: Project, service: str, backend: str, platform: str,
                         trusted: tuple[signing_mod.PublicKey, ...]) -> tuple[str, provenance_mod.Found]:
    """The signed provenance of the promoted image of one variant: (image ref, what was found and verified)."""
    reg, spec = promoted_image(project, service, backend, platform, "signed provenance")
    image = spec["image"]
    _, name, digest = split_ref(image)
    return image, provenance_mod.fetch(reg, name, digest, trusted, spec.get("provenance"))


def promote(project: Project, results: list, services: list[str], smoke_ran: bool = False, smoked: int = 0,
            log=print, signing: Signing | None = None, run: RunFacts | None = None,
            gate: SmokeGate | None = None) -> PublishReport:
    """Sign and describe this run's images, point the human tags at them, then push each backend manifest (last).

    Per (image, backend): one OCI index over every platform built in this
    run, under its human tags (`0.1.0-cuda`, `cu124-v1`). The run built every
    platform, so an index never mixes revisions across platforms.
    signing: None publishes unsigned (recorded in the backend manifest as signed: false).
    gate: what the smoke gate found (smoke_ran and smoked are its short form, without records).
    """
    gate = gate or SmokeGate(smoke_ran)
    report = PublishReport(builds=results, signed=signing is not None)
    reg = Registry(project.registry, login=project.login)
    # SBOMs, signatures and provenance before any human tag moves: an image reachable by tag has them all.
    report.sboms, sent = attach_sboms(project, reg, results, log)
    report.uploaded_bytes += sent
    groups: dict[tuple[str, str], list] = {}
    for r in results:
        groups.setdefault((r.image.key, r.image.backend.name), []).append(r)
    bodies: dict[tuple[str, str], bytes] = {}
    for (key, bname), members in sorted(groups.items()):
        missing = set(members[0].image.backend.platforms) - {m.image.platform for m in members}
        if missing:
            raise EnvironmentProblem(f"{key}/{bname} was not built for {sorted(missing)} in this run; an index "
                                     "must not mix revisions across platforms", "run `invoke publish` for all platforms")
        bodies[(key, bname)] = image_mod.index([(m.image.platform, m.assembled) for m in members])
    indexes = {k: image_mod.digest_of(body) for k, body in bodies.items()}
    if signing is not None:
        to_sign = [(split_ref(groups[k][0].ref)[1], groups[k][0].image.repository, d) for k, d in sorted(indexes.items())]
        report.provenance, sent, report.signatures = sign_release(project, results, to_sign, signing,
                                                                  run or RunFacts.now(), log)
        report.uploaded_bytes += sent
    for (key, bname), body in sorted(bodies.items()):
        members = groups[(key, bname)]
        first = members[0].image
        _, name, _ = split_ref(first.ref("x"))
        for human in first.human_tags:
            digest, sent = reg.put_manifest_if_changed(name, human, body, image_mod.OCI_INDEX)
            report.uploaded_bytes += sent
            log(f"{first.repository}:{human} -> index {digest[:19]} ({', '.join(sorted(m.image.platform for m in members))})"
                + ("" if sent else ", unchanged"))
    # Backend manifests last: everything they name now exists.
    for service in services:
        manifest = backend_manifest(project, service, results, indexes, gate.ran, smoked, report.sboms,
                                    records=gate.records, provenance=report.provenance, signed=signing is not None)
        if gate.records and same_release(gate.previous.get(service), manifest):
            manifest = gate.previous[service]  # nothing changed, nothing tested again: the promoted record stands
        _, name, _ = split_ref(project.repository(service) + ":x")
        tag = artifact_tag(manifest["version"])
        title = f"{manifest['service']}-{manifest['version']}.backends.json"
        payload = manifest_bytes(manifest)
        if signing is not None:  # signed by its digest before the tag names it
            sent = signing_mod.sign(reg, name, project.repository(service),
                                    sha256_digest(artifact_manifest(payload, title)), signing.signer, signing.trusted)
            report.signatures += sent > 0
            report.uploaded_bytes += sent
        digest, sent = push_artifact(reg, name, tag, payload, title)
        # Written locally only once it is in the registry.
        report.manifests[service] = write_manifest(project, manifest)
        report.published[service] = manifest
        report.uploaded_bytes += sent
        report.artifacts[service] = f"{project.repository(service)}:{tag}@{digest}"
        log(f"{project.repository(service)}:{tag} -> {digest[:19]}" + ("" if sent else " (unchanged)"))
    if signing is not None:
        log(f"signed with {signing.signer.public}: {report.signatures} new signature(s)"
            + ("" if report.signatures else ", every digest was signed already"))
    return report


SIGNING_THREADS = 4  # artifacts signed at once, each thread with its own registry client (session, token)


def sign_release(project: Project, results: list, indexes: list[tuple[str, str, str]], signing: Signing,
                 run: RunFacts, log=print) -> tuple[dict, int, int]:
    """Every built image signed with its signed provenance attached, and every index signed, side by side.

    indexes: (repository name, repository, digest) of each index about to be tagged.
    Returns ((key, backend, platform) -> provenance artifact digest, bytes sent, signatures made).
    Signing is a few small requests per artifact: threads keep a registry's
    round trips from adding up.
    """
    local = threading.local()

    def registry() -> Registry:
        if not hasattr(local, "reg"):
            local.reg = Registry(project.registry, login=project.login)
        return local.reg

    by = {(r.image.key, r.image.backend.name, r.image.platform): r for r in results}

    def image(k) -> tuple[str, int, int, str | None]:
        r = by[k]
        parent = by.get(("cuda-libs", k[1], k[2])) if r.image.from_image == "cuda-libs" else None
        digest, sent, attached = attach_provenance(project, registry(), r, parent, signing, run)
        signed = signing_mod.sign(registry(), split_ref(r.ref)[1], r.image.repository, r.digest, signing.signer,
                                  signing.trusted)
        note = f"{r.image.repository}@{r.digest[:19]} ({k[2]}): provenance {digest[:19]} attached" if attached else None
        return digest, sent + signed, int(signed > 0), note

    def index(name: str, repository: str, digest: str) -> tuple[None, int, int, None]:
        signed = signing_mod.sign(registry(), name, repository, digest, signing.signer, signing.trusted)
        return None, signed, int(signed > 0), None

    with ThreadPoolExecutor(max_workers=SIGNING_THREADS, thread_name_prefix="sign") as pool:
        images = {k: pool.submit(image, k) for k in sorted(by)}
        others = [pool.submit(index, *i) for i in indexes]
        done = {k: f.result() for k, f in images.items()}
        rest = [f.result() for f in others]
    for _, _, _, note in done.values():
        if note:
            log(note)
    outcomes = list(done.values()) + rest
    return ({k: v[0] for k, v in done.items()}, sum(o[1] for o in outcomes), sum(o[2] for o in outcomes))


def attach_provenance(project: Project, reg: Registry, r, parent, signing: Signing,
                      run: RunFacts) -> tuple[str, int, bool]:
    """The image's signed SLSA provenance, attached unless one signed by a trusted key is: (digest, bytes, attached).

    An image that already carries it keeps it (its time stamps say when it
    was first published), and sends nothing.
    """
    _, name, _ = split_ref(r.ref)
    found, _ = provenance_mod.find(reg, name, r.digest, signing.trusted)
    if found is not None:
        return found.digest, 0, False
    statement = provenance_mod.statement(r.image.repository.split("/", 1)[-1], r.digest,
                                         provenance_predicate(project, r, parent, run))
    envelope = provenance_mod.envelope(statement, signing.signer)
    digest, sent = provenance_mod.push(reg, name, r.digest, _subject_size(reg, name, r), envelope)
    return digest, sent, True


def _subject_size(reg: Registry, name: str, r) -> int:
    manifest = r.assembled.manifest()
    if image_mod.digest_of(manifest) != r.digest:  # the subject's size must be the registry's: ask it
        found = reg.get_manifest(name, r.digest)
        manifest = found.body if found is not None else manifest
    return len(manifest)


def _file(project: Project, path: Path) -> dict:
    rel = path.relative_to(project.root).as_posix()
    return provenance_mod.dependency(rel, sha256_file(path), f"file:{rel}")


def provenance_predicate(project: Project, r, parent, run: RunFacts) -> dict:
    """What made one image, as an SLSA provenance v1 predicate (see orchestrator.oci.provenance).

    Its files by sha256, relative to the project: the project file, every
    lock the image's layers were installed from (its CUDA-libs image's too),
    its Debian package locks and the base pin; the base image by digest;
    the compatibility data the tool carries.
    """
    image = r.image
    files = [project.file]
    for plan in ([parent.image] if parent is not None else []) + [image]:
        files += [lock_path(project.root, plan.backend.name, plan.platform, stage.lock.layer) for stage in plan.layers]
        files += [project.root / stage.lock_file for stage in plan.system]
    pin_file = basepin.pin_path(project)
    if pin_file.exists():
        files.append(pin_file)
    deps = [_file(project, f) for f in dict.fromkeys(files) if f.exists()]
    labels = (json.loads(r.assembled.config).get("config") or {}).get("Labels") or {} if r.assembled else {}
    if labels.get(sbom_mod.BASE_DIGEST_LABEL):  # the base image this one stands on, as its config names it
        base = labels[sbom_mod.BASE_DIGEST_LABEL]
        deps.append(provenance_mod.dependency("base", base, f"oci://{labels.get(sbom_mod.BASE_NAME_LABEL, 'base')}@{base}"))
    compat = resources.files("orchestrator").joinpath("data/compat.yaml").read_bytes()
    deps.append(provenance_mod.dependency("orchestrator/data/compat.yaml", sha256_digest(compat)))
    external = {"project": project.name, "image": image.key, "backend": image.backend.name,
                "platform": image.platform, "contentTag": r.content_tag, "humanTags": list(image.human_tags)}
    if image.service is not None:
        external["version"] = image.service.version
    internal = {"codec": layers_mod.codec(project.compression).key, "sourceDateEpoch": layers_mod.SOURCE_DATE_EPOCH,
                "engine": run.engines.get(image.platform, "the default engine"), "builtInThisRun": bool(r.built)}
    version = {"orchestrator": __version__}
    if run.commit:
        version["orchestrator-commit"] = run.commit
    metadata = {"invocationId": run.invocation, "startedOn": run.started, "finishedOn": _utc_now()}
    return provenance_mod.predicate(external, internal, deps, version, metadata)


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
        digest, sent = sbom_mod.push(reg, name, r.digest, _subject_size(reg, name, r), platform, payload)
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


class SmokeFailed(EnvironmentProblem):
    def __init__(self, failed):
        self.failed = failed
        names = ", ".join(f"{r.variant.service}/{r.variant.backend} {r.variant.platform}" for r in failed)
        super().__init__(f"smoke failed for {names}; nothing was promoted (human tags and backend manifests "
                         "still name the previous release)",
                         "fix the image and re-run `invoke publish`; `invoke smoke` shows each check")


def promoted_manifests(project: Project, services: list[str]) -> dict[str, dict]:
    """service -> the backend manifest promoted now (a service with none yet, or an unreadable one, is left out)."""
    out: dict[str, dict] = {}
    for service in services:
        ref = f"{project.repository(service)}:{artifact_tag(project.services[service].version)}"
        try:
            out[service] = fetch_manifest(ref, project.login)
        except (UserError, EnvironmentProblem):
            continue  # none yet, or unreadable: smoke everything
    return out


def reusable_records(project: Project, previous: dict[str, dict], engine_names: dict[str, str]) -> dict[str, dict]:
    """image -> the smoke record of the promoted release that this publish may reuse instead of testing again.

    A "ran" record always; a "partial" one only while the project still allows that variant and its
    platform would be smoked on the same engine again (a new native engine gets its chance to run it).
    A manifest published before records existed (or with --no-smoke) has none: those digests are tested.
    engine_names: platform -> the name of the engine its smoke runs on now (absent: the default engine).
    """
    out: dict[str, dict] = {}
    for service, manifest in previous.items():
        if not (manifest.get("smoke") or {}).get("ran"):
            continue
        for platform, entry in manifest["platforms"].items():
            for backend, spec in entry["backends"].items():
                rec = spec.get("smoke")
                if not rec:
                    continue
                if rec["result"] == "partial" and not (
                        project.smoke.allows_partial(variant_label(service, backend, platform))
                        and rec.get("engine") == engine_names.get(platform, DEFAULT_ENGINE)):
                    continue
                out[spec["image"]] = {**rec, "reused": True}
    return out


def smoke_gate(project: Project, checked: list, reused: dict[str, dict], previous: dict[str, dict]) -> SmokeGate:
    """The records of this publish's smoke gate; refuses partial variants the project does not allow by name.

    checked: the VariantResults of this publish (all passed); reused: reusable_records' answer.
    """
    refused = [r for r in checked if r.result == "partial" and not project.smoke.allows_partial(r.label())]
    if refused:
        raise PartialNotAllowed(refused, project.file.name)
    records = dict(reused)
    for r in checked:
        rec = r.record()
        if r.result == "partial":
            rec["allowed_by"] = ALLOW_PARTIAL
        records[r.variant.image] = rec
    return SmokeGate(True, records, previous)


class PartialNotAllowed(EnvironmentProblem):
    """Variants whose service never started, which the project does not allow to be promoted that way."""

    def __init__(self, partial, file: str):
        self.partial = partial
        names = [r.label() for r in partial]
        why = "; ".join(f"{r.label()}: {r.why_partial}" for r in partial)
        super().__init__(f"smoke was partial (every check that ran passed, but the service itself never started): "
                         f"{why}; nothing was promoted",
                         f"give that platform an engine of its own architecture (smoke.engines or builders in "
                         f"{file}), or allow promoting them as partial: smoke: {{allow_partial: {names}}} "
                         "(the backend manifest records it)")
