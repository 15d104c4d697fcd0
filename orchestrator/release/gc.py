"""`engine.gc`: free the embedded registry's disk.

Reads every tag of every repository (the inventory), lets the retention
policy (orchestrator.release.retention, pure) decide which content tags go,
deletes those manifests through the registry API, then stops the registry,
runs `docker-registry garbage-collect` for the blobs nothing names any more,
and starts it again.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.machine.registry_server import (
    Local,
    local_registry,
    serve,
    serving,
    stop,
)
from orchestrator.machine.system import say
from orchestrator.oci.backends import ARTIFACT_TYPE
from orchestrator.oci.registry import Registry
from orchestrator.release import retention


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def catalog(reg: Registry) -> list[str]:
    """Every repository, following the Link header's pages."""
    found: list[str] = []
    url, seen = "/v2/_catalog?n=1000", set()
    while url and url not in seen:
        seen.add(url)
        resp = reg._request("GET", url)
        if resp.status_code != 200:
            raise EnvironmentProblem(f"registry {reg.host}: listing repositories gave {resp.status_code}",
                                     "engine.gc needs the catalog API (docker-registry serves it)")
        found += resp.json().get("repositories") or []
        nxt = resp.links.get("next", {}).get("url")
        url = urljoin(resp.url, nxt) if nxt else None
    return sorted(set(found))


def _describe(reg: Registry, repo: str, digest: str, body: bytes, want_config: bool,
              manifests: dict, backend_manifests: list) -> None:
    known = manifests.get(digest)
    if known is not None and (known.platform or not want_config or not known.layers):
        return
    m = json.loads(body)
    if "manifests" in m:  # an index or manifest list
        children = tuple(c["digest"] for c in m["manifests"])
        manifests[digest] = retention.ManifestInfo(digest, children=children)
        for child in children:
            if child not in manifests:
                cm = reg.get_manifest(repo, child)
                if cm is not None:
                    _describe(reg, repo, child, cm.body, False, manifests, backend_manifests)
        return
    config = m.get("config") or {}
    layers = m.get("layers") or []
    blobs = tuple((d["digest"], int(d.get("size", 0))) for d in [config, *layers] if d.get("digest"))
    if m.get("artifactType") == ARTIFACT_TYPE and layers:
        try:
            backend_manifests.append(json.loads(reg.get_blob(repo, layers[0]["digest"])))
        except (ValueError, EnvironmentProblem, UserError):
            pass  # unreadable: it names nothing we can keep for it
        manifests[digest] = retention.ManifestInfo(digest, blobs=blobs)
        return
    platform, ours = None, False
    if want_config and config.get("digest"):
        try:
            cfg = json.loads(reg.get_blob(repo, config["digest"]))
            platform = f"{cfg.get('os')}/{cfg.get('architecture')}"
            ours = retention.is_built_here((cfg.get("config") or {}).get("Labels"))
        except (ValueError, EnvironmentProblem, UserError):
            pass  # not an image config we read: never treated as ours
    manifests[digest] = retention.ManifestInfo(digest, tuple(d["digest"] for d in layers), (), blobs, platform, ours)


def inventory(reg: Registry, local: Local, log=say) -> retention.Inventory:
    """Every tag of every repository, the manifests they name, and the backend manifests among them."""
    tags: list[retention.Tag] = []
    manifests: dict[str, retention.ManifestInfo] = {}
    backend_manifests: list[dict] = []
    repos = catalog(reg)
    for repo in repos:
        for tag in reg.tags(repo):
            m = reg.get_manifest(repo, tag)
            if m is None:
                continue  # deleted while we looked
            tags.append(retention.Tag(repo, tag, m.digest, local.pushed(repo, tag)))
            _describe(reg, repo, m.digest, m.body, bool(retention.CONTENT_TAG.match(tag)), manifests,
                      backend_manifests)
    log(f"{reg.host}: {len(repos)} repositories, {len(tags)} tags, {len(backend_manifests)} backend manifests")
    return retention.Inventory(tuple(tags), manifests, tuple(backend_manifests))


@dataclass(frozen=True)
class GcReport:
    plan: retention.Plan
    dry_run: bool
    storage: Path
    freed: int = 0  # bytes the storage shrank by (a real run)

    def summary(self) -> str:
        p = self.plan
        repos = len({d.repository for d in p.delete})
        kept = f"kept {len(p.kept)} content tag(s) (referenced, or the newest of their line)"
        if self.dry_run:
            return (f"dry run: would delete {p.deleted_tags} content tag(s) ({len(p.delete)} manifests in {repos} "
                    f"repositories), {kept}; would free up to {p.reclaimable / 1e6:,.1f} MB")
        return (f"deleted {p.deleted_tags} content tag(s) ({len(p.delete)} manifests in {repos} repositories), "
                f"{kept}; freed {self.freed / 1e6:,.1f} MB in {self.storage}")


def gc(host: str, keep: int = 2, dry_run: bool = False, log=say, config: Path | None = None,
       login=None) -> GcReport | str:
    """Apply the retention policy, then free the blobs nothing names any more.

    Deletes through the registry API (DELETE of each unreferenced content
    manifest by digest, which drops its tags), then stops the registry, runs
    `docker-registry garbage-collect` and starts it again. Not
    `--delete-untagged`: in docker-registry 2.8 it deletes the untagged
    per-platform manifests of any multi-platform index other tools pushed.
    The caller holds the registry's push lock alone (pipeline.gc).
    config: the config the registry on host is served from (default: the
    embedded registry's); a string comes back when host is not served here.
    """
    if keep < 0:
        raise UserError(f"--keep {keep} is below 0", "pass how many recent builds of each image line to keep, e.g. --keep 2")
    local = local_registry(host, config)
    if local is None:
        return f"{host} is not the embedded registry; nothing to do (use your registry's own garbage collection)"
    reg = Registry(host, retries=1, timeout=30, login=login)
    if not reg.ping():
        raise EnvironmentProblem(f"registry {host} is not answering", "start it with `invoke engine.up`")
    if not serving(local.config):
        raise EnvironmentProblem(f"{host} answers, but not from {local.config}; its storage may not be {local.storage}",
                                 "run gc where that registry runs, with its own tools")
    decided = retention.plan(inventory(reg, local, log), keep)
    for d in decided.delete:
        log(f"{'would delete' if dry_run else 'delete'} {d.repository}:{','.join(d.tags)} ({d.digest[:19]})")
    if dry_run:
        return GcReport(decided, True, local.storage)
    before = _tree_bytes(local.storage)
    for d in decided.delete:
        resp = reg._request("DELETE", f"/v2/{d.repository}/manifests/{d.digest}", repo=d.repository)
        if resp.status_code not in (202, 404):
            raise EnvironmentProblem(f"registry {host}: deleting {d.repository}@{d.digest} gave {resp.status_code}: "
                                     f"{resp.text[:200]}", "is deletion enabled (storage.delete.enabled: true)?")
    log(f"stopping the registry on {host} for garbage-collect")
    stop(local.config)
    try:
        proc = subprocess.run(["docker-registry", "garbage-collect", str(local.config)], capture_output=True, text=True)
    finally:
        serve(local.config, host, local.log)
    if proc.returncode != 0:
        raise EnvironmentProblem("docker-registry garbage-collect failed:\n" + proc.stderr[-1000:])
    return GcReport(decided, False, local.storage, before - _tree_bytes(local.storage))
