"""Which content tags `engine.gc` deletes (pure: no registry, no files).

`invoke build` pushes every image under a content tag (`0.1.0-cuda-<hash12>`,
`cu124-<hash12>`, see plan.content_tag), and every change to a lock, a
Dockerfile or the app makes a new one, so they pile up. The policy:

* Kept: everything a human tag or a backend manifest references. A human
  tag is any tag that is not a content tag (`0.1.0-cuda`, `cu124-v1`,
  `0.1.0-backends`, the base's tags, whatever else people push); a backend
  manifest names image and index digests and its CUDA-libs image's digest.
  An index keeps its children, and an image keeps its parent: a content
  image whose layers are the lower part of a kept image's layers (the
  CUDA-libs image a CUDA service is built on, by content tag), so the next
  build finds it and rebuilds nothing.
* Kept: the newest `keep` releases of each image line. A release is one
  content tag, i.e. one build of one image for one platform; its line is
  (repository, content-tag prefix, platform), e.g. (`morgan/tts`,
  `0.1.0-cuda`, linux/amd64) or (`morgan/cuda-libs`, `cu124`, linux/amd64).
  Newest means most recently pushed: the registry API has no push time
  (configs carry SOURCE_DATE_EPOCH), so the caller reads when each tag was
  last written from the registry's storage.
* Deleted: every other manifest that only content tags name. A tag is a
  content tag only if it looks like one (`<prefix>-<12 hex>`) *and* names an
  image this tool built (its config carries `io.orchestrator.*` labels), so
  nobody else's `v1-0123456789ab` is touched.
* Deleted with an image: its referrers (the SBOMs and provenance `publish`
  attaches), found through the referrers tag schema (`sha256-<hex of the
  image digest>`, an index whose children are the referrer artifacts), and
  its signatures (cosign's `sha256-<hex>.sig` beside it, and `.att`/`.sbom`
  should cosign have put them there). A kept image keeps all of them: they
  are tags of their own, never content tags.

Keeping works on digests across the whole registry: a digest kept in one
repository is kept in every repository (the same bytes; deleting it
elsewhere would free nothing). Deleting a manifest deletes every tag naming
it in that repository, which is why a digest that any human tag names is
never deleted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from orchestrator.build.plan import LABEL_PREFIX

CONTENT_TAG = re.compile(r"^(?P<prefix>.+)-(?P<hash>[0-9a-f]{12})$")
REFERRERS_TAG = re.compile(r"^sha256-(?P<hex>[0-9a-f]{64})$")  # OCI 1.1 referrers tag schema
SIGNATURE_TAG = re.compile(r"^sha256-(?P<hex>[0-9a-f]{64})\.(?:sig|att|sbom)$")  # cosign's tags beside a digest


@dataclass(frozen=True)
class ManifestInfo:
    """What gc needs to know of one manifest (the same digest is the same manifest in any repository)."""

    digest: str
    layers: tuple[str, ...] = ()  # an image's layer digests, bottom-up
    children: tuple[str, ...] = ()  # an index's manifests
    blobs: tuple[tuple[str, int], ...] = ()  # (digest, size) of its config and layers
    platform: str | None = None  # from an image's config
    built_here: bool = False  # its config carries io.orchestrator.* labels


@dataclass(frozen=True)
class Tag:
    repository: str
    tag: str
    digest: str
    pushed: float = 0.0  # when the tag was last written (seconds since the epoch)


@dataclass(frozen=True)
class Inventory:
    tags: tuple[Tag, ...]
    manifests: Mapping[str, ManifestInfo]  # digest -> info, for every tagged manifest and index child
    backend_manifests: tuple[dict, ...] = ()  # the JSON of every backend manifest artifact found


@dataclass(frozen=True)
class Deletion:
    repository: str
    digest: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    delete: tuple[Deletion, ...]
    kept: Mapping[tuple[str, str], str] = field(default_factory=dict)  # (repository, content tag) -> why
    reclaimable: int = 0  # bytes of blobs only deleted manifests name (an upper bound on what gc frees)

    @property
    def deleted_tags(self) -> int:
        return sum(len(d.tags) for d in self.delete)


def is_content_tag(tag: Tag, manifests: Mapping[str, ManifestInfo]) -> bool:
    info = manifests.get(tag.digest)
    return bool(CONTENT_TAG.match(tag.tag)) and info is not None and info.built_here


def is_built_here(labels: Mapping[str, str] | None) -> bool:
    """An image config's labels say this tool built it."""
    return any(k.startswith(LABEL_PREFIX + ".") for k in labels or {})


def _repository_of(ref: str) -> str:
    """'host:port/ns/name@sha256:...' -> 'ns/name' (the registry host is the first path part)."""
    name = ref.split("@", 1)[0]
    return name.split("/", 1)[1] if "/" in name else name


