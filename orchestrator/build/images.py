"""Build the planned images and push them by content tag.

Most layers are written by the tool itself, never exported from an engine:
the Python dependency layers by orchestrator.build.pydeps (uv installs each
lock for the target platform; the tree is cut by the layer_split policy and
written as normalized layers), the Debian package layers by
orchestrator.debian.layer (the locked .debs unpacked), each cached by its
inputs and placed where ImagePlan.stages() says. BuildKit runs what needs a
RUN, the app stage, and exports just that stage's files as a tar stream
(orchestrator.build.export). orchestrator.oci.layers turns every tree or
stream into a normalized, compressed blob, hashed once per byte on its way
to the compressor, and orchestrator.oci.image assembles config and
manifest. So the same inputs give the same image digest on any engine, and a
cached layer is neither rebuilt nor exported. The locks and pins are in the
build context, so the content tag changes exactly when they do.

Order: CUDA-libs first, then the services on it (cuda) or on the base (cpu).
An image whose content tag is already in the registry is not rebuilt. Only
content tags are written here: human tags, indexes and backend manifests
are promoted by `publish` after smoke tests pass.

Builders: each platform builds on its engine (`builders:`, else the default
one). With several engines, each gets a thread and builds its platforms'
images in plan order, pip stages on its own native platform (its build
base); the first failure, or Ctrl-C, stops the others' build clients, and
no manifest is pushed once the run has failed. The layers are made by the
tool from exported files, so the engine that ran a stage does not show in
any digest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from orchestrator.build import bases as base_mod
from orchestrator.build import export, pydeps, sdist
from orchestrator.build.context import stage_context
from orchestrator.build.plan import (
    BuildPlan,
    ImagePlan,
    SystemStage,
    content_tag,
    settings,
    tree_digest,
)
from orchestrator.build.render import app_stage_text
from orchestrator.build.result import BuildResult
from orchestrator.debian import layer as apt_layer
from orchestrator.machine import daemon
from orchestrator.common import meter
from orchestrator.common.hostinfo import is_loopback
from orchestrator.oci import image as image_mod
from orchestrator.oci import layers as layers_mod
from orchestrator.oci.push import Uploader
from orchestrator.oci.registry import Registry, split_ref
from orchestrator.project.spec import Builder, Project

SOURCE_DATE_EPOCH = str(layers_mod.SOURCE_DATE_EPOCH)


def stage_key(image: ImagePlan, stage: str, text: str, inputs: str, build_base: str, c: layers_mod.Codec) -> str:
    """A BuildKit stage's identity: what it runs, on what, for which platform. Same key, same layer."""
    h = hashlib.sha256()
    for part in (stage, text, inputs, build_base, image.platform, SOURCE_DATE_EPOCH):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def _existing(reg: Registry, name: str, image: ImagePlan, digest: str) -> image_mod.Image:
    """An image already in the registry, as layers and config (its blobs stay there)."""
    m = reg.get_manifest(name, digest).json
    cfg = reg.get_blob(name, m["config"]["digest"])
    diff_ids = json.loads(cfg)["rootfs"]["diff_ids"]
    found = tuple(layers_mod.Layer(d, 0, lay["digest"], lay["size"], lay["mediaType"])
                  for d, lay in zip(diff_ids, m["layers"]))
    return image_mod.Image(image.platform, found, cfg)


