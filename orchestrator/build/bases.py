"""The project's base, present in the registry it builds for.

On a machine or registry that lacks the pinned base (orchestrator.debian.basepin)
it is, in this order: found in the registry, uploaded from the local blob
cache, copied from the registry it was pinned in, or bootstrapped again
(orchestrator.debian.bootstrap) and checked against the pin. A configured
image that cannot be pulled is an error naming the cause; bootstrapping
happens only where the project says so (`base.bootstrap.when: always`) or
where the image's registry cannot be reached at all, and it is announced.
A base that only QEMU can bootstrap may be made in the background while
the native platforms build (`Bases`).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import atomic_write
from orchestrator.debian import bootstrap as bootstrap_mod
from orchestrator.debian.basepin import (
    PIN_FILE,
    Pin,
    inputs_hash,
    read_pins,
    repository,
    write_pin,
)
from orchestrator.oci import image as image_mod
from orchestrator.oci import layers as layers_mod
from orchestrator.oci.push import push_image
from orchestrator.oci.registry import Registry, split_ref
from orchestrator.project.spec import Project


@dataclass(frozen=True)
class Base:
    """A base present in a registry: what images are assembled on."""

    platform: str
    repository: str  # host/name
    image: image_mod.Image

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.image.digest}"

    @property
    def config(self) -> dict:
        return json.loads(self.image.config)


# --- finding a pinned base ----------------------------------------------

def _from_registry(reg: Registry, name: str, pin: Pin, c: layers_mod.Codec) -> image_mod.Image | None:
    """The pinned base in this registry under its config digest tag, if present and intact."""
    m = reg.get_manifest(name, _tag(pin, c))
    if m is None:
        return None
    body = m.json
    if body["config"]["digest"] != pin.config_digest:
        return None
    cfg = reg.get_blob(name, pin.config_digest)
    layers = tuple(layers_mod.Layer(d, 0, lay["digest"], lay["size"], lay["mediaType"])
                   for d, lay in zip(json.loads(cfg)["rootfs"]["diff_ids"], body["layers"]))
    return image_mod.Image(pin.platform, layers, cfg)


def _tag(pin: Pin, c: layers_mod.Codec) -> str:
    # One tag per (config, compression): the config names the content, the codec the blobs.
    return f"{pin.platform.split('/')[1]}-{pin.config_digest.split(':')[1][:16]}-{c.name}"


def _from_cache(pin: Pin, cache: layers_mod.BlobCache, c: layers_mod.Codec) -> image_mod.Image | None:
    cfg_path = cache.blob_path(pin.config_digest)
    if not cfg_path.exists():
        return None
    found = [layers_mod.transcode(d, cache, c) for d in pin.diff_ids]  # another codec's blob will do
    if any(f is None for f in found):
        return None
    return image_mod.Image(pin.platform, tuple(found), cfg_path.read_bytes())


def _push(reg: Registry, name: str, img: image_mod.Image, tag: str, log, sources=()) -> int:
    return push_image(reg, name, img, tag, log=log, mount_from=sources)


def ensure(project: Project, platform: str, reg: Registry | None = None, cache: layers_mod.BlobCache | None = None,
           log=print, repin: bool = True, defer: bool = False) -> tuple[Base | None, str]:
    """The project's base for platform, present in the project registry; returns (base, what happened).

    With defer, a base that only a bootstrap can make, and that a bootstrap now would make exactly as
    pinned, is left for later: returns (None, why it is safe to wait). Only defer callers get None.
    """
    reg = reg or Registry(project.registry, login=project.login)
    cache = cache or layers_mod.default_cache()
    c = layers_mod.codec(project.compression)
    repo = repository(project)
    _, name, _ = split_ref(repo + ":x")
    pin = read_pins(project).get(platform)
    if pin is not None:
        img = _from_registry(reg, name, pin, c)
        if img is not None:
            return Base(platform, repo, img), "pinned, in the registry"
        img = _from_cache(pin, cache, c)
        if img is not None:
            sent = _push(reg, name, img, _tag(pin, c), log)
            return Base(platform, repo, img), f"pinned, uploaded from the local blob cache ({sent:,} bytes)"
        copied = _copy_from_pinned_registry(pin, reg, name, c, log)
        if copied is not None:
            return Base(platform, repo, copied), f"pinned, copied from {pin.pinned_in.split('@')[0]}"
        if pin.source != "mmdebstrap":
            raise EnvironmentProblem(f"the pinned base for {platform} ({pin.pinned_in}) is in neither "
                                     f"{project.registry} nor the local cache, and its source cannot be reached",
                                     "push it to the registry, or re-pin with `invoke lock --upgrade`")
        if defer:
            moved = bootstrap_mod.pin_moved(pin.packages, platform, project.base.suite)
            if moved is None:
                return None, (f"not bootstrapped yet: the Debian archive still has all {len(pin.packages)} "
                              "pinned packages, so a build can make it later, while other platforms build")
            log(f"[base] {platform}: bootstrapping now, not later: {moved}")
    if pin is None and project.base.bootstrap_when != "always":
        pulled = _pull(project, platform, reg, name, cache, log)
        if pulled is not None:
            return pulled
    img, packages = _bootstrap_once(project, platform, reg, name, cache, c, log)
    if pin is not None and img.config_digest != pin.config_digest:
        moved = bootstrap_mod._diff_packages(pin.packages, packages)
        if not repin:
            raise EnvironmentProblem(f"bootstrapping the base for {platform} again gave {img.config_digest[:19]}, "
                                     f"not the pinned {pin.config_digest[:19]}: the Debian archive moved ({moved})",
                                     "run `invoke lock --upgrade` to pin the new base and commit locks/base.json")
        log(f"[base] {platform}: the Debian archive moved since the pin ({moved}); re-pinning "
            f"{pin.config_digest[:19]} -> {img.config_digest[:19]}; commit {PIN_FILE}")
    tag = f"{platform.split('/')[1]}-{img.config_digest.split(':')[1][:16]}-{c.name}"
    _push(reg, name, img, tag, log)
    new = Pin(platform, "mmdebstrap", img.config_digest, tuple(x.diff_id for x in img.layers), packages,
              f"{repo}@{img.digest}")
    verb = "bootstrapped, matches the pin" if pin is not None and pin.config_digest == new.config_digest else "bootstrapped and pinned"
    if pin is None or pin.config_digest != new.config_digest:
        write_pin(project, new)
    return Base(platform, repo, img), verb


class Bases:
    """Each platform's base for one build, made present by ensure(). A base of a platform in `later`
    that only a bootstrap can make is bootstrapped in a thread; get() waits for it, so a build that
    orders those platforms last overlaps the bootstrap with the others' work."""

    def __init__(self, project: Project, platforms: list[str], later: list[str], reg: Registry,
                 cache: layers_mod.BlobCache, log=print):
        self._log = log
        self._ready: dict[str, Base] = {}
        self._pending: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        for platform in platforms:
            found, how = ensure(project, platform, reg, cache, log=log, defer=platform in later)
            if found is not None:
                self._ready[platform] = found
                continue
            self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="base-bootstrap")
            log(f"[base] {platform}: bootstrapping in the background while the other platforms build ({how})")
            self._pending[platform] = self._pool.submit(ensure, project, platform, None, cache, log)

    @property
    def pending(self) -> set[str]:
        return set(self._pending) - set(self._ready)

    def get(self, platform: str) -> Base:
        if platform not in self._ready:
            job = self._pending[platform]
            if not job.done():
                self._log(f"[base] {platform}: waiting for its bootstrap to finish")
            self._ready[platform] = job.result()[0]
        return self._ready[platform]

    def close(self) -> None:
        """Wait for a bootstrap still running (after a failure elsewhere): its result is kept for the next run."""
        if self._pool is None:
            return
        if any(not job.done() for job in self._pending.values()):
            self._log("[base] waiting for the background bootstrap to finish; the next run uses it")
        self._pool.shutdown(wait=True)


