"""Stage 5: build the planned images with BuildKit and push them.

Order: CUDA-libs first, then the services FROM it (cuda) or FROM the base
(cpu). An image whose content tag is already in the registry is not
rebuilt. Human tags (`cu124-v1`, `0.1.0-cuda`) move only after every
image of the run is built and pushed, so a failed run leaves the previous
tags untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from . import engine, lock as lock_mod
from .errors import EnvironmentProblem, UserError
from .plan import BuildPlan, ImagePlan, content_tag, make_plan, tree_digest
from .registry import OCI_INDEX, Registry, split_ref
from .render import render_all
from .spec import Project

SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01: the earliest time zip (wheels) can hold


@dataclass
class BuildResult:
    image: ImagePlan
    content_tag: str
    digest: str
    built: bool
    uploaded_bytes: int = 0
    pushed_layers: int = 0
    reused_layers: int = 0
    seconds: float = 0.0

    @property
    def ref(self) -> str:
        return f"{self.image.repository}@{self.digest}"


def load_all_locks(project: Project, backends=None, platforms=None) -> dict:
    out = {}
    for backend, platform in lock_mod.targets(project):
        if (backends and backend.name not in backends) or (platforms and platform not in platforms):
            continue
        out[(backend.name, platform)] = lock_mod.load_locks(project, backend, platform)
    stale = [s for s in lock_mod.check(project) if s.reason != "no longer used by the project file"]
    if stale:
        raise UserError("locks are stale: " + ", ".join(str(s.path) for s in stale), "run `invoke lock`")
    return out


def _local_wheels(project: Project, image: ImagePlan) -> list[Path]:
    """Wheels from the backend's local find-links that the image's locks pin."""
    wanted = {(p.name, p.version) for s in image.layers for p in s.lock.pins}
    found = []
    for d in image.backend.sources.expanded().find_links:
        path = Path(d.removeprefix("file://"))
        if not path.is_dir():
            continue
        for whl in sorted(path.glob("*.whl")):
            try:
                name, version, _, _ = parse_wheel_filename(whl.name)
            except Exception:  # noqa: BLE001 - a stray file is not our business
                continue
            if (canonicalize_name(name), str(version)) in wanted:
                found.append(whl)
    return found


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_context(project: Project, image: ImagePlan, dockerfile: str) -> tuple[Path, str]:
    """Write the build context for one image; return (dir, digest of its inputs)."""
    ctx = project.root / ".build" / "ctx" / f"{image.key}-{image.backend.name}-{image.arch}"
    if ctx.exists():
        shutil.rmtree(ctx)
    (ctx / "locks").mkdir(parents=True)
    (ctx / "wheelhouse").mkdir()
    for stage in image.layers:
        (ctx / stage.context_lock).write_text(stage.lock.text())
    for whl in _local_wheels(project, image):
        _link_or_copy(whl, ctx / "wheelhouse" / whl.name)
    if image.service is not None:
        shutil.copytree(image.service.path, ctx / "app", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        runtime = ctx / "runtime"
        runtime.mkdir()
        for f in resources.files("orchestrator").joinpath("runtime").iterdir():
            if f.name.endswith(".py"):
                (runtime / f.name).write_bytes(f.read_bytes())
    digest = tree_digest(ctx, skip=("wheelhouse",))
    (ctx / "Dockerfile").write_text(dockerfile)
    (ctx / ".dockerignore").write_text("Dockerfile\n.dockerignore\n")
    return ctx, digest


def _pip_sources(image: ImagePlan) -> str:
    src = image.backend.sources.expanded()
    parts = []
    if src.index_url:
        parts += ["--index-url", src.index_url]
    for u in src.extra_index_urls:
        parts += ["--extra-index-url", u]
    return " ".join(parts)


def _push_progress(image: ImagePlan, log, every: float = 10.0):
    """Log upload progress of large layers every few seconds (docker push is the slow part)."""
    last = {"t": time.monotonic()}

    def on_event(ev: dict) -> None:
        detail = ev.get("progressDetail") or {}
        if ev.get("status") == "Pushing" and detail.get("total") and time.monotonic() - last["t"] >= every:
            last["t"] = time.monotonic()
            log(f"  {image.key}/{image.backend.name}: pushing layer {ev.get('id')} "
                f"{detail['current'] / 1e6:,.0f}/{detail['total'] / 1e6:,.0f} MB (uncompressed)")

    return on_event


def run_build(image: ImagePlan, ctx: Path, ref: str, build_args: dict[str, str], log=print,
              no_cache: bool = False) -> None:
    client = engine.build_client()
    cmd = [*client.argv, "--progress=plain", "--platform", image.platform, "-t", ref,
           *(["--no-cache"] if no_cache else []),
           "--secret", f"id=ca,src={engine.ca_bundle()}", "-f", str(ctx / "Dockerfile")]
    for k, v in build_args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    cmd.append(str(ctx))
    env = dict(os.environ, **dict(client.env))
    tail: deque[str] = deque(maxlen=40)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        # Step starts and ends are progress enough; pip's chatter stays in the tail.
        if (" [" in line and line.startswith("#")) or line.endswith(" DONE") or " DONE " in line \
                or "CACHED" in line or "ERROR" in line:
            log(f"  {image.key}/{image.backend.name} {time.monotonic() - started:6.0f}s {line[:150]}")
    if proc.wait() != 0:
        text = "\n".join(tail)
        hint = None
        if "failed to prepare" in text and "no such file or directory" in text:
            # Seen after `docker image prune`: BuildKit records point at removed layers.
            hint = "BuildKit's cache refers to layers that were pruned; run `docker builder prune -af` and retry"
        elif "pip install" in text and ("HTTPSConnection" in text or "SSLError" in text):
            hint = "pip could not reach the index from the build; check the proxy and the CA bundle (SSL_CERT_FILE)"
        raise EnvironmentProblem(f"build of {ref} failed:\n" + "\n".join("    " + t for t in tail), hint)


def build(project: Project, backends: list[str] | None = None, services: list[str] | None = None,
          platforms: list[str] | None = None, log=print, force: bool = False,
          no_cache: bool = False, stats: dict | None = None) -> list[BuildResult]:
    for b in backends or []:
        if b not in project.backends:
            raise UserError(f"unknown backend {b!r}; {project.file.name} defines {sorted(project.backends)}")
    for s in services or []:
        if s not in project.services:
            raise UserError(f"unknown service {s!r}; {project.file.name} defines {sorted(project.services)}")
    for p in platforms or []:
        # Named backends must build there; "all" means those that do.
        for b in backends or []:
            if p not in project.backends[b].platforms:
                raise UserError(f"backend {b} is not built for {p}: the compatibility data or backends.{b}.platforms "
                                f"allow {list(project.backends[b].platforms)}",
                                f"clients on {p} use another backend; see `invoke select`")
    reg = Registry(project.registry)
    reg.check()
    engine.docker_client()
    locks = load_all_locks(project, backends, platforms)
    plan: BuildPlan = make_plan(project, locks, backends, services, platforms)
    texts = render_all(plan)
    results: list[BuildResult] = []
    libs: dict[str, BuildResult] = {}  # platform -> cuda-libs result
    for image in plan.images:
        base = engine.base_ref(project, image.platform)
        build_base = engine.base_ref(project, engine.host_platform())
        if image.from_image == "cuda-libs":
            parent_result = libs[image.platform]
            parent = parent_result.content_tag
        else:
            parent = base.split("@")[-1]
        parent += " " + build_base.split("@")[-1]  # pip runs in the build base
        ctx, ctx_digest = stage_context(project, image, texts[image.dockerfile])
        tag = content_tag(image, texts[image.dockerfile], ctx_digest, parent)
        _, name, _ = split_ref(image.ref(tag))
        started = time.monotonic()
        existing = None if force else reg.get_manifest(name, tag)
        if existing is not None:
            log(f"{image.key}/{image.backend.name} {image.platform}: {tag} is already in the registry; not rebuilt")
            result = BuildResult(image, tag, existing.digest, built=False)
        else:
            log(f"{image.key}/{image.backend.name} {image.platform}: building {image.ref(tag)}")
            args = {"BASE_IMAGE": base, "BUILD_BASE_IMAGE": build_base,
                    "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PIP_SOURCES": _pip_sources(image),
                    "TORCH_VERSION": image.backend.torch_for(image.platform) or "none"}
            if image.from_image == "cuda-libs":
                args["CUDA_LIBS_IMAGE"] = parent_result.ref
            run_build(image, ctx, image.ref(tag), args, log, no_cache=no_cache)
            log(f"{image.key}/{image.backend.name}: pushing {image.ref(tag)}")
            pushed = engine.push(image.ref(tag), on_event=_push_progress(image, log))
            result = BuildResult(image, tag, pushed["digest"], True, pushed["uploaded_bytes"],
                                 pushed["pushed_layers"], pushed["reused_layers"])
            log(f"{image.key}/{image.backend.name}: registry received {pushed['uploaded_bytes']:,} bytes "
                f"({pushed['pushed_layers']} new layer(s) + config + manifest); "
                f"{pushed['reused_layers']} layer(s) already there")
        result.seconds = time.monotonic() - started
        results.append(result)
        if image.kind == "cuda-libs":
            libs[image.platform] = result
    # Only now, with everything pushed, move the human tags: each names an
    # OCI image index over the platforms built for that image and backend.
    groups: dict[tuple[str, str], list[BuildResult]] = {}
    for r in results:
        groups.setdefault((r.image.key, r.image.backend.name), []).append(r)
    for members in groups.values():
        image = members[0].image
        _, name, _ = split_ref(image.ref("x"))
        body = image_index(reg, name, members)
        for human in image.human_tags:
            digest, sent = reg.put_manifest_if_changed(name, human, body, OCI_INDEX)
            if stats is not None:
                stats["index_bytes"] = stats.get("index_bytes", 0) + sent
            platforms = ", ".join(f"{d['platform']['os']}/{d['platform']['architecture']}"
                                  for d in json.loads(body)["manifests"])
            log(f"{image.repository}:{human} -> index {digest[:19]} ({platforms})" + ("" if sent else ", unchanged"))
    return results


def image_index(reg: Registry, name: str, members: list[BuildResult]) -> bytes:
    """An OCI image index over per-platform manifests, in canonical JSON.

    Platforms not built in this run keep their entry from the index the
    human tag names now (if the project still builds them), so
    `build --platform linux/amd64` does not drop linux/arm64.
    """
    image = members[0].image
    wanted = set(image.backend.platforms)
    entries: dict[str, dict] = {}
    current = reg.get_manifest(name, image.human_tags[0])
    for d in (current.json.get("manifests", []) if current else []):
        plat = f"{d.get('platform', {}).get('os')}/{d.get('platform', {}).get('architecture')}"
        if plat in wanted and reg.has_manifest(name, d["digest"]):
            entries[plat] = d
    for r in members:
        m = reg.get_manifest(name, r.digest)
        os_, arch = r.image.platform.split("/")
        entries[r.image.platform] = {"mediaType": m.media_type, "digest": m.digest, "size": len(m.body),
                                     "platform": {"architecture": arch, "os": os_}}
    manifests = [entries[p] for p in sorted(entries)]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
