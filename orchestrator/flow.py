"""The one place that chains the stages; every task is one function here.

    init     = find the services -> write a starting project file (and its requirement files)
    lock     = base -> resolve (Python with uv, Debian packages) -> source builds
    render   = locks -> plan -> Dockerfiles
    build    = locks -> plan -> render -> build (bases, layers, push by content tag)
    smoke    = build what is missing -> smoke
    publish  = signing key -> build -> smoke (the gate) -> promote (SBOMs, signatures and provenance,
               indexes, backend manifests)
    select   = probe the host -> backend manifest -> choose -> verify signatures and the registry
    run      = probe -> backend manifest -> verify signatures and the registry -> launch with fallback
    engine.* = the machine: engine, registry, emulation, bases; gc

Each stage module takes what it needs as arguments and returns a result;
none imports a later one (tests/unit/test_layout.py keeps it so). The
environment and machine state are read here, at the edge, and passed in.

Runs that push hold the registry's push lock shared and their project's run
lock alone (see `run_lock`); `engine.gc` holds the push lock alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from pathlib import Path

from orchestrator.build import bases as bases_mod
from orchestrator.build import images, sdist
from orchestrator.build.plan import BuildPlan, check_selection, make_plan
from orchestrator.build.render import HEADER, render_all
from orchestrator.build.result import BuildResult
from orchestrator.common import meter
from orchestrator.common.errors import UserError
from orchestrator.common.files import atomic_write, held
from orchestrator.common.hostinfo import is_loopback
from orchestrator.common.places import state_dir
from orchestrator.debian import basepin
from orchestrator.debian import locks as apt_locks
from orchestrator.host import launch as launch_mod
from orchestrator.host import probe as probe_mod
from orchestrator.host import select as select_mod
from orchestrator.machine import daemon, preflight, registry_server
from orchestrator.oci import backends as manifests
from orchestrator.oci import signing
from orchestrator.oci.layers import default_cache
from orchestrator.oci.registry import Registry, split_ref
from orchestrator.project import lock as lock_mod
from orchestrator.project import scaffold
from orchestrator.project import spec as spec_mod
from orchestrator.release import gc as gc_mod
from orchestrator.release import publish as publish_mod
from orchestrator.release import smoke as smoke_mod
from orchestrator.release import verify as verify_mod

DOCKERFILE_DIR = "dockerfiles"
RUN_LOCK = ".build/run.lock"


def load_project(path: str) -> spec_mod.Project:
    return spec_mod.load(path)


# --- init ----------------------------------------------------------------------

def init(root: Path, services_dir: str | None = None, command: tuple[str, ...] | None = None,
         name: str | None = None, port: int = 8000, cuda: bool = True, torch: bool = True,
         registry: str | None = None) -> tuple[list[Path], spec_mod.Project]:
    """Write a starting project file for the services under root; (files written, the loaded project).

    services_dir: where the service directories are (default: services/ when root has one, else root).
    registry: default $ORCH_REGISTRY, else the embedded registry.
    """
    root = Path(root).resolve()
    scaffold.refuse_existing(root)  # before looking for services: the plainer message
    project_name = name or scaffold.name_from(root.name)
    if not spec_mod.NAME_RE.match(project_name):
        raise UserError(f"{project_name!r} cannot be a project name (lower-case letters, digits and . _ -)",
                        "pass --name NAME, e.g. --name " + (scaffold.name_from(project_name) or "speech"))
    if services_dir is None:
        services_dir = "services" if (root / "services").is_dir() else "."
    found = scaffold.find_services(root, services_dir, command)
    made = scaffold.make(root, found, project_name, registry or os.environ.get("ORCH_REGISTRY")
                         or spec_mod.DEFAULT_REGISTRY, port, cuda=cuda, torch=torch)
    written = scaffold.write(root, made)
    return written, spec_mod.load(root / scaffold.PROJECT_FILE)


# --- lock ----------------------------------------------------------------------

def stale_locks(project: spec_mod.Project) -> list[lock_mod.Stale]:
    """Every lock `lock --check` names: Python locks, Debian package locks, and the base pin."""
    stale = lock_mod.check(project) + apt_locks.apt_check(project)
    stale += [lock_mod.Stale(Path(basepin.PIN_FILE), why.split(": ", 1)[1])
              for why in basepin.stale(project, daemon.base_platforms(project))]
    return stale


def lock(project: spec_mod.Project, log=print, upgrade: bool = False) -> list[Path]:
    """Re-resolve the (backend, platform) targets whose locks are stale, then the stale apt locks.

    Fresh locks are left alone unless upgrade is set, so re-running never
    moves a pin by itself. An allowed sdist is built into a wheel on the
    platform's base, which is made present in the registry first.
    """
    with run_lock(project, "lock"):
        return _lock(project, log, upgrade)


def _lock(project: spec_mod.Project, log, upgrade: bool) -> list[Path]:
    changed: list[Path] = []
    stale_paths = {s.path for s in lock_mod.check(project)}
    reg = Registry(project.registry, login=project.login)
    # The base pin is a lock like the others (`lock --check` names it): a new project, or one whose
    # base settings changed, gets it here as `engine.up` would give it, so lock alone makes the check pass.
    for platform in daemon.base_platforms(project):
        if platform not in basepin.read_pins(project):
            _, how = bases_mod.ensure(project, platform, reg, default_cache(), log=log)
            log(f"base for {platform}: {how}")
            if basepin.pin_path(project) not in changed:
                changed.append(basepin.pin_path(project))

    def build_sdists(backend, platform, pins, names):
        base, _ = bases_mod.ensure(project, platform, reg, default_cache(), log=log)
        return sdist.pin_built_wheels(pins, names, platform, base, backend.sources, log=log)

    for backend, platform in lock_mod.targets(project):
        paths = {Path(os.path.relpath(lock_mod.lock_path(project.root, backend.name, platform, layer), project.root))
                 for layer in lock_mod.expected_layers(project, backend, platform)}
        if not upgrade and not (paths & stale_paths):
            log(f"{backend.name} for {platform}: locks are up to date")
            continue
        log(f"locking {backend.name} for {platform}")
        previous = {} if upgrade else {
            layer: lock_mod.read_pins(lock_mod.lock_path(project.root, backend.name, platform, layer))
            for layer in lock_mod.expected_layers(project, backend, platform)}
        locks = lock_mod.resolve_backend(project, backend, platform, previous, build_sdists=build_sdists)
        for lk in locks:
            log(f"  {lk.layer:<16} {len(lk.pins):>3} packages")
        changed += lock_mod.write_locks(project, locks)
    changed += apt_locks.resolve_apt(project, upgrade=upgrade, log=log)
    for stale in lock_mod.check(project) + apt_locks.apt_check(project):
        if stale.reason == "no longer used by the project file":
            (project.root / stale.path).unlink()
            log(f"removed {stale.path} (no longer used)")
    return changed


def load_all_locks(project: spec_mod.Project, backends=None, platforms=None) -> dict:
    """(backend, platform) -> its locks, refusing stale ones (a build from them would not be what was asked)."""
    out = {}
    for backend, platform in lock_mod.targets(project):
        if (backends and backend.name not in backends) or (platforms and platform not in platforms):
            continue
        out[(backend.name, platform)] = lock_mod.load_locks(project, backend, platform)
    stale = [s for s in lock_mod.check(project) if s.reason != "no longer used by the project file"]
    if stale:
        raise UserError("locks are stale: " + ", ".join(str(s.path) for s in stale), "run `invoke lock`")
    return out


# --- plan and render -------------------------------------------------------------

def plan(project: spec_mod.Project, backends=None, services=None, platforms=None) -> BuildPlan:
    check_selection(project, backends, services, platforms)
    return make_plan(project, load_all_locks(project, backends, platforms), backends, services, platforms,
                     system=apt_locks.load_apt_locks(project, platforms))


def rendered(project: spec_mod.Project) -> dict[str, str]:
    return render_all(plan(project))


def _generated(directory: Path) -> list[Path]:
    marker = HEADER.split("{")[0]
    return [p for p in sorted(directory.glob("*.Dockerfile")) if p.read_text().startswith(marker)]


def render(project: spec_mod.Project, check: bool = False) -> list[str]:
    """Write dockerfiles/; with check, write nothing and return what differs."""
    out_dir = project.root / DOCKERFILE_DIR
    files = rendered(project)
    differ = []
    for name, text in sorted(files.items()):
        path = out_dir / name
        if not path.exists() or path.read_text() != text:
            differ.append(name)
            if not check:
                atomic_write(path, text)
    for path in _generated(out_dir) if out_dir.exists() else []:
        if path.name not in files:
            differ.append(path.name)
            if not check:
                path.unlink()
    return differ


# --- build, smoke, publish ---------------------------------------------------------

def build(project: spec_mod.Project, backends=None, services=None, platforms=None, log=print,
          force: bool = False, no_cache: bool = False, stats: dict | None = None) -> list[BuildResult]:
    """Render, then build and push by content tag what the registry lacks (no human tag moves)."""
    with run_lock(project, "build"):
        render(project)
        the_plan = plan(project, backends, services, platforms)
        return images.build(project, the_plan, render_all(the_plan), log=log, force=force, no_cache=no_cache,
                            stats=stats)


def variants(project: spec_mod.Project, services=None, backends=None, platforms=None,
             log=None) -> list[smoke_mod.Variant]:
    """The variants of the project's current inputs, by digest: built and pushed first where missing."""
    return smoke_mod.variants_from_builds(project, build(project, backends, services, platforms,
                                                         log=log or (lambda *_: None)))


