"""Stage 5: build the planned images and push them by content tag.

BuildKit runs each layer stage (pip into /out on the build platform) and
exports just that stage's files as a tar stream (`--target <stage>-layer
--output type=tar`); orchestrator.layers turns the stream into a normalized,
compressed blob, cached by the stage's inputs, and orchestrator.image
assembles config and manifest. So the same inputs give the same image
digest on any engine, and a cached layer is neither rebuilt nor exported.

Debian system packages are the exception: their layers come from
orchestrator.apt_layer (the locked .debs unpacked by the tool, cached by
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
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from . import apt_layer
from . import base as base_mod
from . import engine, lock as lock_mod
from . import image as image_mod
from . import layers as layers_mod
from .errors import EnvironmentProblem, UserError
from .plan import BuildPlan, ImagePlan, SystemStage, content_tag, make_plan, settings, tree_digest
from .push import Uploader
from .registry import Registry, split_ref
from .render import SPLIT_SCRIPT, app_stage_text, export_target, layer_stage_text, render_all
from .spec import Builder, Project

SOURCE_DATE_EPOCH = str(layers_mod.SOURCE_DATE_EPOCH)


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
    assembled: image_mod.Image | None = None  # layers and config, as pushed
    pending: object = None  # the background push, until build() has waited for it

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
    """Write the build context for one image; return (dir, digest of its inputs).

    The directory is private to this process, so two builds in one checkout
    do not delete each other's context; `build` removes it when done.
    """
    ctx = project.root / ".build" / "ctx" / f"{image.key}-{image.backend.name}-{image.arch}-{os.getpid()}"
    if ctx.exists():
        shutil.rmtree(ctx)
    try:
        return _fill_context(project, image, dockerfile, ctx)
    except BaseException:  # Ctrl-C halfway through a copy leaves no context behind
        shutil.rmtree(ctx, ignore_errors=True)
        raise


def _fill_context(project: Project, image: ImagePlan, dockerfile: str, ctx: Path) -> tuple[Path, str]:
    (ctx / "locks").mkdir(parents=True)
    (ctx / "wheelhouse").mkdir()
    for stage in image.layers:
        (ctx / stage.context_lock).write_text(stage.lock.text())
    if image.layers:  # run by each layer stage to cut its lock into layers
        (ctx / SPLIT_SCRIPT).parent.mkdir()
        (ctx / SPLIT_SCRIPT).write_bytes(split_script())
    for system in image.system:  # not used by the Dockerfile: they put the pins into the content tag
        (ctx / system.context_lock).write_text(system.context_text())
    for whl in _local_wheels(project, image):
        _link_or_copy(whl, ctx / "wheelhouse" / whl.name)
    # Wheels `invoke lock` built from allowed sdists: pinned by their sha256 like any other.
    for whl in lock_mod.built_wheels(project, image.backend, image.platform, [s.lock for s in image.layers]):
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


def split_script() -> bytes:
    """orchestrator/layer_split.py as the layer stages run it (its hash is part of every stage's key)."""
    return resources.files("orchestrator").joinpath("layer_split.py").read_bytes()


def _pip_sources(image: ImagePlan) -> str:
    src = image.backend.sources.expanded()
    parts = image.backend.sources.index_args(find_links=False)
    # Remote find-links the lock used reach the build too (local ones are staged as the wheelhouse).
    parts += [a for f in src.find_links if "://" in f and not f.startswith("file://") for a in ("--find-links", f)]
    return " ".join(parts)


def _hint(text: str, builder: Builder | None = None, registry: str | None = None) -> str | None:
    engine_name = f"the engine at {builder.host}" if builder is not None else "the engine"
    if registry and ("failed to resolve source metadata" in text or "failed to do request" in text) and \
            ("connection refused" in text or "no such host" in text or "i/o timeout" in text):
        return (f"{engine_name} cannot reach registry {registry} to pull the build base: every builder must reach "
                "the registry under that name (a builder on another machine does not see this machine's 127.0.0.1); "
                "use a registry address every builder reaches")
    if "failed to prepare" in text and "no such file or directory" in text:
        # Seen after `docker image prune`: BuildKit records point at removed layers.
        return "BuildKit's cache refers to layers that were pruned; run `docker builder prune -af` and retry"
    if "pip install" in text and ("HTTPSConnection" in text or "SSLError" in text):
        return "pip could not reach the index from the build; check the proxy and the CA bundle (SSL_CERT_FILE)"
    if "pull access denied" in text or "unauthorized" in text or "x509" in text:
        return ("the engine could not pull the build base from the registry: see `invoke doctor` "
                "(CA in /etc/docker/certs.d/<host>/ca.crt, credentials in REGISTRY_USERNAME/REGISTRY_PASSWORD)")
    return None


def export_stage(image: ImagePlan, stage: str, ctx: Path, build_args: dict[str, str], cache: layers_mod.BlobCache,
                 c: layers_mod.Codec, log=print, no_cache: bool = False, docker_config: str | None = None,
                 builder: Builder | None = None, halt: "Halt | None" = None, registry: str | None = None
                 ) -> list[tuple[str, layers_mod.Layer]]:
    """Run one layer stage with BuildKit and turn its exported files into layer blobs, one per group.

    A dependency stage's export holds the groups layer_split made
    (`<NN>-<name>/...`); each becomes one layer, in order. The app stage is
    one layer.

    The tar streams from BuildKit (`--output type=tar,dest=-`) straight into
    the normalizer and compressor: nothing is unpacked into the engine's
    image store or written to disk uncompressed. Should BuildKit ever send
    entries out of sorted order, the stage is exported again to a file and
    sorted there, so the layer is the same either way.
    """
    client = engine.build_client()
    cmd = [*[a for a in client.argv if a != "--load"], "--progress=plain", "--platform", image.platform,
           "--target", export_target(stage), *(["--no-cache"] if no_cache else []),
           "--secret", f"id=ca,src={engine.ca_bundle()}", "-f", str(ctx / "Dockerfile")]
    for k, v in build_args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    env = {**engine.builder_env(builder), **dict(client.env)}  # DOCKER_HOST (and TLS) of this platform's engine
    if docker_config:
        env["DOCKER_CONFIG"] = docker_config
    label = f"{image.key}/{image.backend.name} {image.arch} {stage}"
    started = time.monotonic()
    rate = layers_mod.Rate(f"{label}: exporting and compressing", log)
    where = {"builder": builder, "halt": halt, "registry": registry}
    split = stage != "app"

    def from_stream(out):
        return (layers_mod.write_layers(out, cache, c, progress=rate) if split
                else [(stage, layers_mod.write_layer(out, cache, c, progress=rate))])

    def from_file(path: Path):
        return (layers_mod.write_layers_from_file(path, cache, c, progress=rate) if split
                else [(stage, layers_mod.write_layer_from_file(path, cache, c, progress=rate))])
    try:
        groups = _run_export([*cmd, "--output", "type=tar,dest=-", str(ctx)], env, label, log, started,
                             from_stream, **where)
    except layers_mod.UnsortedStream:
        log(f"  {label}: BuildKit's tar is not in sorted order; exporting to a file to sort it")
        with tempfile.TemporaryDirectory(prefix="orch-export-") as tmp:
            out = Path(tmp) / "layer.tar"
            _run_export([*cmd, "--output", f"type=tar,dest={out}", str(ctx)], env, label, log, started, None,
                        **where)
            groups = from_file(out)
    took = time.monotonic() - started
    size, blob = sum(lay.size for _, lay in groups), sum(lay.blob_size for _, lay in groups)
    log(f"  {label}: {len(groups)} layer{'s' if len(groups) > 1 else ''} {size / 1e6:,.1f} MB -> {blob / 1e6:,.1f} MB "
        f"{c.name} in {took:.1f} s (build, export and compression)")
    if len(groups) > 1:
        log(f"    {'; '.join(f'{g}: {lay.blob_size / 1e6:,.1f} MB' for g, lay in groups)}")
    return groups


def _run_export(cmd: list[str], env: dict, label: str, log, started: float, consume,
                builder: Builder | None = None, halt: "Halt | None" = None, registry: str | None = None):
    """Run a BuildKit export; consume(stdout) reads the tar when it goes to stdout. Progress goes to log."""
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if consume else subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if halt is not None:
        halt.track(proc)

    def pump() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            # Step starts and ends are progress enough; pip's chatter stays in the tail.
            if (" [" in line and line.startswith("#")) or " DONE " in line or "ERROR" in line:
                log(f"  {label} {time.monotonic() - started:6.0f}s {line[:140]}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    result, failure = None, None
    try:
        if consume:
            try:
                result = consume(proc.stdout)
            except layers_mod.UnsortedStream:
                proc.kill()
                raise
            except (tarfile.TarError, OSError) as e:  # the build failed and the stream ended early
                failure = e
    except BaseException:
        # Ctrl-C or an error of ours: the build client must not outlive us. A terminal's
        # Ctrl-C reached it already (same process group); a signal sent to us alone did not.
        _stop(proc)
        raise
    finally:
        code = proc.wait()
        reader.join(timeout=10)
        if halt is not None:
            halt.untrack(proc)
    if code != 0 or failure is not None:
        if halt is not None and halt.stopped:  # stopped by us: another builder failed, or Ctrl-C
            raise Halted(label)
        if not engine.engine_running(builder):
            own = os.environ.get("DOCKER_HOST") or (builder is not None and builder.key)
            start = "start it again" if own else "start it again (`invoke engine.up`)"
            raise EnvironmentProblem(
                f"the Docker Engine at {engine.engine_address(builder)} stopped answering during the build of {label}",
                f"{start} and re-run: this image was neither pushed nor tagged, and the layers already built "
                "are reused")
        text = "\n".join(tail)
        on = f" on {builder}" if builder is not None and builder.key else ""
        raise EnvironmentProblem(f"build of {label} failed{on}:\n" + "\n".join("    " + t for t in tail),
                                 _hint(text, builder, registry))
    return result


class Halted(Exception):
    """A builder's work stopped because another builder failed or the run was interrupted."""


class Halt:
    """Stops every builder's work at once: no new image or stage starts, running build clients are stopped.

    Set when one builder fails or the run is interrupted; the others unwind
    with Halted, so the first failure is the one reported.
    """

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self.stopped:
            raise Halted()

    def track(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.add(proc)
        if self.stopped:  # started just as the run was stopped
            _stop(proc)

    def untrack(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def stop(self) -> None:
        self._event.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            _stop(proc)


def on_builders(groups: list[tuple[Builder, list]], work, halt: Halt) -> None:
    """work(builder, images) for every builder: in this thread for one, else one thread per builder.

    The first failure stops the other builders and is raised once they have
    unwound; Ctrl-C (which reaches this thread only) stops them all.
    """
    if len(groups) == 1:
        work(*groups[0])
        return
    errors: list[BaseException] = []

    def run(builder: Builder, images: list) -> None:
        try:
            work(builder, images)
        except Halted:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors.append(e)
            halt.stop()

    threads = [threading.Thread(target=run, args=group, name=f"build on {group[0].host}", daemon=True)
               for group in groups]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException:
        halt.stop()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def engine_docker_config(host: str) -> str | None:
    """A private DOCKER_CONFIG for the build client holding the credentials our registry client uses.

    BuildKit pulls the build base through the docker CLI's credentials, which
    never see REGISTRY_USERNAME/REGISTRY_PASSWORD or a credential helper's
    answer: one credential configuration for everything the tool sends.
    None when there are no credentials (the CLI's own config is used).
    """
    import base64

    from .registry import docker_auth_config, registry_host

    auth = docker_auth_config(host)
    if not auth:
        return None
    host = registry_host(host)
    entry = ({"identitytoken": auth["identitytoken"]} if "identitytoken" in auth else
             {"auth": base64.b64encode(f"{auth['username']}:{auth['password']}".encode()).decode()})
    d = tempfile.mkdtemp(prefix="orch-docker-config-")
    fd = os.open(os.path.join(d, "config.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"auths": {host: entry}}, fh)
    return d


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
    locks = load_all_locks(project, backends, platforms)
    plan: BuildPlan = make_plan(project, locks, backends, services, platforms,
                                system=lock_mod.load_apt_locks(project, platforms))
    # Only the engines of the platforms this run builds must answer.
    builders = {p: engine.builder_for(project, p) for p in dict.fromkeys(i.platform for i in plan.images)}
    natives = connect_builders(project, builders, log)  # each engine answers; the platform it runs natively
    texts = render_all(plan)
    cache = layers_mod.default_cache()
    c = layers_mod.codec(project.compression)
    # Pip stages run on each engine's own platform: its build base is that platform's base, needed now.
    # A base no engine here runs natively is only assembled on: if it must be bootstrapped (minutes of
    # maintainer scripts under QEMU), that runs in the background while the other platforms build.
    needed = list(dict.fromkeys([*(i.platform for i in plan.images), *natives.values()]))
    bases = base_mod.Bases(project, needed, [p for p in needed if p not in natives.values()], reg, cache, log)
    uploader = Uploader(reg.host, log)
    docker_config = engine_docker_config(reg.host)  # BuildKit pulls the build base with our credentials
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
    halt = Halt()

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
            ctx, ctx_digest = stage_context(project, image, texts[image.dockerfile])
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
        on_builders(list(groups.items()), on_builder, halt)
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
        natives[builder] = engine.engine_platform(engine.docker_client(timeout=30, builder=builder), builder.host)
    if project.builders:
        from .preflight import is_loopback

        for platform, builder in builders.items():
            log(f"{platform}: builds on {builder}, a {natives[builder]} engine")
        for builder in natives:
            if is_loopback(project.registry) and not engine.is_local(builder):
                log(f"warning: {builder} is another machine, but registry {project.registry} is this machine's "
                    "loopback: that engine would look for it on its own; use a registry address every builder "
                    "reaches")
    return natives


def _build_one(project, image: ImagePlan, ctx: Path, tag: str, name: str, base, build_base, parent_img, parent,
               cache, c, uploader: Uploader, reg: Registry, log, rebuild: bool, no_cache: bool,
               docker_config: str | None, builder: Builder | None = None, halt: Halt | None = None,
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
            groups = export_stage(image, stage, ctx, args, cache, c, log, no_cache=no_cache,
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