def build(project: Project, plan: BuildPlan, texts: dict[str, str], log=print, force: bool = False,
          no_cache: bool = False, stats: dict | None = None) -> list[BuildResult]:
    """Build plan's images from their Dockerfiles (texts: name -> text, from render) and push them by content tag.

    Returns one result per image, in plan order, once every manifest is in the registry.
    """
    reg = Registry(project.registry, login=project.login)
    reg.check()
    # Only the engines of the platforms this run builds must answer.
    builders = {p: daemon.builder_for(project, p) for p in dict.fromkeys(i.platform for i in plan.images)}
    natives = connect_builders(project, builders, log)  # each engine answers; the platform it runs natively
    run = _Run(project, plan, texts, reg, natives, log, force, no_cache)
    groups: dict[Builder, list[tuple[int, ImagePlan]]] = {}
    for i, image in enumerate(plan.images):  # each builder keeps the plan's order: CUDA-libs, then services
        groups.setdefault(builders[image.platform], []).append((i, image))
    try:
        for members in groups.values():  # except that platforms whose base is still being made go last
            members.sort(key=lambda m: m[1].platform in run.bases.pending)
        if len(groups) > 1:
            log(f"building on {len(groups)} engines at once: " + "; ".join(
                f"{', '.join(dict.fromkeys(im.platform for _, im in members))} on {b.host}"
                for b, members in groups.items()))
            run.per_thread_registry = True
        export.on_builders(list(groups.items()), run.on_builder, run.halt)
        ordered = run.wait_for_pushes()
    finally:
        run.close()
    if stats is not None:
        stats["uploaded_bytes"] = sum(r.uploaded_bytes for r in ordered)
    return ordered


class _Run:
    """What one build shares across its builders' threads: bases, the uploader, the results so far."""

    def __init__(self, project: Project, plan: BuildPlan, texts: dict[str, str], reg: Registry,
                 natives: dict[Builder, str], log, force: bool, no_cache: bool):
        self.project, self.texts, self.reg, self.natives, self.log = project, texts, reg, natives, log
        self.force, self.no_cache = force, no_cache
        self.cache = layers_mod.default_cache()
        self.codec = layers_mod.codec(project.compression)
        self.results: dict[int, BuildResult] = {}
        self.contexts: list[Path] = []
        self.halt = export.Halt()
        self.per_thread_registry = False
        self.failed = True
        # Pip stages run on each engine's own platform: its build base is that platform's base, needed now.
        # A base no engine here runs natively is only assembled on: if it must be bootstrapped (minutes of
        # maintainer scripts under QEMU), that runs in the background while the other platforms build.
        needed = list(dict.fromkeys([*(i.platform for i in plan.images), *natives.values()]))
        self.bases = base_mod.Bases(project, needed, [p for p in needed if p not in natives.values()], reg,
                                    self.cache, log)
        self.uploader = Uploader(reg.host, log, login=reg.login)
        self.docker_config = export.engine_docker_config(reg.host, reg.login)  # BuildKit pulls the build base with our credentials

    def on_builder(self, builder: Builder, images: list[tuple[int, ImagePlan]]) -> None:
        """One builder's images, in order (run in that builder's thread)."""
        here = Registry(self.project.registry, login=self.project.login) if self.per_thread_registry else self.reg  # a client per thread
        build_base = self.bases.get(self.natives[builder])
        libs: dict[tuple[str, str], BuildResult] = {}  # (CUDA line, platform) -> cuda-libs result
        for i, image in images:
            self.halt.check()
            parent = libs[(image.backend.cuda, image.platform)] if image.from_image == "cuda-libs" else None
            result = self.results[i] = self.image(image, here, builder, build_base, parent)
            if image.kind == "cuda-libs":
                libs[(image.backend.cuda, image.platform)] = result

    def image(self, image: ImagePlan, reg: Registry, builder: Builder, build_base, parent) -> BuildResult:
        """One image: found in the registry by its content tag, or built and pushed in the background."""
        base = self.bases.get(image.platform)
        parent_img = parent.assembled if parent else base.image
        locks = [s.lock for s in image.layers]
        wheels = (sdist.built_wheels(locks, image.platform, base, image.backend.sources, self.log)
                  if sdist.needs_wheels(locks) else [])
        ctx, ctx_digest = stage_context(self.project, image, self.texts[image.dockerfile], wheels)
        self.contexts.append(ctx)
        # The Python layers' installer and its rules are inputs too (uv's version, pydeps' format, layer_split).
        identity = (f"{parent_img.config_digest} {build_base.image.config_digest} {self.codec.key} "
                    f"{pydeps.identity()}")
        tag = content_tag(image, self.texts[image.dockerfile], ctx_digest, identity)
        _, name, _ = split_ref(image.ref(tag))
        started = time.monotonic()
        existing = None if self.force else reg.get_manifest(name, tag)
        if existing is not None:
            self.log(f"{image.key}/{image.backend.name} {image.platform}: {tag} is already in the registry; "
                     "not rebuilt")
            result = BuildResult(image, tag, existing.digest, built=False,
                                 assembled=_existing(reg, name, image, existing.digest))
        else:
            where = f" on {builder.host}" if self.project.builders else ""
            result = _build_one(self.project, image, ctx, tag, name, base, build_base, parent_img, parent,
                                self.cache, self.codec, self.uploader, reg, self.log, self.force or self.no_cache,
                                self.no_cache, self.docker_config, builder, self.halt, where)
        result.seconds = time.monotonic() - started
        return result

    def wait_for_pushes(self) -> list[BuildResult]:
        """Every manifest is up before build returns; the results in plan order."""
        ordered = [self.results[i] for i in sorted(self.results)]
        for r in ordered:
            if r.pending is not None:
                r.uploaded_bytes, r.pushed_layers = r.pending.result()
                r.reused_layers = len(r.assembled.layers) - r.pushed_layers
                r.pending = None
                self.log(f"{r.image.key}/{r.image.backend.name} {r.image.platform}: registry received "
                         f"{r.uploaded_bytes:,} bytes")
        self.failed = False
        return ordered

    def close(self) -> None:
        # On an error or Ctrl-C, queued uploads and manifest pushes are dropped: no tag is
        # written after the run has failed, and a dead registry is not retried once per blob.
        self.uploader.close(cancel=self.failed)
        self.bases.close()
        if self.docker_config:
            shutil.rmtree(self.docker_config, ignore_errors=True)
        for ctx in self.contexts:
            shutil.rmtree(ctx, ignore_errors=True)