def smoke_engines(project: spec_mod.Project, platforms) -> dict[str, smoke_mod.Engine]:
    """The engine each platform's smoke containers run on where the project names one (smoke.engines, else
    builders); platforms left out run on the default engine."""
    out = {}
    for platform in sorted(set(platforms)):
        builder = daemon.smoke_engine_for(project, platform)
        if builder is None:
            continue
        client = daemon.docker_client(builder=builder)
        out[platform] = smoke_mod.Engine(client, builder.key, daemon.engine_platform(client, builder.host),
                                         daemon.builder_env(builder), local=daemon.is_local(builder))
    return out


def smoke(project: spec_mod.Project, services=None, backends=None, platforms=None, log=print,
          ready_timeout: float = smoke_mod.READY_TIMEOUT, jobs: int | None = None) -> list[smoke_mod.VariantResult]:
    """Smoke-test every variant of the current inputs, building what is not built yet."""
    with run_lock(project, "smoke"):
        chosen = variants(project, services, backends, platforms, log=log)
        return smoke_mod.run(chosen, daemon.docker_client(), log=log, ready_timeout=ready_timeout, jobs=jobs,
                             engines=smoke_engines(project, {v.platform for v in chosen}), login=project.login)


def publish(project: spec_mod.Project, services: list[str] | None = None, log=print, smoke: bool = True,
            ready_timeout: float = smoke_mod.READY_TIMEOUT, jobs: int | None = None,
            signer: signing.Signer | None = None, unsigned: bool = False) -> publish_mod.PublishReport:
    """Build what is missing (pushed by content tag), smoke-test exactly those digests, then sign and promote.

    A smoke failure promotes nothing: human tags, indexes and backend
    manifests keep naming the previous release. signer: the release key
    (the task reads it from the environment); without one, a registry on
    this machine's loopback gets this machine's key, any other is refused
    before anything is built, unless unsigned.
    """
    services = services or list(project.services)
    signed_by = release_signing(project, signer, unsigned, log)  # refused before any work
    timings = meter.Meter()  # where the time goes: one line per phase at the end (PublishReport.timings)
    with run_lock(project, "publish"), timings.recording():
        if smoke and project.compression == "zstd":
            publish_mod.check_engine_pulls_zstd(daemon.docker_client().version().get("Version", "0"))
        run = publish_mod.RunFacts.now({p: str(daemon.builder_for(project, p)) for p in project.platforms},
                                       tool_commit())
        results = build(project, services=services, log=log)
        checked, gate = [], publish_mod.SmokeGate(False)
        if smoke:
            chosen = smoke_mod.variants_from_builds(project, results)
            engines = smoke_engines(project, {v.platform for v in chosen})
            previous = publish_mod.promoted_manifests(project, services)
            reused = publish_mod.reusable_records(project, previous, {p: e.name for p, e in engines.items()})
            todo = [v for v in chosen if v.image not in reused]
            if len(todo) < len(chosen):
                log(f"smoke: {len(chosen) - len(todo)} image(s) were smoke-tested for the promoted release; "
                    "their records are reused, not re-run")
            with meter.timed("smoke"):
                checked = smoke_mod.run(todo, daemon.docker_client(), log=log, ready_timeout=ready_timeout,
                                        jobs=jobs, engines=engines, login=project.login) if todo else []
            failed = [r for r in checked if not r.ok]
            if failed:
                raise publish_mod.SmokeFailed(failed)
            gate = publish_mod.smoke_gate(project, checked, {v.image: reused[v.image] for v in chosen
                                                             if v.image in reused}, previous)
            log(f"smoke: {len(checked)} variant(s) smoke-tested by this publish "
                f"({sum(r.result == 'ran' for r in checked)} ran, {sum(r.result == 'partial' for r in checked)} "
                f"partial), {len(chosen) - len(todo)} reused from the promoted release")
            for r in checked:
                if r.result == "partial":
                    log(f"smoke: {r.label()} is partial, promoted as {publish_mod.ALLOW_PARTIAL} allows: "
                        f"{r.why_partial}")
        else:
            log("smoke tests skipped (--no-smoke): the backend manifest records smoke.ran = false")
        with meter.timed("promote"):
            report = publish_mod.promote(project, results, services, log=log, gate=gate, signing=signed_by, run=run)
        meter.add("promote", 0.0, report.uploaded_bytes)
        report.uploaded_bytes += sum(r.uploaded_bytes for r in results)
        report.smoke = checked
        report.reused = {image: r for image, r in gate.records.items() if r.get("reused")}
    report.timings = timings
    return report


