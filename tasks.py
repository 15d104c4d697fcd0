"""Tasks: argument parsing and printing only; the work lives in orchestrator/.

Run `invoke --list` for the tasks and `invoke <task> --help` for options.
"""

import os

from invoke import Collection, task
from invoke.exceptions import Exit

from orchestrator import build as build_mod
from orchestrator import engine, pipeline
from orchestrator.console import friendly, human_bytes, log, print_json, table

DEFAULT_PROJECT = os.environ.get("ORCH_PROJECT", "project.yaml")
PROJECT_HELP = "project file (default: project.yaml, or $ORCH_PROJECT)"


@task(help={"project": PROJECT_HELP, "check": "write nothing; exit 1 naming every stale or missing lock",
            "upgrade": "re-resolve every lock, even fresh ones (moves unpinned versions forward)"})
@friendly
def lock(c, project=DEFAULT_PROJECT, check=False, upgrade=False):
    """Resolve pinned, hashed requirement layers into locks/<backend>-<arch>/ with uv."""
    proj = pipeline.load_project(project)
    if check:
        from orchestrator import lock as lock_mod

        from orchestrator import base, engine as engine_mod

        stale = lock_mod.check(proj)
        for s in stale:
            log(f"stale: {s.path}: {s.reason}")
        base_stale = base.stale(proj, engine_mod.base_platforms(proj))
        for s in base_stale:
            log(f"stale: {s}")
        if stale or base_stale:
            raise Exit("locks are stale; run `invoke lock`", code=1)
        log("locks are up to date")
        return
    with pipeline.run_lock(proj, "lock"):
        changed = pipeline.lock(proj, log, upgrade=upgrade)
    log(f"{len(changed)} lock file(s) changed" if changed else "locks unchanged")


@task(help={"project": PROJECT_HELP, "check": "write nothing; exit 1 if dockerfiles/ differs from a fresh render"})
@friendly
def render(c, project=DEFAULT_PROJECT, check=False):
    """Write one Dockerfile per image and backend (every CUDA line, CPU) into dockerfiles/ (deterministic, diffable)."""
    proj = pipeline.load_project(project)
    differ = pipeline.render(proj, check=check)
    if check and differ:
        for name in differ:
            log(f"differs: dockerfiles/{name}")
        raise Exit("dockerfiles/ is out of date; run `invoke render`", code=1)
    log(("rendered: " + ", ".join(differ)) if differ and not check else "dockerfiles/ is up to date")


@task(help={
    "project": PROJECT_HELP,
    "backend": "cuda, cpu, a comma list, or all (default)",
    "service": "a service name, a comma list, or all (default)",
    "platform": "linux/amd64, linux/arm64, a comma list, or all the backend supports (default)",
    "force": "rebuild even when the content tag is already in the registry",
    "json": "print the results as JSON",
})
@friendly
def build(c, project=DEFAULT_PROJECT, backend="all", service="all", platform="all", force=False, json=False):
    """Build the CUDA-libs image, then the service images, and push them by content tag (no human tags)."""
    proj = pipeline.load_project(project)
    backends = pipeline.parse_list(backend, proj.backends, "backend", proj.file.name)
    services = pipeline.parse_list(service, proj.services, "service", proj.file.name)
    platforms = pipeline.parse_list(platform, proj.platforms, "platform", proj.file.name)
    with pipeline.run_lock(proj, "build"):
        pipeline.render(proj)
        results = build_mod.build(proj, backends, services, platforms, log=(lambda *_: None) if json else log,
                                  force=force)
    if json:
        print_json([{"image": r.image.key, "backend": r.image.backend.name, "platform": r.image.platform,
                     "ref": r.ref, "content_tag": r.content_tag, "built": r.built,
                     "uploaded_bytes": r.uploaded_bytes} for r in results])
        return
    table("build", ["image", "backend", "platform", "content tag", "digest", "built", "uploaded"],
          [[r.image.key, r.image.backend.name, r.image.platform, r.content_tag,
            r.digest[:19], "yes" if r.built else "cached", human_bytes(r.uploaded_bytes)] for r in results])
    log("pushed by content tag; `invoke publish` smoke-tests them and moves the human tags")