def _copy_from_pinned_registry(pin: Pin, reg: Registry, name: str, c, log) -> image_mod.Image | None:
    if not pin.pinned_in or "@" not in pin.pinned_in:
        return None
    host, src_name, _ = split_ref(pin.pinned_in)
    same = host == reg.host  # another repository (a namespace) of this registry: mount, move no bytes
    if same and src_name == name:
        return None
    src = reg if same else Registry(host, retries=1, timeout=10, login=reg.login)  # the login: its own host only
    if not same and not src.ping():
        return None
    img = _from_registry(src, src_name, pin, c)
    if img is None:
        return None
    log(f"[base] {pin.platform}: copying the pinned base from {host}/{src_name} (no bootstrap)")
    for layer in img.layers:
        if reg.has_blob(name, layer.digest) or (same and reg.mount_blob(name, layer.digest, src_name)):
            continue
        reg.copy_blob(src, src_name, name, layer.digest, layer.blob_size)
    reg.upload_blob(name, img.config)
    reg.put_manifest_if_changed(name, _tag(pin, c), img.manifest(), image_mod.OCI_MANIFEST)
    return img


# --- one bootstrap per archive state ---------------------------------------


def _memo_path(project: Project, platform: str, state: str, cache: layers_mod.BlobCache) -> Path:
    key = hashlib.sha256(f"{inputs_hash(project)} {platform} {state}".encode()).hexdigest()
    return cache.root / "bootstraps" / f"{platform.split('/')[1]}-{key[:32]}.json"


