"""A variant's image in the engine, made from what the tool holds instead of pulled back from the registry.

Smoke tests exactly the published digest: the manifest and config are read
from the registry by digest (the client checks both), and the image the
engine runs is the one whose ID is that config digest. On an engine on
this machine the image is loaded (`docker load`) from a docker-archive made
of the blobs in the tool's BlobCache (orchestrator.oci.docker_archive),
a blob that is not there streamed from the registry instead; a layer whose
chain ID the engine already has (found in the local images' RootFS) is not
sent at all, so after an app-only change only the app layer and the config
travel. The engine checks every layer it unpacks against the config's
diffIDs and names the image by the config digest, the ID a pull would
give; the check line "image" says so for each variant.

An engine on another machine (DOCKER_HOST=tcp://gpu-host, ssh://) pulls
from the registry as a GPU host does (`invoke run` always pulls).

What smoke loaded stays in the engine between groups and runs, so the
large shared layers (CUDA libraries, torch) are loaded once. Loaded images
are tagged `<repository>:smoke-<config hex 12>` and recorded per engine
(orchestrator.machine.kept); beyond the disk budget (ORCH_SMOKE_KEEP_GB,
default 24 GB of unpacked layers) the least recently used are untagged, and
the engine frees the layers no other image uses. Images smoke found in the
engine (a pull of the user's) are never removed by it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from orchestrator.common import meter
from orchestrator.machine.kept import Kept, budget, engine_key
from orchestrator.oci import docker_archive as archive
from orchestrator.oci import layers as layers_mod
from orchestrator.oci.registry import Registry, docker_auth_config, split_ref
from orchestrator.release.smoke.checks import Check

TAG_PREFIX = "smoke-"


# --- what the registry says the image is ------------------------------------------

@dataclass(frozen=True)
class Published:
    """A per-platform image as the registry holds it: manifest by digest, config bytes, layer descriptors."""

    ref: str  # host/name@sha256:manifest
    host: str
    name: str
    config: bytes
    layers: tuple[tuple[str, dict], ...]  # (diffID, descriptor)

    @property
    def image_id(self) -> str:
        return archive.ArchiveImage(self.config, ()).image_id

    @property
    def tag(self) -> str:
        return f"{self.host}/{self.name}:{TAG_PREFIX}{self.image_id.split(':', 1)[1][:12]}"


def is_published(ref: str) -> bool:
    """A registry reference by digest (host/name@sha256:...), not a local image name."""
    host, _, reference = split_ref(ref)
    return reference.startswith("sha256:") and ("." in host or ":" in host or host == "localhost")


def read_published(reg: Registry, ref: str, platform: str) -> Published:
    host, name, digest = split_ref(ref)
    m = reg.get_manifest(name, digest)
    if m is None:
        raise LookupError(f"{ref} is not in {host}")
    body = m.json
    if "manifests" in body:  # an index: this platform's entry
        os_, arch = platform.split("/")
        entry = next((d for d in body["manifests"] if d.get("platform", {}).get("os") == os_
                      and d.get("platform", {}).get("architecture") == arch), None)
        if entry is None:
            raise LookupError(f"{ref} has no {platform} image")
        body = reg.get_manifest(name, entry["digest"]).json
    config = reg.get_blob(name, body["config"]["digest"])  # checked against its digest
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    if len(diff_ids) != len(body["layers"]):
        raise LookupError(f"{ref}: {len(body['layers'])} layers but {len(diff_ids)} diffIDs in its config")
    return Published(ref, host, name, config, tuple(zip(diff_ids, body["layers"])))


# --- getting images into the engine ------------------------------------------

@dataclass
class Arrival:
    """How one image got into the engine, for the check line."""

    image_id: str
    how: str  # "loaded" | "present" | "pulled" | "local"
    detail: str = ""


def _layer_sizes(client, image_id: str, config: bytes) -> list[int] | None:
    """Each layer's unpacked size as the engine counts it (its history), None where that cannot be matched."""
    try:
        hist = list(reversed(client.api.history(image_id)))
    except Exception:  # noqa: BLE001
        return None
    cfg_hist = json.loads(config).get("history") or []
    if len(hist) != len(cfg_hist):
        return None
    return [int(h.get("Size") or 0) for h, c in zip(hist, cfg_hist) if not c.get("empty_layer")]