@task(help={
    "project": PROJECT_HELP,
    "service": "a service name, a comma list, or all (default)",
    "backend": "cuda, cpu, a comma list, or all (default)",
    "platform": "linux/amd64, linux/arm64, a comma list, or all built (default)",
    "ready_timeout": "seconds to wait for /ready to turn 200 (default 180)",
    "jobs": "variants of one backend and platform checked at once (default: one per core, at most 4)",
    "json": "print the results as JSON (for CI)",
})
@friendly
def smoke(c, project=DEFAULT_PROJECT, service="all", backend="all", platform="all", ready_timeout="180", jobs="0",
          json=False):
    """Launch every built variant and check health, /ready, /info, torch.cuda, the CUDA-libs layer and fallback."""
    from orchestrator import smoke as smoke_mod

    proj = pipeline.load_project(project)
    results = smoke_mod.run(proj, pipeline.parse_list(service, proj.services, "service", proj.file.name),
                            pipeline.parse_list(backend, proj.backends, "backend", proj.file.name),
                            pipeline.parse_list(platform, proj.platforms, "platform", proj.file.name),
                            log=(lambda *_: None) if json else log,
                            ready_timeout=pipeline.positive_seconds(ready_timeout, "--ready-timeout"),
                            jobs=pipeline.count(jobs, "--jobs") or None)
    if json:
        print_json([r.as_json() for r in results])
    else:
        table("smoke", ["service", "backend", "platform", "result", "checks", "seconds"],
              [[r.variant.service, r.variant.backend, r.variant.platform, "pass" if r.ok else "FAIL",
                f"{sum(c.ok for c in r.checks)}/{len(r.checks)}", f"{r.seconds:.0f}"] for r in results])
        for r in results:
            if not r.ok:
                log(f"{r.variant.service}/{r.variant.backend} {r.variant.platform} failed: "
                    + "; ".join(f"{c.name}: {c.detail}" for c in r.failures()))
                if r.logs:
                    log("  last log lines:\n    " + r.logs.replace("\n", "\n    "))
    if not results or not all(r.ok for r in results):
        raise Exit(code=1)


@task(help={
    "project": PROJECT_HELP,
    "service": "a service name, a comma list, or all (default)",
    "no_smoke": "promote without smoke tests (recorded in the backend manifest as smoke.ran = false)",
    "json": "print the result as JSON",
})
@friendly
def publish(c, project=DEFAULT_PROJECT, service="all", no_smoke=False, json=False):
    """Build what is missing, smoke-test exactly those digests, then promote: indexes, human tags, backend manifests."""
    from orchestrator import publish as publish_mod

    proj = pipeline.load_project(project)
    services = pipeline.parse_list(service, proj.services, "service", proj.file.name)
    with pipeline.run_lock(proj, "publish"):
        pipeline.render(proj)
        report = publish_mod.publish(proj, services, log=(lambda *_: None) if json else log, smoke=not no_smoke)
    if json:
        print_json({"uploaded_bytes": report.uploaded_bytes, "artifacts": report.artifacts,
                    "manifests": {k: str(v) for k, v in report.manifests.items()}})
        return
    for svc, path in report.manifests.items():
        log(f"{svc}: {report.artifacts[svc]} (written to {path.relative_to(proj.root)})")
    log(f"uploaded {report.uploaded_bytes:,} bytes" + (" (nothing changed)" if report.uploaded_bytes == 0 else ""))


def _manifest_for(proj, service, manifest):
    """(backend manifest, where it came from, its artifact ref in the registry)."""
    from orchestrator import publish as publish_mod

    ref = f"{proj.repository(service)}:{publish_mod.artifact_tag(proj.services[service].version)}"
    if manifest:
        return publish_mod.load_manifest_file(manifest), manifest, ref
    return publish_mod.fetch_manifest(ref), ref, ref  # fetch_manifest checks the artifact's digests


def _verify(data, source, ref, platform, backends):
    """Refuse a manifest file the registry does not serve, and backends whose images or tags moved."""
    from orchestrator import verify as verify_mod

    if source != ref:
        verify_mod.check_file_matches_registry(data, source, ref)
    for backend in backends:
        verify_mod.check_backend(data, platform, backend, source)