def trusted_keys(project: spec_mod.Project, state: Path | None = None) -> tuple[signing.PublicKey, ...]:
    """Whose signatures this machine accepts for the project: `trust.keys`, plus its own key for a loopback registry."""
    keys = project.trust
    if is_loopback(project.registry):
        machine = signing.machine_public_key(state or state_dir())
        if machine is not None and machine.keyid not in {k.keyid for k in keys}:
            keys += (machine,)
    return keys


def release_signing(project: spec_mod.Project, signer: signing.Signer | None, unsigned: bool, log=print,
                    state: Path | None = None) -> publish_mod.Signing | None:
    """Who signs this publish: the key given, else this machine's for a loopback registry; None when --unsigned."""
    if unsigned:
        log("not signing (--unsigned): the backend manifest records signed: false, and hosts refuse to run it")
        return None
    if signer is None:
        if not is_loopback(project.registry):
            raise UserError(f"no signing key to publish to {project.registry}: hosts run only releases signed by a "
                            f"key {project.file.name} trusts", signing.GIVE_A_KEY
                            + "; or pass --unsigned to publish unsigned (recorded; hosts refuse to run it)")
        signer = signing.machine_signer(state or state_dir())
    trusted = trusted_keys(project, state)
    if signer.public.keyid not in {k.keyid for k in trusted}:
        listed = ", ".join(str(k) for k in trusted) or "none"
        raise UserError(f"the signing key {signer.public} is not one {project.file.name} trusts (trust.keys: {listed}):"
                        " hosts would refuse everything it signs",
                        "add its public key file to trust.keys, or sign with a key listed there")
    return publish_mod.Signing(signer, trusted)