def _bootstrap_once(project: Project, platform: str, reg: Registry, name: str, cache: layers_mod.BlobCache,
                    c: layers_mod.Codec, log) -> tuple[image_mod.Image, tuple[str, ...]]:
    """bootstrap(), unless this recipe was bootstrapped on this machine from the archive as it is now.

    Bootstraps are reproducible, so the earlier result is what a new one would give. This is what keeps a
    fresh CI machine to one bootstrap per platform after Debian updates a package under the committed pin:
    every project and test copy with that pin then moves to the same new base without its own mmdebstrap.
    """
    state = bootstrap_mod.archive_state(project.base.suite, platform)
    memo = _memo_path(project, platform, state, cache) if state else None
    if memo is not None and memo.exists():
        try:
            e = json.loads(memo.read_text())
            seen = Pin(platform, "mmdebstrap", e["config"], tuple(e["diff_ids"]), tuple(e["packages"]), "")
        except (OSError, ValueError, KeyError, TypeError):
            seen = None
        img = seen and (_from_registry(reg, name, seen, c) or _from_cache(seen, cache, c))
        if img:
            log(f"[base] {platform}: bootstrapped from this state of the Debian archive before "
                f"({seen.config_digest[:19]}); using that instead of running mmdebstrap again")
            return img, seen.packages
    img, packages = bootstrap_mod.bootstrap(project, platform, cache, log)
    # Recorded only if the archive did not move while mmdebstrap ran: the key must name what it installed.
    if memo is not None and bootstrap_mod.archive_state(project.base.suite, platform) == state:
        atomic_write(memo, json.dumps({"config": img.config_digest, "diff_ids": [x.diff_id for x in img.layers],
                                       "packages": list(packages)}, indent=1) + "\n")
    return img, packages


# --- pulling a configured image (through the registry API, not the engine) ---

def qualified(ref: str) -> str:
    """Docker's reading of an image name: 'python:3.11' and 'library/python:3.11' are Docker Hub's;
    a first component with a '.' or a ':' (a port), or 'localhost', names the registry."""
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return ref
    return f"docker.io/{ref}" if rest else f"docker.io/library/{ref}"


def _pull(project: Project, platform: str, reg: Registry, name: str, cache, log) -> tuple[Base, str] | None:
    """Copy base.image for platform into the project registry and pin it; None when its registry is offline."""
    ref = project.base.image
    host, src_name, reference = split_ref(qualified(ref))
    host = "registry-1.docker.io" if host == "docker.io" else host
    # The project's login goes to the project's registry only: never to Docker Hub or the base's registry.
    src = Registry(host, retries=1, timeout=10, login=reg.login)
    if not src.ping():
        log(f"[base] {host} cannot be reached (offline); bootstrapping {project.base.suite} with mmdebstrap instead "
            f"of {ref}, as base.bootstrap.when: offline allows")
        return None
    m = src.get_manifest(src_name, reference)
    if m is None:
        raise UserError(f"base.image {ref} does not exist in {host}",
                        "fix base.image in the project file (a typo?), or set base.bootstrap.when: always")
    body = m.json
    if "manifests" in body:
        os_, arch = platform.split("/")
        entry = next((d for d in body["manifests"] if d.get("platform", {}).get("architecture") == arch
                      and d.get("platform", {}).get("os") == os_), None)
        if entry is None:
            raise UserError(f"base.image {ref} has no {platform} image", "pick a multi-arch base image")
        m = src.get_manifest(src_name, entry["digest"])
        body = m.json
    cfg = src.get_blob(src_name, body["config"]["digest"])
    diff_ids = json.loads(cfg)["rootfs"]["diff_ids"]
    for lay in body["layers"]:
        if not reg.has_blob(name, lay["digest"]):
            reg.copy_blob(src, src_name, name, lay["digest"], lay["size"])
    layers = tuple(layers_mod.Layer(d, 0, lay["digest"], lay["size"], lay["mediaType"])
                   for d, lay in zip(diff_ids, body["layers"]))
    img = image_mod.Image(platform, layers, cfg)
    tag = f"{platform.split('/')[1]}-{img.config_digest.split(':')[1][:16]}-pulled"
    reg.upload_blob(name, cfg)
    reg.put_manifest_if_changed(name, tag, img.manifest(), image_mod.OCI_MANIFEST)
    repo = repository(project)
    write_pin(project, Pin(platform, "pulled", img.config_digest, tuple(diff_ids), (), f"{ref}@{m.digest}"))
    return Base(platform, repo, img), f"pulled {ref} and pinned"


# --- bootstrapping ------------------------------------------------------


