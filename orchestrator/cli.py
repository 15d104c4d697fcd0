"""The command line: Invoke tasks that parse arguments and print; the work is orchestrator.flow's.

One definition serves three ways in:

- `orchestrator <task>`: the console command the package installs (`main`);
- `invoke <task>` in this checkout: its tasks.py imports `ns` from here;
- a team's own tasks.py: `from orchestrator.cli import ns`, then add tasks
  to that collection (or wrap it in a collection of your own).

Every task finds the project file the way git finds its repository: --project,
else $ORCH_PROJECT, else project.yaml in the current directory or the nearest
directory above it that has one.
"""

from __future__ import annotations

import json as json_mod
import os
import sys
from pathlib import Path

from invoke import Collection, Program, task
from invoke.exceptions import Exit

from orchestrator import __version__, flow
from orchestrator.common.console import friendly, human_bytes, log, print_json, table
from orchestrator.common.errors import OrchestratorError, SpecError, UserError
from orchestrator.common.hostinfo import host_platform
from orchestrator.host import probe
from orchestrator.machine import doctor as doctor_mod
from orchestrator.machine import registry_server
from orchestrator.machine import status as status_mod
from orchestrator.oci import backends as manifests_mod
from orchestrator.oci import signing

PROJECT_FILE = "project.yaml"
PROJECT_HELP = "project file (default: $ORCH_PROJECT, else project.yaml here or in the nearest directory above)"