def tool_commit(here: Path | None = None) -> str | None:
    """The git commit this tool runs from, when it runs from a checkout (for provenance); read, not run."""
    here = here or Path(__file__).resolve().parent.parent
    sha = re.compile(r"^[0-9a-f]{40}$")
    try:
        gitdir = here / ".git"
        if gitdir.is_file():  # a worktree: "gitdir: <path>"
            gitdir = (here / gitdir.read_text().split("gitdir:", 1)[1].strip()).resolve()
        common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve() \
            if (gitdir / "commondir").exists() else gitdir
        head = (gitdir / "HEAD").read_text().strip()
        if sha.match(head):
            return head
        ref = head.removeprefix("ref: ")
        for d in (gitdir, common):
            if (d / ref).is_file():
                found = (d / ref).read_text().strip()
                return found if sha.match(found) else None
        for line in (common / "packed-refs").read_text().splitlines() if (common / "packed-refs").exists() else ():
            if line.endswith(" " + ref) and sha.match(line.split()[0]):
                return line.split()[0]
    except (OSError, IndexError, ValueError):
        pass
    return None


def make_keys(private: Path, public: Path) -> signing.PublicKey:
    """`invoke keys`: a new release key pair (private 0600, public to commit); never overwrites."""
    return signing.write_key_pair(private, public)


# --- on a host: select and run ------------------------------------------------------

def backend_manifest(project: spec_mod.Project, service: str, manifest_file: str | None = None):
    """(backend manifest, where it came from, its artifact ref in the registry, that artifact's digest or None)."""
    ref = f"{project.repository(service)}:{manifests.artifact_tag(project.services[service].version)}"
    if manifest_file:
        return manifests.load_manifest_file(manifest_file), manifest_file, ref, None
    data, digest = manifests.fetch_artifact(ref, project.login)  # the artifact's digests checked
    return data, ref, ref, digest