def manifest_references(manifest: dict) -> set[str]:
    """Every digest a backend manifest names: images, indexes, CUDA-libs images."""
    found: set[str] = set()
    for entry in (manifest.get("platforms") or {}).values():
        for spec in (entry.get("backends") or {}).values():
            for key in ("image", "index"):
                if "@" in (spec.get(key) or ""):
                    found.add(spec[key].split("@", 1)[1])
            libs = spec.get("cuda_libs") or {}
            if libs.get("digest"):
                found.add(libs["digest"])
    return found


def _closure(seeds: set[str], manifests: Mapping[str, ManifestInfo], candidates: list[ManifestInfo]) -> set[str]:
    """Seeds, their index children, and the parents (by layer prefix) of every image among them."""
    kept: set[str] = set()
    todo = list(seeds)
    prefixes: set[tuple[str, ...]] = set()
    while True:
        while todo:
            digest = todo.pop()
            if digest in kept:
                continue
            kept.add(digest)
            info = manifests.get(digest)
            if info is None:
                continue
            todo += [c for c in info.children if c not in kept]
            prefixes.update(info.layers[:i] for i in range(1, len(info.layers)))
        parents = [m.digest for m in candidates if m.digest not in kept and m.layers and m.layers in prefixes]
        if not parents:
            return kept
        todo += parents


def plan(inventory: Inventory, keep: int) -> Plan:
    """Decide what gc deletes: see the module docstring for the policy."""
    if keep < 0:
        raise ValueError("keep must be 0 or more")
    manifests = inventory.manifests
    content = [t for t in inventory.tags if is_content_tag(t, manifests)]
    human = [t for t in inventory.tags if not is_content_tag(t, manifests)]
    why: dict[str, str] = {}
    for t in human:
        why.setdefault(t.digest, f"human tag {t.repository}:{t.tag}")
    for m in inventory.backend_manifests:
        for d in manifest_references(m):
            why.setdefault(d, f"backend manifest {m.get('project', '?')}/{m.get('service')} {m.get('version')}")
    lines: dict[tuple[str, str, str | None], list[Tag]] = {}
    for t in content:
        prefix = CONTENT_TAG.match(t.tag)["prefix"]
        lines.setdefault((t.repository, prefix, manifests[t.digest].platform), []).append(t)
    for (repo, prefix, platform), tags in lines.items():
        newest: list[str] = []
        for t in sorted(tags, key=lambda t: (-t.pushed, t.tag)):
            if len(newest) >= keep:
                break
            if t.digest not in newest:
                newest.append(t.digest)
        for rank, d in enumerate(newest, 1):
            why.setdefault(d, f"newest {keep} of {repo} {prefix} {platform or '?'} (#{rank})")
    referenced = set(why)
    candidates = [manifests[t.digest] for t in content]
    kept = _closure(referenced, manifests, candidates)
    for d in kept - referenced:
        why[d] = "parent or child of a kept image"

    by_repo: dict[tuple[str, str], list[str]] = {}
    for t in content:
        if t.digest not in kept:
            by_repo.setdefault((t.repository, t.digest), []).append(t.tag)
    gone_images = {d for _, d in by_repo}
    for t in human:  # an image's referrers and signatures go with it: the referrers index and each artifact it lists
        m = REFERRERS_TAG.match(t.tag) or SIGNATURE_TAG.match(t.tag)
        if m and "sha256:" + m["hex"] in gone_images and (t.repository, "sha256:" + m["hex"]) in by_repo:
            by_repo.setdefault((t.repository, t.digest), []).append(t.tag)
            for child in manifests[t.digest].children if t.digest in manifests else ():
                by_repo.setdefault((t.repository, child), [])
    delete = tuple(Deletion(repo, d, tuple(sorted(tags))) for (repo, d), tags in sorted(by_repo.items()))

    gone = {d.digest for d in delete}
    remaining_blobs = {b for t in inventory.tags if t.digest not in gone
                       for b, _ in _blobs(t.digest, manifests)}
    freed = {b: size for d in gone for b, size in _blobs(d, manifests) if b not in remaining_blobs}
    kept_tags = {(t.repository, t.tag): why[t.digest] for t in content if t.digest in kept}
    return Plan(delete, kept_tags, sum(freed.values()))


def _blobs(digest: str, manifests: Mapping[str, ManifestInfo]) -> list[tuple[str, int]]:
    """The blobs a manifest names, through an index's children."""
    info = manifests.get(digest)
    if info is None:
        return []
    out = list(info.blobs)
    for child in info.children:
        out += _blobs(child, manifests)
    return out
