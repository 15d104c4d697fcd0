"""Stage 6: publish. Images, then indexes, then the backend manifest last.

Order: blobs -> per-arch manifests (both by `build`, which skips what the
registry has) -> one OCI image index per (service, version, backend) ->
the nested backend manifest, pushed as an OCI artifact under
`<version>-backends` only after everything it names exists. A publish that
fails midway leaves the previous backend manifest in place; a re-run with
nothing changed uploads 0 bytes.
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
from .errors import EnvironmentProblem, UserError
from .files import atomic_write
from .registry import EMPTY_JSON, OCI_EMPTY, OCI_MANIFEST, Registry, sha256_digest, split_ref
from .spec import Project

ARTIFACT_TYPE = "application/vnd.orchestrator.backends.v1+json"
SCHEMA_FILE = "manifests/backend-manifest.schema.json"  # a link to the packaged copy
# Preference when a platform offers several backends: the default is the first.
BACKEND_PREFERENCE = ("cuda", "cpu")


@dataclass
class PublishReport:
    builds: list = field(default_factory=list)
    manifests: dict[str, Path] = field(default_factory=dict)  # service -> file written
    artifacts: dict[str, str] = field(default_factory=dict)  # service -> ref@digest
    uploaded_bytes: int = 0


@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads(resources.files("orchestrator").joinpath("data/backend-manifest.schema.json").read_text())


def validate(manifest: dict, source: str) -> None:
    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise UserError(f"{source}: backend manifest invalid at {where}: {e.message}",
                        f"it must match {SCHEMA_FILE}")


def _image_size(reg: Registry, name: str, digest: str) -> int:
    m = reg.get_manifest(name, digest).json
    return m["config"]["size"] + sum(layer["size"] for layer in m["layers"])


def backend_manifest(project: Project, service: str, results: list) -> dict:
    """The nested manifest for one service from this run's build results."""
    compat = compat_mod.load()
    svc = project.services[service]
    reg = Registry(project.registry)
    by = {(r.image.key, r.image.backend.name, r.image.platform): r for r in results}
    platforms: dict[str, dict] = {}
    for platform in project.platforms:
        here = [b for b in BACKEND_PREFERENCE if b in svc.backends and platform in project.backends[b].platforms]
        if not here:
            continue
        entry = {"default": here[0], "fallback": here, "backends": {}}
        for bname in here:
            backend = project.backends[bname]
            r = by.get((service, bname, platform))
            if r is None:
                raise EnvironmentProblem(f"{service}/{bname} for {platform} was not built in this run")
            _, name, _ = split_ref(r.image.ref("x"))
            index = reg.get_manifest(name, r.image.human_tags[0])
            if index is None:
                raise EnvironmentProblem(f"{r.image.repository}:{r.image.human_tags[0]} vanished from the registry "
                                         "while publishing", "re-run `invoke publish`")
            spec = {"image": f"{r.image.repository}@{r.digest}", "index": f"{r.image.repository}@{index.digest}",
                    "size": _image_size(reg, name, r.digest), "torch": backend.torch_for(platform)}
            if backend.is_cuda:
                libs = by[("cuda-libs", bname, platform)]
                spec["requires"] = {"cuda": backend.cuda, "driver": ">=" + compat.cuda(backend.cuda).min_driver}
                spec["cuda_libs"] = {"tag": libs.image.human_tags[0], "digest": libs.digest}
            entry["backends"][bname] = spec
        platforms[platform] = entry
    manifest = {"schemaVersion": 1, "project": project.name, "service": service, "version": svc.version,
                "platforms": platforms}
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


def load_manifest_file(path: str) -> dict:
    try:
        manifest = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read the backend manifest ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    validate(manifest, path)
    return manifest


def publish(project: Project, services: list[str] | None = None, log=print) -> PublishReport:
    report = PublishReport()
    stats = {"index_bytes": 0}
    report.builds = build_mod.build(project, services=services, log=log, stats=stats)
    report.uploaded_bytes = sum(r.uploaded_bytes for r in report.builds) + stats["index_bytes"]
    reg = Registry(project.registry)
    # Backend manifests last: everything they name now exists.
    for service in services or list(project.services):
        manifest = backend_manifest(project, service, report.builds)
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