def verify(project: spec_mod.Project, data: dict, source: str, ref: str, digest: str | None, platform: str,
           backend_names, state: Path | None = None) -> None:
    """Refuse a release that is not signed by a trusted key, a manifest file the registry does not serve,
    and backends whose images or tags moved or whose signatures fail. The project's login goes to its host only."""
    trusted = trusted_keys(project, state)
    verify_mod.check_trust(trusted, project.file.name, project.registry)
    login = project.login
    if source != ref:
        digest = verify_mod.check_file_matches_registry(data, source, ref, login=login)
    host, name, _ = split_ref(ref)
    verify_mod.check_signature(Registry(host, login=login), name, digest, trusted, "the backend manifest", source,
                               data.get("signed") is False)
    for backend in backend_names:
        verify_mod.check_backend(data, platform, backend, source, login=login)
        verify_mod.check_backend_signatures(data, platform, backend, source, trusted, login=login)


def select(project: spec_mod.Project, service: str, host: probe_mod.Host, backend: str | None = None,
           manifest_file: str | None = None, check: bool = True):
    """Which image this host should run for service, and why: (choice, manifest source)."""
    data, source, ref, digest = backend_manifest(project, service, manifest_file)
    choice = select_mod.select(data, host, backend, source)
    if check:
        verify(project, data, source, ref, digest, choice.platform, [choice.backend])
    return choice, source


def run(project: spec_mod.Project, service: str, backend: str | None = None, manifest_file: str | None = None,
        host_port: int = 0, log=print) -> launch_mod.Launch:
    """Start a service by digest from its default backend; on exit 78 the next one at once."""
    host = probe_mod.probe()
    data, source, ref, digest = backend_manifest(project, service, manifest_file)
    # Always verified: run may walk the whole fallback list, and starts each image by digest.
    verify(project, data, source, ref, digest, host.platform,
           sorted((data["platforms"].get(host.platform) or {}).get("backends") or {}))
    started = launch_mod.launch(daemon.docker_client(), data, host.platform, project.services[service].port,
                                f"orch-{project.name}-{service}", override=backend, host_port=host_port, log=log)
    if started.backend:
        record, gate = manifests.smoke_record(data, host.platform, started.backend)
        log(f"{started.backend} smoke: {manifests.describe_smoke(record, gate)}")
    return started


def sbom(project: spec_mod.Project, service: str, backend: str, platform: str) -> tuple[str, bytes]:
    """The CycloneDX SBOM of a promoted image: (image ref, the document), every digest on the way checked."""
    return publish_mod.published_sbom(project, service, backend, platform)


def verify_release(project: spec_mod.Project, services: list[str] | None = None, log=print) -> int:
    """A whole release checked the way hosts check what they run: for every service, platform and backend,
    the backend manifest's and each image's and index's signatures by a trusted key, the registry still
    serving what the manifest names, and each image's signed provenance naming it. Returns the variants checked;
    the first failure is a UserError (exit 2) naming the artifact."""
    trusted = trusted_keys(project)
    verify_mod.check_trust(trusted, project.file.name, project.registry)
    checked = 0
    for service in services or list(project.services):
        data, source, ref, digest = backend_manifest(project, service)
        for platform, entry in sorted(data["platforms"].items()):
            names = sorted(entry["backends"])
            verify(project, data, source, ref, digest, platform, names)
            for backend in names:
                image, _ = publish_mod.published_provenance(project, service, backend, platform, trusted)
                checked += 1
            log(f"{service} {platform}: {', '.join(names)}: signed by a trusted key, provenance signed, "
                "served as published")
    return checked


def provenance(project: spec_mod.Project, service: str, backend: str, platform: str):
    """The signed provenance of a promoted image: (image ref, found), its signature and subject checked."""
    trusted = trusted_keys(project)
    verify_mod.check_trust(trusted, project.file.name, project.registry)
    return publish_mod.published_provenance(project, service, backend, platform, trusted)


# --- the machine -------------------------------------------------------------------