@task(name="select", help={
    "project": PROJECT_HELP,
    "service": "the service to choose an image for (required)",
    "backend": "override the choice (also $ORCH_BACKEND); still checked against this host",
    "manifest": "read the backend manifest from this file instead of the registry",
    "root": "probe a host root other than / (for inspecting a mounted system)",
    "json": "print backend, image, platform, reasons and host as JSON",
    "gpus": "take the driver and GPUs from this report (what `python3 orchestrator/runtime/gpus.py` "
            "printed on some host) instead of asking NVML here: which line would that host get?",
    "machine": "the host's architecture with --root/--gpus (x86_64 or aarch64; default: this machine's)",
    "no-verify": "do not check the manifest and its images against the registry (offline what-if questions "
                 "with --manifest); the answer then says it is unverified",
})
@friendly
def select_(c, service=None, project=DEFAULT_PROJECT, backend=None, manifest=None, root="/", json=False,
            gpus=None, machine=None, no_verify=False):
    """Say which image this host should run for a service, and why (walks the fallback list)."""
    from orchestrator import probe, select as select_mod

    proj = pipeline.load_project(project)
    pipeline.one(service, proj.services, "service", proj.file.name)
    if gpus:
        report = pipeline.read_gpu_report(gpus)
        host = probe.probe(root, machine=machine, nvml=lambda: report.get("driver"),
                           gpus=lambda: [probe.Gpu.from_report(g, report.get("source") or "report")
                                         for g in report.get("gpus") or []])
    else:
        host = probe.probe(root, machine=machine)
    data, source, ref = _manifest_for(proj, service, manifest)
    choice = select_mod.select(data, host, backend or os.environ.get("ORCH_BACKEND") or None, source)
    if not no_verify:
        _verify(data, source, ref, choice.platform, [choice.backend])
    if json:
        print_json({**choice.as_json(), "host": host.as_json(), "manifest": source, "verified": not no_verify})
        return
    for reason in choice.reasons:
        log(f"  {reason}")
    log(f"{choice.backend}: {choice.image}" + (" (not verified against the registry: --no-verify)" if no_verify else ""))


@task(name="run", help={
    "project": PROJECT_HELP,
    "service": "the service to start (required)",
    "backend": "start only this backend (no fallback)",
    "manifest": "read the backend manifest from this file instead of the registry",
    "port": "host port on 127.0.0.1 (default: a free one)",
})
@friendly
def run_(c, service=None, project=DEFAULT_PROJECT, backend=None, manifest=None, port=None):
    """Start a service from its default backend; on exit 78 start the next backend at once."""
    from orchestrator import launch, probe
    from orchestrator.errors import UserError

    # A string option, so a bad value is our message (exit 2), not invoke's traceback.
    if port in (None, ""):
        port = 0
    elif not str(port).isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"--port {port!r} is not a port number", "pass 1-65535, or leave it out for a free port")
    proj = pipeline.load_project(project)
    pipeline.one(service, proj.services, "service", proj.file.name)
    host = probe.probe()
    data, source, ref = _manifest_for(proj, service, manifest)
    # Always verified: run may walk the whole fallback list, and starts each image by digest.
    _verify(data, source, ref, host.platform, sorted((data["platforms"].get(host.platform) or {}).get("backends") or {}))
    svc = proj.services[service]
    result = launch.launch(data, host.platform, svc.port, f"orch-{proj.name}-{service}",
                           override=backend, host_port=int(port), log=log)
    for a, b in zip(result.attempts, result.attempts[1:]):
        gap = (f"{b.container_started - a.container_finished:.2f} s" if None not in (b.container_started,
               a.container_finished) else "?")
        log(f"{b.backend} started {gap} after {a.backend} exited ({a.outcome}; engine times)")
    if result.fallback_latency is not None:
        log(f"fallback latency: {result.fallback_latency:.2f} s from the first container's start "
            f"({result.attempts[0].backend}) to {result.backend} serving /health")
    log(f"{service} serving on {result.backend} at {result.url} (container {result.container}; "
        f"stop with: docker rm -f {result.container})")