class EngineImages:
    """Brings published images into one engine (loading them from the tool's blobs, or pulling) and keeps
    what it loaded within the disk budget. Thread-safe: the checks of a group ask for their images at once."""

    def __init__(self, client, cache: layers_mod.BlobCache | None = None, pull: bool = False,
                 kept: Kept | None = None, log=None, login=None):
        self.client, self.pull, self.log = client, pull, log or (lambda *_: None)
        self.login = login  # the environment's login (registry.EnvLogin): sent to its own registry only
        self._cache = cache
        self._kept = kept
        self._lock = threading.RLock()
        self._registries: dict[str, Registry] = {}
        self._published: dict[tuple[str, str], Published] = {}
        self._arrivals: dict[str, Arrival] = {}  # image ref -> how it came

    @property
    def cache(self) -> layers_mod.BlobCache:
        if self._cache is None:
            self._cache = layers_mod.default_cache()
        return self._cache

    @property
    def kept(self) -> Kept:
        if self._kept is None:
            self._kept = Kept(engine_key(self.client), budget()[0])
        return self._kept

    def _registry(self, host: str) -> Registry:
        if host not in self._registries:
            self._registries[host] = Registry(host, login=self.login)
        return self._registries[host]

    def published(self, ref: str, platform: str) -> Published:
        key = (ref, platform)
        if key not in self._published:
            self._published[key] = read_published(self._registry(split_ref(ref)[0]), ref, platform)
        return self._published[key]

    def _has(self, image_id: str) -> bool:
        try:
            self.client.images.get(image_id)
            return True
        except Exception:  # noqa: BLE001 - not here
            return False

    def present_chains(self) -> set[str]:
        """Chain IDs of every layer the engine holds under an image."""
        found: set[str] = set()
        for summary in self.client.api.images(all=True):
            try:
                layers = self.client.api.inspect_image(summary["Id"]).get("RootFS", {}).get("Layers") or []
            except Exception:  # noqa: BLE001 - removed meanwhile
                continue
            found |= set(archive.chain_ids(layers))
        return found

    def _archive_image(self, pub: Published) -> tuple[archive.ArchiveImage, dict[str, str]]:
        """The image as docker-archive entries; and where each layer's bytes come from (by blob digest)."""
        layers, source = [], {}
        for diff_id, desc in pub.layers:
            opener, source[desc["digest"]] = self._blob(pub, desc)
            layers.append(archive.ArchiveLayer(diff_id, desc["digest"], desc["size"], opener))
        return archive.ArchiveImage(pub.config, tuple(layers), (pub.tag,)), source

    def _blob(self, pub: Published, desc: dict) -> tuple[Callable[[], IO[bytes]], str]:
        """(an opener of a layer blob's bytes, where they come from): the blob cache, else the registry."""
        path = self.cache.blob_path(desc["digest"])
        if path.is_file() and path.stat().st_size == desc["size"]:
            return (lambda: open(path, "rb")), "blob cache"
        reg = self._registry(pub.host)
        return (lambda: reg.open_blob(pub.name, desc["digest"]).raw), "registry"

    def layers_of(self, ref: str, platform: str) -> tuple[list[str], list[int], Callable[[int], IO[bytes]]] | None:
        """(the image's diffIDs, each layer blob's size, an opener of layer i's blob), for the bytecode
        cache; None for a local image (not from a registry)."""
        if not is_published(ref):
            return None
        pub = self.published(ref, platform)
        return ([d for d, _ in pub.layers], [int(desc["size"]) for _, desc in pub.layers],
                lambda i: self._blob(pub, pub.layers[i][1])[0]())

    def prepare(self, wanted: list[tuple[str, str]]) -> dict[str, Arrival]:
        """Every (image ref, platform) in the engine; the missing ones in one load. Returns ref -> Arrival."""
        with self._lock:
            todo: list[tuple[str, Published]] = []
            for ref, platform in wanted:
                if ref in self._arrivals:
                    continue
                if not is_published(ref):
                    self._arrivals[ref] = Arrival(self.client.images.get(ref).id, "local")
                    continue
                pub = self.published(ref, platform)
                if self._has(pub.image_id):
                    self._arrivals[ref] = Arrival(pub.image_id, "present")
                else:
                    todo.append((ref, pub))
            if todo:
                (self._pull if self.pull else self._load)(todo)
            self.kept.touch({a.image_id for r, _ in wanted if (a := self._arrivals.get(r)) is not None})
            return {ref: self._arrivals[ref] for ref, _ in wanted if ref in self._arrivals}

    def _pull(self, todo: list[tuple[str, Published]]) -> None:
        for ref, pub in todo:
            started = time.monotonic()
            platform = json.loads(pub.config)
            self.client.images.pull(ref, platform=f"{platform['os']}/{platform['architecture']}",
                                    auth_config=docker_auth_config(pub.host, self.login))
            self._arrivals[ref] = Arrival(pub.image_id, "pulled",
                                          f"pulled from {pub.host} in {time.monotonic() - started:.1f} s")

    def _load(self, todo: list[tuple[str, Published]]) -> None:
        images, sources = [], {}
        for _, pub in todo:
            img, src = self._archive_image(pub)
            images.append(img)
            sources.update(src)
        present = self.present_chains()
        started = time.monotonic()
        try:
            which = self._send(images, present)
        except LoadFailed:
            # An image holding a layer we left out was removed meanwhile: send everything.
            present = set()
            which = self._send(images, present)
        took = time.monotonic() - started
        meter.add("smoke", 0.0, which.sent_bytes)  # bytes into the engine (the seconds are smoke's own)
        for (ref, pub), img in zip(todo, images):
            chains = archive.chain_ids(img.diff_ids)
            sent = [lay for lay, c in zip(img.layers, chains) if c not in present]
            size = {"blob cache": 0, "registry": 0}
            for lay in sent:
                size[sources[lay.digest]] += lay.size
            parts = [f"{_size(n)} from the {where}" for where, n in size.items() if n] or ["the config only"]
            together = f" with {len(todo) - 1} other image(s)" if len(todo) > 1 else ""
            detail = (f"loaded{together} in {took:.1f} s: {len(sent)} of {len(img.layers)} layers sent "
                      f"({', '.join(parts)}), {len(img.layers) - len(sent)} already in the engine")
            self._arrivals[ref] = Arrival(pub.image_id, "loaded", detail)
            sizes = _layer_sizes(self.client, pub.image_id, pub.config) or [lay.size for lay in img.layers]
            self.kept.add(pub.image_id, pub.tag, list(zip(chains, sizes)))

    def _send(self, images: list[archive.ArchiveImage], present: set[str]) -> archive.Plan:
        which = archive.plan(images, present)
        try:
            out = self.client.api.load_image(archive.stream(images, present), quiet=False)
            for chunk in out:
                if "errorDetail" in chunk or "error" in chunk:
                    raise LoadFailed((chunk.get("errorDetail") or {}).get("message") or chunk.get("error"))
        except LoadFailed:
            raise
        except Exception as e:  # noqa: BLE001 - the engine refused the archive
            raise LoadFailed(str(e)) from None
        return which

    def ensure(self, ref: str, platform: str) -> tuple[str | None, Check]:
        """(what to run: the image ID, or the local name; the "image" check line). None when it is not there."""
        try:
            arrival = self.prepare([(ref, platform)])[ref]
        except Exception as e:  # noqa: BLE001 - no such image, registry down, load refused: this variant fails
            return None, Check("image", False, f"cannot get {ref} into the engine: {str(e)[:300]}")
        if arrival.how == "local":
            return ref, Check("image", True, f"local image {arrival.image_id[:19]} (not from a registry)")
        try:
            engine_id = self.client.images.get(arrival.image_id).id
        except Exception as e:  # noqa: BLE001
            return None, Check("image", False, f"{arrival.image_id[:19]} is not in the engine after all: {e}")
        same = engine_id == arrival.image_id
        what = {"present": "already in the engine", "loaded": arrival.detail, "pulled": arrival.detail}[arrival.how]
        return engine_id, Check("image", same, f"engine image ID {engine_id[:19]} "
                                + ("= " if same else "!= ") + f"the published config digest of {ref.split('@')[-1][:19]}"
                                + f" ({what})")

    def image_ids(self, refs) -> set[str]:
        return {self._arrivals[r].image_id for r in refs if r in self._arrivals}

    def trim(self, keep: set[str] = frozenset()) -> list[str]:
        """Untag the least recently used images smoke loaded until the rest fit the budget; returns their tags.

        keep: image IDs in use now (a group being tested), kept even above the budget.
        """
        with self._lock:
            kept = self.kept
            gone = [i for i in kept.images() if not self._has(i)]
            if gone:
                kept.forget(gone)
            removed = []
            for image_id, entry in kept.over_budget(set(keep)):
                try:
                    self.client.images.remove(entry["tag"])
                except Exception as e:  # noqa: BLE001 - in use by a container, or the tag is gone
                    if "No such image" not in str(e) and "404" not in str(e):
                        continue
                kept.forget([image_id])
                removed.append(entry["tag"])
            if removed:
                self.log(f"smoke: untagged {len(removed)} image(s) least recently used beyond the disk budget "
                         f"({budget()[1]}): {', '.join(removed)}")
            return removed


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB"


class LoadFailed(Exception):
    pass