def engine_up(project: spec_mod.Project, bootstrap_now: bool = False, log=print) -> None:
    """Start what is missing: dockerd, the registry, emulation for foreign platforms, the pinned bases."""
    preflight.ensure(project, install=True)  # every tool named up front, installed or refused before work starts
    log(f"engine:   {daemon.ensure_engine()}")
    log(f"registry: {registry_server.ensure_registry(project.registry)}")
    for platform in project.platforms:
        if platform != daemon.host_platform():  # a native arm64 runner needs no emulator for arm64
            log(f"binfmt:   {daemon.ensure_binfmt(platform)}")
    with push_lock(project.registry, "engine.up"):  # bases are pushed: engine.gc must not run meanwhile
        for platform in daemon.base_platforms(project):
            later = not bootstrap_now and platform != daemon.host_platform()
            found, how = bases_mod.ensure(project, platform, log=log, defer=later)
            log(f"base:     {platform}: {found.ref if found else 'pinned'} ({how})")


def gc(host: str, keep: int, dry_run: bool = False, log=print, config: Path | None = None,
       state: Path | None = None, login=None):
    """`engine.gc`: apply the retention policy to a registry (see orchestrator.release.retention).

    A dry run reads only, so it takes no lock; a real run holds the push lock alone.
    login: the environment's login (project.login), sent to its own host only.
    """
    if dry_run:
        return gc_mod.gc(host, keep, dry_run=True, log=log, config=config, login=login)
    with gc_lock(host, log, state):
        return gc_mod.gc(host, keep, dry_run=False, log=log, config=config, login=login)


# --- who may push when ---------------------------------------------------------------

def registry_lock_path(host: str, state: Path | None = None) -> Path:
    """The lock pushes to a registry share and `engine.gc` takes alone (one file per registry host)."""
    return (state or state_dir()) / "locks" / ("registry-" + re.sub(r"[^A-Za-z0-9.-]", "_", host) + ".lock")


def _stderr(msg: str) -> None:
    # Waiting is news, not output: stdout may be JSON (--json).
    print(msg, file=sys.stderr, flush=True)


def _holder_pid(text: str) -> str:
    return text.split()[0] if text.split() else "unknown"


def _holder_what(text: str, default: str) -> str:
    return text.split(None, 1)[1] if len(text.split()) > 1 else default


# Locks this process holds: a flow step run inside another (publish's build) does not wait for itself.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


@contextlib.contextmanager
def _once(key: str, acquire):
    with _held_guard:
        nested = _held.get(key, 0) > 0
        _held[key] = _held.get(key, 0) + 1
    try:
        if nested:
            yield
        else:
            with acquire():
                yield
    finally:
        with _held_guard:
            _held[key] -= 1


@contextlib.contextmanager
def run_lock(project: spec_mod.Project, what: str, log=_stderr, state: Path | None = None):
    """What `invoke lock`, `build`, `smoke` and `publish` hold while they run.

    The project's run lock, alone: a second run on the same project waits
    (saying for whom), then finds in the registry what the first pushed and
    re-uses it; locks, Dockerfiles and manifests are never written by two
    runs at once. Then the registry's push lock, shared with every other
    push: `engine.gc` takes it alone, so it never deletes blobs a push has
    uploaded but not yet named in a manifest, and never stops the registry
    under a push. Held once per process: a step inside another takes nothing.
    """
    def project_busy(holder: str) -> None:
        log(f"waiting for another {_holder_what(holder, 'build/publish')} of this project "
            f"(pid {_holder_pid(holder)}) to finish ({project.root / RUN_LOCK}) …")

    def acquire():
        stack = contextlib.ExitStack()
        stack.enter_context(held(project.root / RUN_LOCK, note=what, on_wait=project_busy))
        stack.enter_context(push_lock(project.registry, what, log, state))
        return stack

    with _once(f"run {project.root}", acquire):
        yield


@contextlib.contextmanager
def push_lock(host: str, what: str, log=_stderr, state: Path | None = None):
    """The registry's push lock, shared: pushes go side by side, `engine.gc` waits for them (and they for it)."""
    def gc_running(holder: str) -> None:
        log(f"waiting for {_holder_what(holder, 'engine.gc')} on {host} (pid {_holder_pid(holder)}) "
            "to finish before pushing …")

    path = registry_lock_path(host, state)
    with _once(f"push {path}", lambda: held(path, shared=True, note=what, on_wait=gc_running)):
        yield


@contextlib.contextmanager
def gc_lock(host: str, log=_stderr, state: Path | None = None):
    """`engine.gc` holds the registry's push lock alone: it waits for running pushes, and new ones wait for it."""
    def pushing(holder: str) -> None:
        log(f"waiting for pushes to {host} to finish ({_holder_what(holder, 'a push')}, pid {_holder_pid(holder)}"
            " and any others) …")

    with held(registry_lock_path(host, state), note="engine.gc", on_wait=pushing):
        yield
