"""The backend manifest: its format, and how it travels as an OCI artifact.

One JSON document per service and version (schema:
orchestrator/data/backend-manifest.schema.json) names, per platform, every
backend's image by digest, its index, its requirements (CUDA line, driver,
GPU archs), its SBOM and its smoke record, and the fallback order. It is
pushed as an OCI artifact (its own artifactType, an empty config, the JSON as
its one layer) under `<version>-backends`, last, so a reader never sees it
name something that is not there. `publish` writes it, `select`, `run`,
`verify` and `engine.gc` read it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jsonschema

from orchestrator.common.errors import UserError
from orchestrator.oci.registry import (
    EMPTY_JSON,
    OCI_EMPTY,
    OCI_MANIFEST,
    Registry,
    sha256_digest,
    split_ref,
)

ARTIFACT_TYPE = "application/vnd.orchestrator.backends.v1+json"
SCHEMA_VERSION = 2  # 2: several CUDA lines per platform, each with driver and GPU-arch requirements
SCHEMA_FILE = "manifests/backend-manifest.schema.json"  # a link to the packaged copy
REPUBLISH = "re-publish with `invoke publish` (or pass --manifest with a v2 file)"


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


def check_schema_version(manifest: dict, source: str) -> None:
    """Refuse a manifest of another shape with its own message (not a schema dump).
    A manifest that is not an object is left to the schema check."""
    if not isinstance(manifest, dict):
        return
    want = f"this orchestrator reads schemaVersion {SCHEMA_VERSION}"
    if "schemaVersion" not in manifest:
        raise UserError(f"{source}: backend manifest has no schemaVersion; {want}", REPUBLISH)
    v = manifest["schemaVersion"]
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{source}: backend manifest schemaVersion {v!r} is not an integer; {want}", REPUBLISH)
    if v == 1:
        raise UserError(f"{source}: backend manifest schemaVersion 1 is the old shape (one CUDA line, "
                        f"no compute capabilities); {want}", REPUBLISH)
    if v > SCHEMA_VERSION:
        raise UserError(f"{source}: backend manifest schemaVersion {v} is newer than this orchestrator "
                        f"reads ({SCHEMA_VERSION})", "upgrade the orchestrator, or " + REPUBLISH)
    if v != SCHEMA_VERSION:
        raise UserError(f"{source}: backend manifest schemaVersion {v} is not a known version; {want}", REPUBLISH)


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def artifact_tag(version: str) -> str:
    return f"{version}-backends"


def artifact_manifest(payload: bytes, title: str) -> bytes:
    """The OCI artifact manifest that carries a backend manifest: an empty config, the JSON as its one layer."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": OCI_EMPTY, "digest": sha256_digest(EMPTY_JSON), "size": len(EMPTY_JSON)},
        "layers": [{"mediaType": ARTIFACT_TYPE, "digest": sha256_digest(payload), "size": len(payload),
                    "annotations": {"org.opencontainers.image.title": title}}],
    }, sort_keys=True, separators=(",", ":")).encode()


def push_artifact(reg: Registry, name: str, tag: str, payload: bytes, title: str) -> tuple[str, int]:
    """The JSON as the one layer of an OCI artifact with an empty config."""
    _, sent_config = reg.upload_blob(name, EMPTY_JSON)
    _, sent_layer = reg.upload_blob(name, payload)
    digest, sent_manifest = reg.put_manifest_if_changed(name, tag, artifact_manifest(payload, title), OCI_MANIFEST)
    return digest, sent_config + sent_layer + sent_manifest


def fetch_manifest(ref: str, login=None) -> dict:
    """Read a backend manifest artifact (repo:<version>-backends), verifying digests and schema.

    login: the environment's login (registry.EnvLogin), sent only if it is for ref's host.
    """
    return fetch_artifact(ref, login)[0]


def fetch_artifact(ref: str, login=None) -> tuple[dict, str]:
    """(the backend manifest, the digest of the artifact it came in): digests and schema verified."""
    host, name, reference = split_ref(ref)
    reg = Registry(host, login=login)
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
    return manifest, m.digest


def smoke_record(manifest: dict, platform: str, backend: str) -> tuple[dict | None, dict]:
    """(the backend's smoke record or None, the manifest's top-level smoke section)."""
    spec = ((manifest.get("platforms") or {}).get(platform) or {}).get("backends", {}).get(backend) or {}
    return spec.get("smoke"), manifest.get("smoke") or {}


def describe_smoke(record: dict | None, top: dict | None = None) -> str:
    """One line saying what a backend's smoke record says ran (select, run and publish print it)."""
    if not record:
        if top is not None and not top.get("ran", True):
            return "not smoke-tested (published with --no-smoke)"
        return "no smoke record for this image (published before per-image records)"
    where = (record.get("engine") or "an engine") + ("" if record.get("native", True) else " under QEMU")
    when = ", by an earlier publish of the same digest" if record.get("reused") else ""
    checks = len(record.get("checks") or [])
    if record["result"] == "ran":
        return f"ran: the service answered /health, /ready and /info; {checks} checks passed on {where}{when}"
    why = (record.get("service") or {}).get("why_not") or "the service was not started"
    return (f"PARTIAL: {why}; {checks} other checks passed on {where}{when}; promoted as partial because "
            f"{record.get('allowed_by') or 'smoke.allow_partial'} names it")


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
