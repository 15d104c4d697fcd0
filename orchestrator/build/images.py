"""Build the planned images and push them by content tag.

BuildKit runs each layer stage (pip into /out on the build platform) and
exports just that stage's files as a tar stream (orchestrator.build.export);
orchestrator.oci.layers turns the stream into a normalized, compressed blob,
cached by the stage's inputs, and orchestrator.oci.image assembles config and
manifest. So the same inputs give the same image digest on any engine, and a
cached layer is neither rebuilt nor exported.

Debian system packages are the exception: their layers come from
orchestrator.debian.layer (the locked .debs unpacked by the tool, cached by
the pins) and are placed where ImagePlan.stages() says; their pins are in
the build context, so the content tag changes exactly when they do.

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
from orchestrator.build import export, sdist
from orchestrator.build.context import split_script, stage_context
from orchestrator.build.plan import (
    BuildPlan,
    ImagePlan,
    SystemStage,
    content_tag,
    settings,
    tree_digest,
)
from orchestrator.build.render import app_stage_text, layer_stage_text
from orchestrator.build.result import BuildResult
from orchestrator.debian import layer as apt_layer
from orchestrator.machine import daemon
from orchestrator.common.hostinfo import is_loopback
from orchestrator.oci import image as image_mod
from orchestrator.oci import layers as layers_mod
from orchestrator.oci.push import Uploader
from orchestrator.oci.registry import Registry, split_ref
from orchestrator.project.spec import Builder, Project

SOURCE_DATE_EPOCH = str(layers_mod.SOURCE_DATE_EPOCH)


def _pip_sources(image: ImagePlan) -> str:
    src = image.backend.sources.expanded()
    parts = image.backend.sources.index_args(find_links=False)
    # Remote find-links the lock used reach the build too (local ones are staged as the wheelhouse).
    parts += [a for f in src.find_links if "://" in f and not f.startswith("file://") for a in ("--find-links", f)]
    return " ".join(parts)


def stage_key(image: ImagePlan, stage: str, text: str, inputs: str, build_base: str, pip_sources: str,
              c: layers_mod.Codec) -> str:
    """A stage's identity: what it runs, on what, for which platform. Same key, same layer."""
    h = hashlib.sha256()
    for part in (stage, text, inputs, build_base, image.platform, SOURCE_DATE_EPOCH, pip_sources):
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
    reg = Registry(project.registry)
    reg.check()
    # Only the engines of the platforms this run builds must answer.
    builders = {p: daemon.builder_for(project, p) for p in dict.fromkeys(i.platform for i in plan.images)}
    natives = connect_builders(project, builders, log)  # each engine answers; the platform it runs natively
    cache = layers_mod.default_cache()
    c = layers_mod.codec(project.compression)
    # Pip stages run on each engine's own platform: its build base is that platform's base, needed now.
    # A base no engine here runs natively is only assembled on: if it must be bootstrapped (minutes of
    # maintainer scripts under QEMU), that runs in the background while the other platforms build.
    needed = list(dict.fromkeys([*(i.platform for i in plan.images), *natives.values()]))
    bases = base_mod.Bases(project, needed, [p for p in needed if p not in natives.values()], reg, cache, log)
    uploader = Uploader(reg.host, log)
    docker_config = export.engine_docker_config(reg.host)  # BuildKit pulls the build base with our credentials
    groups: dict[Builder, list[tuple[int, ImagePlan]]] = {}
    for i, image in enumerate(plan.images):  # each builder keeps the plan's order: CUDA-libs, then services
        groups.setdefault(builders[image.platform], []).append((i, image))
    for members in groups.values():  # except that platforms whose base is still being made go last
        members.sort(key=lambda m: m[1].platform in bases.pending)
    if len(groups) > 1:
        log(f"building on {len(groups)} engines at once: " + "; ".join(
            f"{', '.join(dict.fromkeys(im.platform for _, im in members))} on {b.host}"
            for b, members in groups.items()))
    results: dict[int, BuildResult] = {}
    contexts: list[Path] = []
    halt = export.Halt()

    def on_builder(builder: Builder, images: list[tuple[int, ImagePlan]]) -> None:
        here = Registry(project.registry) if len(groups) > 1 else reg  # a client per thread
        build_base = bases.get(natives[builder])
        where = f" on {builder.host}" if project.builders else ""
        libs: dict[tuple[str, str], BuildResult] = {}  # (CUDA line, platform) -> cuda-libs result
        for i, image in images:
            halt.check()
            base = bases.get(image.platform)
            parent = libs[(image.backend.cuda, image.platform)] if image.from_image == "cuda-libs" else None
            parent_img = parent.assembled if parent else base.image
            locks = [s.lock for s in image.layers]
            wheels = (sdist.built_wheels(locks, image.platform, base, image.backend.sources, log)
                      if sdist.needs_wheels(locks) else [])
            ctx, ctx_digest = stage_context(project, image, texts[image.dockerfile], wheels)
            contexts.append(ctx)
            identity = f"{parent_img.config_digest} {build_base.image.config_digest} {c.key}"
            tag = content_tag(image, texts[image.dockerfile], ctx_digest, identity)
            _, name, _ = split_ref(image.ref(tag))
            started = time.monotonic()
            existing = None if force else here.get_manifest(name, tag)
            if existing is not None:
                log(f"{image.key}/{image.backend.name} {image.platform}: {tag} is already in the registry; "
                    "not rebuilt")
                result = BuildResult(image, tag, existing.digest, built=False,
                                     assembled=_existing(here, name, image, existing.digest))
            else:
                result = _build_one(project, image, ctx, tag, name, base, build_base, parent_img, parent,
                                    cache, c, uploader, here, log, force or no_cache, no_cache, docker_config,
                                    builder, halt, where)
            result.seconds = time.monotonic() - started
            results[i] = result
            if image.kind == "cuda-libs":
                libs[(image.backend.cuda, image.platform)] = result

    failed = True
    try:
        export.on_builders(list(groups.items()), on_builder, halt)
        ordered = [results[i] for i in sorted(results)]
        for r in ordered:  # every manifest is up before build returns
            if r.pending is not None:
                r.uploaded_bytes, r.pushed_layers = r.pending.result()
                r.reused_layers = len(r.assembled.layers) - r.pushed_layers
                r.pending = None
                log(f"{r.image.key}/{r.image.backend.name} {r.image.platform}: registry received "
                    f"{r.uploaded_bytes:,} bytes")
        failed = False
    finally:
        # On an error or Ctrl-C, queued uploads and manifest pushes are dropped: no tag is
        # written after the run has failed, and a dead registry is not retried once per blob.
        uploader.close(cancel=failed)
        bases.close()
        if docker_config:
            shutil.rmtree(docker_config, ignore_errors=True)
        for ctx in contexts:
            shutil.rmtree(ctx, ignore_errors=True)
    if stats is not None:
        stats["uploaded_bytes"] = sum(r.uploaded_bytes for r in ordered)
    return ordered


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
    pip_sources = _pip_sources(image)
    # BuildKit parses every FROM even for one --target: name the final stage's parents too
    # (the export targets never pull them).
    args = {"BUILD_BASE_IMAGE": build_base.ref, "BASE_IMAGE": base.ref, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
            "PIP_SOURCES": pip_sources}
    if parent is not None:
        args["CUDA_LIBS_IMAGE"] = parent.ref
    stages = [s if isinstance(s, SystemStage) else (s.name, layer_stage_text(s), s.lock.text())
              for s in image.stages()]
    if image.kind == "service":
        stages.append(("app", app_stage_text(), tree_digest(ctx, skip=("wheelhouse", "locks", "tools", "Dockerfile",
                                                                         ".dockerignore"))))
    mount_from = [split_ref(base.ref)[1]] + ([split_ref(parent.image.ref("x"))[1]] if parent else [])
    new_layers, history = [], []
    for stage in stages:
        if halt is not None:
            halt.check()
        if isinstance(stage, SystemStage):
            # Not BuildKit: the tool unpacks the locked .debs itself (no emulation for arm64),
            # cached by the pins, so every image of the platform shares the one blob.
            built = apt_layer.build_layer(stage.lock, cache, c, log=log, reuse=not rebuild)
            how = "built" if built.fragment is not None else "cached"
            log(f"  {image.key}/{image.backend.name} {image.arch} {stage.name}: Debian packages layer {how} "
                f"({built.layer.digest[7:19]}, {len(stage.lock.pins)} packages)")
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
        stage, text, inputs = stage
        if stage != "app":  # the split script decides which files go to which layer
            inputs += "\n# layer_split " + hashlib.sha256(split_script()).hexdigest()
        key = stage_key(image, stage, text, inputs, build_base.image.config_digest, pip_sources, c)
        groups = None if rebuild else cache.recall_groups(key, c)
        if groups is None:
            groups = export.export_stage(image, stage, ctx, args, cache, c, log, no_cache=no_cache,
                                  docker_config=docker_config, builder=builder, halt=halt, registry=project.registry)
            cache.remember_groups(key, groups)
        else:
            log(f"  {image.key}/{image.backend.name} {image.arch} {stage}: "
                + (f"layer cached ({groups[0][1].digest[7:19]})" if len(groups) == 1
                   else f"{len(groups)} layers cached"))
        lock_id = "lock " + hashlib.sha256(inputs.encode()).hexdigest()[:12]
        for group, layer in groups:
            uploader.submit(name, layer, mount_from)
            new_layers.append(layer)
            what = "" if stage == "app" else f" {group.split('-', 1)[1]}"
            history.append(f"orchestrator: {stage} layer{what} ({lock_id})")
    cfg = image_mod.config(json.loads(parent_img.config), image.platform, tuple(new_layers),
                           settings(image, f"orchestrator/base-{project.base.suite}", base.image.digest),
                           tuple(history))
    img = image_mod.Image(image.platform, parent_img.layers + tuple(new_layers), cfg)
    log(f"{image.key}/{image.backend.name}: pushing {image.ref(tag)} in the background")
    result = BuildResult(image, tag, img.digest, True, assembled=img)  # counts filled in when the push is done
    result.pending = uploader.push_async(reg.host, name, img, tag, mount_from)
    return result