@task(help={
    "project": PROJECT_HELP,
    "service": "the service (required)",
    "backend": "the backend, e.g. cuda (required)",
    "platform": "linux/amd64 or linux/arm64 (default: this machine's)",
})
@friendly
def sbom(c, service=None, backend=None, platform=None, project=DEFAULT_PROJECT):
    """Print the CycloneDX SBOM of a promoted image, found through its digest's referrers (digests checked)."""
    import sys

    from orchestrator import publish as publish_mod

    proj = pipeline.load_project(project)
    pipeline.one(service, proj.services, "service", proj.file.name)
    pipeline.one(backend, proj.backends, "backend", proj.file.name)
    platform = pipeline.one(platform or engine.host_platform(), proj.platforms, "platform", proj.file.name)
    image, data = publish_mod.published_sbom(proj, service, backend, platform)
    sys.stdout.write(data.decode())
    sys.stderr.write(f"SBOM of {image} ({platform})\n")


@task(name="up", help={
    "project": PROJECT_HELP,
    "bootstrap_now": "bootstrap every platform's base here and now; by default a base this machine would make "
                     "under QEMU is left to the first build, which makes it while the native platform builds",
})
@friendly
def engine_up(c, project=DEFAULT_PROJECT, bootstrap_now=False):
    """Start what is missing: Docker Engine, the local registry, arm64 emulation, the pinned base images."""
    from orchestrator import base, preflight

    proj = pipeline.load_project(project)
    preflight.ensure(proj, install=True)  # every tool named up front, installed or refused before work starts
    log(f"engine:   {engine.ensure_engine()}")
    log(f"registry: {engine.ensure_registry(proj.registry)}")
    for platform in proj.platforms:
        if platform != engine.host_platform():  # a native arm64 runner needs no emulator for arm64
            log(f"binfmt:   {engine.ensure_binfmt(platform)}")
    for platform in engine.base_platforms(proj):
        later = not bootstrap_now and platform != engine.host_platform()
        found, how = base.ensure(proj, platform, log=log, defer=later)
        log(f"base:     {platform}: {found.ref if found else 'pinned'} ({how})")


@task(name="status", help={"project": PROJECT_HELP})
@friendly
def engine_status(c, project=DEFAULT_PROJECT):
    """Say what runs where: engine, build client, registry, pinned bases."""
    proj = pipeline.load_project(project)
    table("engine status", ["what", "state"], [list(r) for r in engine.status(proj)])


@task(name="down")
@friendly
def engine_down(c):
    """Stop the registry that engine.up started (images and data are kept)."""
    for line in engine.down():
        log(line)


@task(name="gc", help={
    "project": PROJECT_HELP,
    "keep": "content tags kept per image line beyond what human tags and backend manifests reference (default 2)",
    "dry_run": "list what would be deleted and how much it would free; change nothing",
})
@friendly
def engine_gc(c, project=DEFAULT_PROJECT, keep="2", dry_run=False):
    """Free registry disk: delete unreferenced content tags (keeping the newest --keep), then their blobs."""
    proj = pipeline.load_project(project)
    report = pipeline.gc(proj.registry, pipeline.count(keep, "--keep"), dry_run=dry_run, log=log)
    log(report if isinstance(report, str) else report.summary())


@task(help={"project": PROJECT_HELP, "json": "print the findings and an overall \"ok\" as JSON"})
@friendly
def doctor(c, project=DEFAULT_PROJECT, json=False):
    """Check the engine, BuildKit, the registry (a real write), binfmt, disk, CA bundle, GPU; print fixes."""
    from orchestrator import doctor as doctor_mod
    from orchestrator.errors import OrchestratorError

    try:
        proj, problem = pipeline.load_project(project), None
    except OrchestratorError as e:
        proj, problem = None, e
    findings = doctor_mod.run(proj, problem)
    if json:
        print_json(doctor_mod.report(findings))
    else:
        table("doctor", ["check", "status", "detail"], doctor_mod.rows(findings))
        for name, fix in doctor_mod.fixes(findings):
            log(f"fix {name}: {fix}")
        failed = doctor_mod.failed_required(findings)
        log(f"{len(failed)} required check(s) failed" if failed else "all required checks pass")
    if doctor_mod.exit_code(findings):
        raise Exit(code=doctor_mod.exit_code(findings))


engine_ns = Collection("engine", engine_up, engine_status, engine_down, engine_gc)
ns = Collection(lock, render, build, publish, smoke, select_, run_, sbom, doctor, engine_ns)