def find_project(given: str | None = None, cwd: Path | None = None, environ=None) -> str:
    """--project, else $ORCH_PROJECT, else the nearest project.yaml from cwd upwards (as git finds .git)."""
    environ = os.environ if environ is None else environ
    if given:
        return given
    if environ.get("ORCH_PROJECT"):
        return environ["ORCH_PROJECT"]
    here = (cwd or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        if (directory / PROJECT_FILE).is_file():
            return str(directory / PROJECT_FILE)
    raise SpecError(PROJECT_FILE, "", f"no {PROJECT_FILE} in {here} or any directory above it",
                    "run from inside a project, pass --project PATH, or start one with `orchestrator init`")


def load(project: str | None):
    return flow.load_project(find_project(project))


# --- arguments -------------------------------------------------------------------

def parse_list(value: str | None, known, what: str, file: str) -> list[str] | None:
    """'a,b' -> ['a','b'], 'all'/None -> None; unknown names are input errors."""
    if value in (None, "", "all"):
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    for item in items:
        if item not in known:
            raise UserError(f"unknown {what} {item!r}; {file} defines {sorted(known)}",
                            f"pick one of {sorted(known)} or 'all'")
    return items


def one(value: str | None, known, what: str, file: str) -> str:
    """Exactly one known name (select and run act on a single service)."""
    if not value:
        raise UserError(f"--{what} is required; {file} defines {sorted(known)}",
                        f"pass exactly one, e.g. --{what} {sorted(known)[0]}")
    if value not in known:
        raise UserError(f"{what} {value!r} is not one of {sorted(known)} in {file}",
                        f"pass exactly one, e.g. --{what} {sorted(known)[0]}")
    return value


def positive_seconds(value, option: str) -> float:
    """A CLI number of seconds (> 0); anything else is an input error, not a traceback."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"{option} {value!r} is not a number of seconds above 0", f"e.g. {option} 180")
    return seconds


def count(value, option: str) -> int:
    """A CLI whole number >= 0; anything else is an input error, not a traceback."""
    text = str(value).strip()
    if not text.isdigit():
        raise UserError(f"{option} {value!r} is not a whole number of 0 or more", f"e.g. {option} 2")
    return int(text)


def port_number(value) -> int:
    """--port: 0 (a free one) when not given; a string option, so a bad value is our message (exit 2)."""
    if value in (None, ""):
        return 0
    if not str(value).isdigit() or not 0 <= int(value) <= 65535:
        raise UserError(f"--port {value!r} is not a port number", "pass 1-65535, or leave it out for a free port")
    return int(value)


def read_gpu_report(path: str) -> dict:
    """A host report from host/runtime/gpus.py ({driver, gpus: [{index, uuid, name, cc}]}), checked enough to use."""
    fix = "pass the file `python3 orchestrator/host/runtime/gpus.py > FILE` wrote"
    try:
        report = json_mod.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--gpus {path}: cannot read it ({e.strerror})", fix) from None
    except ValueError as e:
        raise UserError(f"--gpus {path}: not JSON ({e})", fix) from None
    if not isinstance(report, dict) or not isinstance(report.get("gpus", []), list) or \
            any(not isinstance(g, dict) or "index" not in g for g in report.get("gpus", [])):
        raise UserError(f"--gpus {path}: expected {{\"driver\": ..., \"gpus\": [{{\"index\": 0, \"cc\": \"9.0\", ...}}]}}",
                        fix)
    return report


def _quiet(json: bool):
    return (lambda *_: None) if json else log


# --- starting a project -------------------------------------------------------------

@task(auto_shortflags=False, help={
    "directory": "where to write project.yaml (default: here)",
    "services": "the directory whose subdirectories are the services, relative to the project directory "
                "(default: services/ if there is one, else the project directory); each with an app.py is a service",
    "command": "the command every service runs, e.g. 'python3 -m uvicorn app:app --host 0.0.0.0 --port 8000' "
               "(default: python3 app.py); with it, every subdirectory is a service",
    "name": "the project name (default: the directory's name)",
    "port": "the port each service listens on (default 8000; the image sets SERVICE_PORT to it)",
    "no_cuda": "only the cpu backend, no CUDA line",
    "no_torch": "no torch in any backend (the CUDA line then ships only its CUDA runtime wheel)",
})
@friendly
def init(c, directory=".", services=None, command=None, name=None, port="8000", no_cuda=False, no_torch=False):
    """Start a project: write project.yaml (cpu + the newest CUDA line) and requirement files for a directory of services."""
    import shlex

    argv = tuple(shlex.split(command)) if command else None
    if command is not None and not argv:
        raise UserError("--command is empty", "e.g. --command 'python3 -m uvicorn app:app --host 0.0.0.0'")
    number = port_number(port)
    if number == 0:
        raise UserError(f"--port {port!r} is not a port number", "pass 1-65535")
    written, proj = flow.init(Path(directory), services, argv, name, number, cuda=not no_cuda, torch=not no_torch)
    for path in written:
        log(f"wrote {os.path.relpath(path)}")
    log(f"{proj.name}: services {', '.join(proj.services)}; backends {', '.join(proj.backends)}; "
        f"registry {proj.registry}")
    log("next: `orchestrator lock`, then `orchestrator publish`")


# --- the pipeline -------------------------------------------------------------------

@task(help={"project": PROJECT_HELP, "check": "write nothing; exit 1 naming every stale or missing lock",
            "upgrade": "re-resolve every lock, even fresh ones (moves unpinned versions forward)"})
@friendly
def lock(c, project=None, check=False, upgrade=False):
    """Resolve pinned, hashed requirement layers into locks/ (uv for Python, the Debian archive for packages)."""
    proj = load(project)
    if check:
        stale = flow.stale_locks(proj)
        for s in stale:
            log(f"stale: {s.path}: {s.reason}")
        if stale:
            raise Exit("locks are stale; run `invoke lock`", code=1)
        log("locks are up to date")
        return
    changed = flow.lock(proj, log, upgrade=upgrade)
    log(f"{len(changed)} lock file(s) changed" if changed else "locks unchanged")


@task(help={"project": PROJECT_HELP, "check": "write nothing; exit 1 if dockerfiles/ differs from a fresh render"})
@friendly
def render(c, project=None, check=False):
    """Write one Dockerfile per image and backend (every CUDA line, CPU) into dockerfiles/ (deterministic, diffable)."""
    proj = load(project)
    differ = flow.render(proj, check=check)
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
def build(c, project=None, backend="all", service="all", platform="all", force=False, json=False):
    """Build the CUDA-libs image, then the service images, and push them by content tag (no human tags)."""
    proj = load(project)
    name = proj.file.name
    results = flow.build(proj, parse_list(backend, proj.backends, "backend", name),
                         parse_list(service, proj.services, "service", name),
                         parse_list(platform, proj.platforms, "platform", name), log=_quiet(json), force=force)
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
    "jobs": "variants checked at once, across backends and platforms (default: two per core, at most 6)",
    "json": "print the results as JSON (for CI)",
})
@friendly
def smoke(c, project=None, service="all", backend="all", platform="all", ready_timeout="180", jobs="0",
          json=False):
    """Launch every built variant and check health, /ready, /info, torch.cuda, the CUDA-libs layer and fallback."""
    proj = load(project)
    name = proj.file.name
    results = flow.smoke(proj, parse_list(service, proj.services, "service", name),
                         parse_list(backend, proj.backends, "backend", name),
                         parse_list(platform, proj.platforms, "platform", name), log=_quiet(json),
                         ready_timeout=positive_seconds(ready_timeout, "--ready-timeout"),
                         jobs=count(jobs, "--jobs") or None)
    if json:
        print_json([r.as_json() for r in results])
    else:
        # ran: the service answered /health, /ready and /info; partial: it never started here (why below).
        table("smoke", ["service", "backend", "platform", "result", "checks", "engine", "seconds"],
              [[r.variant.service, r.variant.backend, r.variant.platform, r.result if r.ok else "FAIL",
                f"{sum(c.ok for c in r.checks)}/{len(r.checks)}",
                r.engine + ("" if r.native else " (QEMU)"), f"{r.seconds:.0f}"] for r in results])
        for r in results:
            if r.ok and r.result == "partial":
                log(f"{r.label()} partial: {r.why_partial}")
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
    "key": f"the release's private key file (default: ${signing.ENV_KEY_FILE}, or the PEM in ${signing.ENV_KEY}; "
           "for a registry on this machine's loopback, this machine's own key)",
    "unsigned": "publish without signatures (recorded in the backend manifest as signed = false; hosts refuse it)",
    "json": "print the result as JSON",
})
@friendly
def publish(c, project=None, service="all", no_smoke=False, key=None, unsigned=False, json=False):
    """Build what is missing, smoke-test exactly those digests, then sign and promote: indexes, tags, backend manifests."""
    proj = load(project)
    services = parse_list(service, proj.services, "service", proj.file.name)
    signer = None if unsigned else (signing.signer_from_file(Path(key)) if key else
                                    signing.signer_from_environ(os.environ))
    report = flow.publish(proj, services, log=_quiet(json), smoke=not no_smoke, signer=signer, unsigned=unsigned)
    records = [(svc, platform, backend, spec.get("smoke"), manifest.get("smoke") or {})
               for svc, manifest in report.published.items()
               for platform, entry in manifest["platforms"].items() for backend, spec in entry["backends"].items()]
    if json:
        print_json({"uploaded_bytes": report.uploaded_bytes, "artifacts": report.artifacts, "signed": report.signed,
                    "manifests": {k: str(v) for k, v in report.manifests.items()},
                    "smoke": {"tested": len(report.smoke), "reused": len(report.reused),
                              "variants": [{"service": s, "platform": p, "backend": b, "record": rec}
                                           for s, p, b, rec, _ in records]},
                    "timings": report.timings.as_json() if report.timings else None})
        return
    if records:
        table("smoke records", ["service", "backend", "platform", "smoke", "by"],
              [[s, b, p, (rec or {}).get("result") or ("-" if top.get("ran") else "skipped"),
                "" if not rec else "an earlier publish" if rec.get("reused") else "this publish"]
               for s, p, b, rec, top in records])
        for s, p, b, rec, top in records:
            if rec and rec["result"] == "partial":
                log(f"{s}/{b} {p}: {manifests_mod.describe_smoke(rec, top)}")
    for svc, path in report.manifests.items():
        log(f"{svc}: {report.artifacts[svc]} (written to {path.relative_to(proj.root)})")
    log(f"uploaded {report.uploaded_bytes:,} bytes" + (" (nothing changed)" if report.uploaded_bytes == 0 else ""))
    if report.timings:
        log("where the time went (phases overlap; compress and hash in CPU seconds):")
        for line in report.timings.lines():
            log(line)


@task(help={
    "project": PROJECT_HELP,
    "private": "where the private key goes (default: keys/release.key beside the project file; mode 0600, "
               "git-ignored there)",
    "public": "where the public key goes (default: keys/release.pub beside the project file; commit it)",
})
@friendly
def keys(c, project=None, private=None, public=None):
    """Make a release key pair (ECDSA P-256): the public key to list under trust.keys, the private one for CI."""
    root = Path(find_project(project)).resolve().parent
    private_path = Path(private) if private else root / "keys" / "release.key"
    public_path = Path(public) if public else root / "keys" / "release.pub"
    made = flow.make_keys(private_path, public_path)
    if private_path.parent == root / "keys":
        ignore = private_path.parent / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# private keys never go into the repository\n*.key\n")
    log(f"private key: {private_path} (mode 0600; keep it secret: a CI secret as ${signing.ENV_KEY} holding the "
        f"file's text, or a path in ${signing.ENV_KEY_FILE})")
    log(f"public key:  {public_path} (keyid {made.short}; commit it)")
    rel = os.path.relpath(public_path, root)
    log(f"trust it in the project file:\n  trust:\n    keys: [{rel}]")


# --- on a host ---------------------------------------------------------------------

@task(name="select", help={
    "project": PROJECT_HELP,
    "service": "the service to choose an image for (required)",
    "backend": "override the choice (also $ORCH_BACKEND); still checked against this host",
    "manifest": "read the backend manifest from this file instead of the registry",
    "root": "probe a host root other than / (for inspecting a mounted system)",
    "json": "print backend, image, platform, reasons and host as JSON",
    "gpus": "take the driver and GPUs from this report (what `python3 orchestrator/host/runtime/gpus.py` "
            "printed on some host) instead of asking NVML here: which line would that host get?",
    "machine": "the host's architecture with --root/--gpus (x86_64 or aarch64; default: this machine's)",
    "no-verify": "do not check signatures, nor the manifest and its images against the registry (offline "
                 "what-if questions with --manifest); the answer then says it is unverified",
})
@friendly
def select_(c, service=None, project=None, backend=None, manifest=None, root="/", json=False,
            gpus=None, machine=None, no_verify=False):
    """Say which image this host should run for a service, and why (walks the fallback list)."""
    proj = load(project)
    one(service, proj.services, "service", proj.file.name)
    if gpus:
        report = read_gpu_report(gpus)
        host = probe.probe(root, machine=machine, nvml=lambda: report.get("driver"),
                           gpus=lambda: [probe.Gpu.from_report(g, report.get("source") or "report")
                                         for g in report.get("gpus") or []])
    else:
        host = probe.probe(root, machine=machine)
    choice, source = flow.select(proj, service, host, backend or os.environ.get("ORCH_BACKEND") or None,
                                 manifest, check=not no_verify)
    if json:
        print_json({**choice.as_json(), "host": host.as_json(), "manifest": source, "verified": not no_verify})
        return
    for reason in choice.reasons:
        log(f"  {reason}")
    log(f"  smoke: {manifests_mod.describe_smoke(choice.smoke, choice.smoke_gate)}")
    log(f"{choice.backend}: {choice.image}" + (" (not verified against the registry: --no-verify)" if no_verify else ""))


@task(name="run", help={
    "project": PROJECT_HELP,
    "service": "the service to start (required)",
    "backend": "start only this backend (no fallback)",
    "manifest": "read the backend manifest from this file instead of the registry",
    "port": "host port on 127.0.0.1 (default: a free one)",
})
@friendly
def run_(c, service=None, project=None, backend=None, manifest=None, port=None):
    """Start a service from its default backend; on exit 78 start the next backend at once."""
    host_port = port_number(port)
    proj = load(project)
    one(service, proj.services, "service", proj.file.name)
    result = flow.run(proj, service, backend, manifest, host_port=host_port, log=log)
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
def sbom(c, service=None, backend=None, platform=None, project=None):
    """Print the CycloneDX SBOM of a promoted image, found through its digest's referrers (digests checked)."""
    proj = load(project)
    one(service, proj.services, "service", proj.file.name)
    one(backend, proj.backends, "backend", proj.file.name)
    platform = one(platform or host_platform(), proj.platforms, "platform", proj.file.name)
    image, data = flow.sbom(proj, service, backend, platform)
    sys.stdout.write(data.decode())
    sys.stderr.write(f"SBOM of {image} ({platform})\n")


@task(help={
    "project": PROJECT_HELP,
    "service": "the service (required)",
    "backend": "the backend, e.g. cuda (required)",
    "platform": "linux/amd64 or linux/arm64 (default: this machine's)",
    "envelope": "print the signed DSSE envelope as it is stored, not the statement in it",
})
@friendly
def provenance(c, service=None, backend=None, platform=None, project=None, envelope=False):
    """Print the signed SLSA provenance of a promoted image (its signature and subject checked)."""
    proj = load(project)
    one(service, proj.services, "service", proj.file.name)
    one(backend, proj.backends, "backend", proj.file.name)
    platform = one(platform or host_platform(), proj.platforms, "platform", proj.file.name)
    image, found = flow.provenance(proj, service, backend, platform)
    if envelope:
        sys.stdout.write(found.envelope.decode() + "\n")
    else:
        print_json(found.statement)
    sys.stderr.write(f"provenance of {image} ({platform}), signed by {found.key}\n")


@task(help={"project": PROJECT_HELP, "service": "a service name, a comma list, or all (default)"})
@friendly
def verify(c, project=None, service="all"):
    """Check a published release as hosts do: every backend's signatures, provenance and registry state (exit 2 if not)."""
    proj = load(project)
    checked = flow.verify_release(proj, parse_list(service, proj.services, "service", proj.file.name), log=log)
    log(f"{checked} variant(s) verified against {', '.join(str(k) for k in flow.trusted_keys(proj))}")


# --- the machine ------------------------------------------------------------------

@task(name="up", help={
    "project": PROJECT_HELP,
    "bootstrap_now": "bootstrap every platform's base here and now; by default a base this machine would make "
                     "under QEMU is left to the first build, which makes it while the native platform builds",
})
@friendly
def engine_up(c, project=None, bootstrap_now=False):
    """Start what is missing: Docker Engine, the local registry, arm64 emulation, the pinned base images."""
    flow.engine_up(load(project), bootstrap_now=bootstrap_now, log=log)


@task(name="status", help={"project": PROJECT_HELP})
@friendly
def engine_status(c, project=None):
    """Say what runs where: engine, build client, registry, pinned bases."""
    table("engine status", ["what", "state"], [list(r) for r in status_mod.status(load(project))])


@task(name="down")
@friendly
def engine_down(c):
    """Stop the registry that engine.up started (images and data are kept)."""
    for line in registry_server.down():
        log(line)


@task(name="gc", help={
    "project": PROJECT_HELP,
    "keep": "content tags kept per image line beyond what human tags and backend manifests reference (default 2)",
    "dry_run": "list what would be deleted and how much it would free; change nothing",
})
@friendly
def engine_gc(c, project=None, keep="2", dry_run=False):
    """Free registry disk: delete unreferenced content tags (keeping the newest --keep), then their blobs."""
    proj = load(project)
    report = flow.gc(proj.registry, count(keep, "--keep"), dry_run=dry_run, log=log, login=proj.login)
    log(report if isinstance(report, str) else report.summary())


@task(help={"project": PROJECT_HELP, "json": "print the findings and an overall \"ok\" as JSON"})
@friendly
def doctor(c, project=None, json=False):
    """Check the engine, BuildKit, the registry (a real write), binfmt, disk, CA bundle, GPU; print fixes."""
    try:
        proj, problem = load(project), None
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
ns = Collection(init, lock, render, build, publish, smoke, select_, run_, verify, sbom, provenance, keys, doctor,
                engine_ns)
program = Program(namespace=ns, version=__version__, name="orchestrator", binary="orchestrator")


def main() -> None:
    """The `orchestrator` console command: the same tasks, options, help and exit codes as `invoke` here."""
    program.run()