def connect_builders(project: Project, builders: dict[str, Builder], log=print) -> dict[Builder, str]:
    """Every builder answers (else EnvironmentProblem naming it); returns each one's native platform.

    With `builders:` configured, says which engine builds which platform,
    and warns when a builder on another machine is pointed at a loopback
    registry it cannot see.
    """
    natives: dict[Builder, str] = {}
    for builder in dict.fromkeys(builders.values()):
        natives[builder] = daemon.engine_platform(daemon.docker_client(timeout=30, builder=builder), builder.host)
    if project.builders:
        for platform, builder in builders.items():
            log(f"{platform}: builds on {builder}, a {natives[builder]} engine")
        for builder in natives:
            if is_loopback(project.registry) and not daemon.is_local(builder):
                log(f"warning: {builder} is another machine, but registry {project.registry} is this machine's "
                    "loopback: that engine would look for it on its own; use a registry address every builder "
                    "reaches")
    return natives


def _build_one(project, image: ImagePlan, ctx: Path, tag: str, name: str, base, build_base, parent_img, parent,
               cache, c, uploader: Uploader, reg: Registry, log, rebuild: bool, no_cache: bool,
               docker_config: str | None, builder: Builder | None = None, halt: export.Halt | None = None,
               where: str = "") -> BuildResult:
    log(f"{image.key}/{image.backend.name} {image.platform}: building {image.ref(tag)}{where}")
    # BuildKit parses every FROM even for one --target: name the final stage's parents too
    # (the export target never pulls them).
    args = {"BUILD_BASE_IMAGE": build_base.ref, "BASE_IMAGE": base.ref, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH}
    if parent is not None:
        args["CUDA_LIBS_IMAGE"] = parent.ref
    mount_from = [split_ref(base.ref)[1]] + ([split_ref(parent.image.ref("x"))[1]] if parent else [])
    wheelhouse = ctx / "wheelhouse" if any((ctx / "wheelhouse").glob("*.whl")) else None
    new_layers, history = [], []
    for stage in image.stages():
        if halt is not None:
            halt.check()
        label = f"{image.key}/{image.backend.name} {image.arch} {stage.name}"
        if isinstance(stage, SystemStage):
            # Not BuildKit: the tool unpacks the locked .debs itself (no emulation for arm64),
            # cached by the pins, so every image of the platform shares the one blob.
            started = time.monotonic()
            built = apt_layer.build_layer(stage.lock, cache, c, log=log, reuse=not rebuild)
            if built.fragment is not None:  # made now, not found in the cache
                meter.add("build", time.monotonic() - started, built.layer.size)
            how = "built" if built.fragment is not None else "cached"
            log(f"  {label}: Debian packages layer {how} ({built.layer.digest[7:19]}, {len(stage.lock.pins)} packages)")
            if built.fragment is not None:  # what the skipped maintainer scripts would have done
                for pkg, did in built.fragment.maintainer_scripts_that_matter().items():
                    log(f"    {pkg}: maintainer scripts not run (alternatives made as links): {'; '.join(did)}")
                for note in built.fragment.notes:
                    log(f"    note: {note}")
            uploader.submit(name, built.layer, mount_from)
            new_layers.append(built.layer)
            history.append(f"orchestrator: {stage.name} layer (apt lock {stage.lock_file}, "
                           f"{built.key[:12]}): {' '.join(stage.lock.requests)}")
            continue
        # Not BuildKit either: uv installs the lock for the target platform, the tool writes the layers.
        # Each new layer starts uploading as soon as it is written, while the next one compresses.
        groups, cached = pydeps.write_stage(stage, image.platform, project.python, image.backend.sources, cache, c,
                                            label, log=log, wheelhouse=wheelhouse, reuse=not rebuild,
                                            no_cache=no_cache,
                                            on_layer=lambda layer: uploader.submit(name, layer, mount_from))
        if cached:
            log(f"  {label}: " + (f"layer cached ({groups[0][1].digest[7:19]})" if len(groups) == 1
                                  else f"{len(groups)} layers cached"))
        lock_id = "lock " + hashlib.sha256(stage.lock.body().encode()).hexdigest()[:12]
        for group, layer in groups:
            uploader.submit(name, layer, mount_from)
            new_layers.append(layer)
            history.append(f"orchestrator: {stage.name} layer {group.split('-', 1)[1]} ({lock_id}, uv)")
    if image.kind == "service":  # the app: BuildKit runs its stage, the tool writes the layer from the export
        inputs = tree_digest(ctx, skip=("wheelhouse", "locks", "tools", "Dockerfile", ".dockerignore"))
        key = stage_key(image, "app", app_stage_text(), inputs, build_base.image.config_digest, c)
        groups = None if rebuild else cache.recall_groups(key, c)
        if groups is None:
            started = time.monotonic()
            groups = export.export_stage(image, "app", ctx, args, cache, c, log, no_cache=no_cache,
                                         docker_config=docker_config, builder=builder, halt=halt,
                                         registry=project.registry)
            meter.add("export", time.monotonic() - started, sum(lay.size for _, lay in groups))
            cache.remember_groups(key, groups)
        else:
            log(f"  {image.key}/{image.backend.name} {image.arch} app: layer cached ({groups[0][1].digest[7:19]})")
        for _, layer in groups:
            uploader.submit(name, layer, mount_from)
            new_layers.append(layer)
            history.append(f"orchestrator: app layer (lock {hashlib.sha256(inputs.encode()).hexdigest()[:12]})")
    cfg = image_mod.config(json.loads(parent_img.config), image.platform, tuple(new_layers),
                           settings(image, f"orchestrator/base-{project.base.suite}", base.image.digest),
                           tuple(history))
    img = image_mod.Image(image.platform, parent_img.layers + tuple(new_layers), cfg)
    log(f"{image.key}/{image.backend.name}: pushing {image.ref(tag)} in the background")
    result = BuildResult(image, tag, img.digest, True, assembled=img)  # counts filled in when the push is done
    result.pending = uploader.push_async(reg.host, name, img, tag, mount_from)
    return result
