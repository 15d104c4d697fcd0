"""Running the smoke checks: one container per variant, variants that share layers together.

`check_variant` starts one variant (read-only root, tmpfs on the declared
writable dirs, GPUs as this host hands them out), waits for /health, then
runs the checks of checks.py against it. `run` takes the variants of a
build, groups those that share layers (same backend and platform), brings a
group's images into the engine (images.py: loaded from what the tool holds,
not pulled back) and starts its variants together, several groups
overlapping, and stops every container of the run on the first error or
Ctrl-C: a `Session` holds what one run shares on one engine (the engine,
the GPU request, the images it brought, the halt flag, the containers it
started), so two runs never see each other's state.

Each platform runs on its `Engine`: the default one, or the engine the
project names for it (`smoke.engines`, else `builders`), so a native arm64
engine runs the arm64 services for real. Each `VariantResult` says what
ran: its checks, whether the service itself started and answered /health,
/ready and /info, and where not, why. A variant whose checks all passed
without its service ever starting (a torch that crashes under QEMU) is
"partial", never "ran".
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests

from orchestrator.host import gpu_request as gpu_mod
from orchestrator.host.contract import EX_CONFIG, run_options
from orchestrator.machine import daemon
from orchestrator.common import hostinfo
from orchestrator.oci.registry import EnvLogin
from orchestrator.release.smoke import bytecode
from orchestrator.release.smoke import images as images_mod
from orchestrator.release.smoke.checks import (EXEC_TIMEOUT, Check, healthcheck_check, image_config_checks, info_check,
                                               inside_checks, logs_tail, wait_health, wait_ready)
from orchestrator.release.smoke.variant import (DEFAULT_ENGINE, Variant, expected_cuda, gpu_for, host_gpu_request, native,
                                                variant_label)

# The Ryuk reaper image cannot be pulled offline; we remove our containers.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

# Per-check limits (seconds); check_variant's arguments override start and ready.
START_TIMEOUT = 60.0  # container start -> /health 200
READY_TIMEOUT = 180.0  # /health -> /ready 200 (model loading)
STRICT_EXIT_TIMEOUT = 60.0  # BACKEND_POLICY=strict must exit within this
MAX_JOBS = 6  # variants at once across groups, whatever the cores
SERVICE_ENDPOINTS = ("/health", "/ready", "/info")  # the service "ran" when all three answered


@dataclass(frozen=True)
class Engine:
    """Where a platform's smoke containers run.

    client: a docker-py client of it; name: where it is configured (`smoke.engines.linux/arm64`,
    `builders.linux/arm64`) or the default engine, said in logs and smoke records (never its address);
    platform: what it runs natively ("" = this machine's); env: the environment a testcontainers
    client of it needs (DOCKER_HOST and TLS; None: testcontainers' own default, $DOCKER_HOST).
    """

    client: Any
    name: str = DEFAULT_ENGINE
    platform: str = ""
    env: dict[str, str] | None = field(default=None, repr=False)
    local: bool | None = None  # on this machine (loads the tool's blobs); None: as the default engine is

    @property
    def native_platform(self) -> str:
        return self.platform or hostinfo.host_platform()


@dataclass
class VariantResult:
    variant: Variant
    checks: list[Check] = field(default_factory=list)
    logs: str = ""
    seconds: float = 0.0
    answered: list[str] = field(default_factory=list)  # which of /health, /ready, /info the service answered
    not_started: str = ""  # why the service itself was never started here (e.g. under emulation: ...)
    engine: str = DEFAULT_ENGINE  # where it ran (Engine.name)
    native: bool = True  # on an engine of the variant's own platform; False: under QEMU
    bytecode: str = ""  # where its containers kept Python's bytecode (bytecode.py), "" = in no cache

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def service_started(self) -> bool:
        """The service itself started and answered /health, /ready and /info."""
        return all(e in self.answered for e in SERVICE_ENDPOINTS)

    @property
    def result(self) -> str:
        """ran: every check passed and the service answered all three; partial: every check that ran
        passed, but the service was not started or did not answer them all; failed: a check failed."""
        if not self.ok:
            return "failed"
        return "ran" if self.service_started else "partial"

    @property
    def why_partial(self) -> str:
        if self.service_started:
            return ""
        return self.not_started or ("the service answered " + (", ".join(self.answered) or "nothing")
                                    + f" of {', '.join(SERVICE_ENDPOINTS)}")

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def label(self) -> str:
        """'tts/cuda13 linux/arm64': how smoke.allow_partial names a variant."""
        return variant_label(self.variant.service, self.variant.backend, self.variant.platform)

    def record(self) -> dict:
        """What ran, for the variant's entry in the backend manifest (checks that passed, by name)."""
        service: dict = {"started": self.service_started, "answered": list(self.answered)}
        if not self.service_started:
            service["why_not"] = self.why_partial
        return {"result": self.result, "service": service, "checks": [c.name for c in self.checks if c.ok],
                "engine": self.engine, "native": self.native}

    def as_json(self) -> dict:
        v = self.variant
        return {"service": v.service, "backend": v.backend, "platform": v.platform, "image": v.image,
                "ok": self.ok, "result": self.result, "seconds": round(self.seconds, 1),
                "service_started": self.service_started, "answered": list(self.answered),
                "bytecode_cache": self.bytecode or None,
                "why_not_started": self.why_partial, "engine": self.engine, "native": self.native,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "timeout": c.timeout}
                           for c in self.checks],
                "logs_tail": self.logs if not self.ok else ""}


class Halted(Exception):
    """A smoke run was stopped (Ctrl-C or a failure elsewhere) before this check started its container."""


class Session:
    """What one smoke run shares: the engine, how it hands out GPUs, and the containers it has running.

    Checks run in worker threads, which Ctrl-C does not reach: `halt()` refuses
    new containers and stops the running ones, so each check ends at its next
    step instead of waiting out its timeouts.
    """

    def __init__(self, client, gpu: gpu_mod.GpuRequest | None = None, engine: Engine | None = None,
                 login: EnvLogin | None = None, log=None):
        self.engine = engine or Engine(client)
        self.client = self.engine.client
        self.gpu = gpu if gpu is not None else host_gpu_request(self.client)
        self.login = login  # the environment's login: pulls and registry reads send it to its own registry only
        # Images come from the tool's blobs; an engine on another machine pulls them from the registry.
        local = self.engine.local if self.engine.local is not None else daemon.is_local(daemon.default_builder())
        self.images = images_mod.EngineImages(self.client, pull=not local, log=log, login=login)
        self.log = log or (lambda *_: None)
        self.bytecode = bytecode.Cache(self.client) if bytecode.enabled() else None
        self._halted = threading.Event()
        self._running: set = set()
        self._lock = threading.Lock()

    @property
    def halted(self) -> bool:
        return self._halted.is_set()

    def track(self, container) -> None:
        """Note a container about to start; refused once the run is halted."""
        with self._lock:
            if self._halted.is_set():
                raise Halted("smoke run stopped")
            self._running.add(container)

    def untrack(self, container) -> None:
        with self._lock:
            self._running.discard(container)

    def halt(self) -> None:
        self._halted.set()
        with self._lock:
            containers = list(self._running)
        for c in containers:
            try:
                c.stop()
            except Exception:  # noqa: BLE001 - already gone
                pass


def _container(variant: Variant, env: dict[str, str], gpu: gpu_mod.GpuRequest, engine: Engine | None = None,
               mounts: bytecode.Mounts | None = None):
    from testcontainers.core.container import DockerContainer  # its import costs every task a few 100 ms

    engine = engine or Engine(None)
    # Another engine than $DOCKER_HOST's: testcontainers' client gets that engine's environment.
    client_kw = {"docker_client_kw": {"environment": engine.env}} if engine.env is not None else {}
    c = DockerContainer(variant.image, **client_kw).with_exposed_ports(variant.port)
    for k, v in {**env, **gpu.environment, **(mounts.environment if mounts else {})}.items():
        c = c.with_env(k, v)
    # One with_kwargs call: testcontainers keeps only the last one's arguments.
    # Read-only root with a tmpfs per declared writable dir, as `invoke run` starts it.
    # (testcontainers passes its own tmpfs dict to the engine: fill that one.)
    hardening = run_options()
    c.tmpfs.update(hardening.pop("tmpfs"))
    if mounts is not None:
        c.tmpfs.update(mounts.tmpfs)
        c.volumes.update(mounts.volumes)  # testcontainers' own volumes dict, as with tmpfs
    kwargs = {**({} if native(variant, engine.platform) else {"platform": variant.platform}), **gpu.kwargs(),
              **hardening}
    return c.with_kwargs(**kwargs)


def _bytecode(session: Session, ref: str, platform: str, image_id: str) -> bytecode.Mounts | None:
    """The bytecode cache for this image's containers (bytecode.py); None when off or not possible."""
    if session.bytecode is None:
        return None
    try:
        layers = session.images.layers_of(ref, platform)
        return session.bytecode.mounts(image_id, *layers) if layers else None
    except Exception as e:  # noqa: BLE001 - without the cache it is slower, never wrong
        session.log(f"smoke: no bytecode cache for {ref}: {str(e)[:200]}")
        return None


def _stop(container) -> None:
    try:
        container.stop()
    except Exception:  # noqa: BLE001 - already gone
        pass


def check_variant(variant: Variant, gpu: gpu_mod.GpuRequest | bool, ready_timeout: float = READY_TIMEOUT,
                  start_timeout: float | None = None, env: dict[str, str] | None = None,
                  exec_timeout: float | None = None, strict_timeout: float = STRICT_EXIT_TIMEOUT,
                  session: Session | None = None, client=None) -> VariantResult:
    """Start the variant and check it. gpu: this host's GpuRequest, or False (none; see gpu_for).

    session: the run it belongs to (run() passes it); alone, client is the engine to use (default: $DOCKER_HOST's).
    """
    if session is None:
        session = Session(client if client is not None else daemon.docker_client(),
                          gpu if isinstance(gpu, gpu_mod.GpuRequest) else gpu_mod.decide(None, cuda=False))
    engine = session.engine
    result = VariantResult(variant, engine=engine.name, native=native(variant, engine.platform))
    started = time.monotonic()
    try:
        _check(variant, gpu_for(variant, gpu, engine.platform), result, session, ready_timeout, start_timeout,
               env or {}, exec_timeout, strict_timeout)
    finally:
        result.seconds = time.monotonic() - started
    return result


def _check(variant: Variant, request: gpu_mod.GpuRequest, result: VariantResult, session: Session,
           ready_timeout: float, start_timeout: float | None, env: dict[str, str], exec_timeout: float | None,
           strict_timeout: float) -> None:
    # An emulated platform (QEMU) starts, and imports torch, several times slower; more so while other
    # groups' services start on the same cores (a first run of every backend).
    if start_timeout is None:
        start_timeout = START_TIMEOUT if result.native else 3 * START_TIMEOUT
    if exec_timeout is None:
        exec_timeout = EXEC_TIMEOUT if result.native else 3 * EXEC_TIMEOUT
    local, check = session.images.ensure(variant.image, variant.platform)
    result.checks.append(check)
    if local is None:
        return
    mounts = _bytecode(session, variant.image, variant.platform, local)
    result.bytecode = mounts.describe() if mounts else ""
    variant = dataclasses.replace(variant, image=local)  # run by image ID: exactly the published config
    config = session.client.images.get(variant.image).attrs["Config"]
    checks, image_env = image_config_checks(variant, config)
    result.checks += checks
    if variant.emulation_blocker and not result.native:
        _check_emulated_without_service(variant, result, session, exec_timeout, strict_timeout, image_env, mounts)
        return
    # Whether it should serve on CUDA: a GPU was handed over, unless /info shows this host cannot run the line.
    serves_cuda = request.requested
    container = _container(variant, {"BACKEND_POLICY": "fallback", **env}, request, session.engine, mounts)
    session.track(container)
    try:
        try:
            container.start()  # no wait strategy: wait_health watches the container itself
        except Exception as e:  # noqa: BLE001 - the engine refused to start it
            result.checks.append(Check("/health", False, f"container did not start: {str(e).splitlines()[0][:200]}"
                                       + (f" ({request.description})" if request.requested else ""), start_timeout))
            result.logs = logs_tail(container)
            return
        ok, detail, base = wait_health(container, variant.port, start_timeout)
        result.checks.append(Check("/health", ok, detail, start_timeout))
        if ok:
            result.answered.append("/health")
        if not ok:
            result.logs = logs_tail(container, 30)
            if result.logs:
                result.checks[-1].detail += f"; last log line: {result.logs.splitlines()[-1][:200]}"
            return
        info = None
        ok, detail = wait_ready(base, ready_timeout)
        result.checks.append(Check("/ready", ok, detail, ready_timeout))
        if ok:
            result.answered.append("/ready")
            try:
                info = requests.get(f"{base}/info", timeout=10).json()
            except (requests.RequestException, ValueError) as e:
                result.checks.append(Check("/info", False, f"no JSON from /info: {e}", 10))
            else:
                result.answered.append("/info")
                serves_cuda, why = expected_cuda(variant, request, info)
                result.checks.append(info_check(variant, serves_cuda, info, why))
        result.checks += inside_checks(variant, serves_cuda, container, exec_timeout, image_env, info)
        result.checks.append(healthcheck_check(container, variant, config, exec_timeout))
        if not result.ok:
            result.logs = logs_tail(container)
    finally:
        session.untrack(container)
        _stop(container)
    if variant.cuda and not serves_cuda:
        # With the same GPU request: a GPU this line cannot drive must also exit 78, not only a missing one.
        result.checks.append(strict_exit_check(session.client, variant, strict_timeout, request,
                                               session.engine.platform))


def _check_emulated_without_service(variant: Variant, result: VariantResult, session: Session, exec_timeout: float,
                                    strict_timeout: float, image_env: dict[str, str],
                                    mounts: bytecode.Mounts | None = None) -> None:
    """What QEMU allows when this torch crashes under emulation: everything but the service itself.

    The entrypoint (stdlib) runs a sleep in place of the service, so the probe, the CUDA-libs layer,
    the user and the system packages are checked in the real image; strict must still exit 78.
    The service was not started: the result says so and why (it is "partial"); no check claims it.
    """
    engine = session.engine
    result.not_started = (f"not started under emulation ({variant.platform} under QEMU on {engine.name}, a "
                          f"{engine.native_platform} engine): {variant.emulation_blocker}; a {variant.platform} "
                          "engine (smoke.engines or builders) runs it for real")
    container = _container(variant, {"BACKEND_POLICY": "fallback"}, gpu_mod.decide(None, cuda=False), engine,
                           mounts)
    container = container.with_command(["sleep", "3600"])  # coreutils: no Python start under QEMU for a stand-in
    session.track(container)
    try:
        container.start()
        result.checks += inside_checks(dataclasses.replace(variant, torch=None), False, container, exec_timeout,
                                       image_env)
    except Halted:
        raise
    except Exception as e:  # noqa: BLE001 - the engine refused to start it
        result.checks.append(Check("container under emulation", False, f"did not start: {str(e)[:200]}"))
    finally:
        session.untrack(container)
        _stop(container)
    if variant.cuda:
        result.checks.append(strict_exit_check(session.client, variant, strict_timeout,
                                               gpu_mod.decide(None, cuda=False), engine.platform))


def strict_exit_check(client, variant: Variant, timeout: float = STRICT_EXIT_TIMEOUT,
                      gpu: gpu_mod.GpuRequest | None = None, engine_platform: str | None = None) -> Check:
    """BACKEND_POLICY=strict where the variant cannot use CUDA must exit 78 at once with one line on stderr.

    gpu: the request the variant's containers make here (none on a GPU-less host);
    engine_platform: what client's engine runs natively (default: this machine's platform).
    """
    gpu = gpu or gpu_mod.decide(None, cuda=False)
    kwargs = {} if native(variant, engine_platform) else {"platform": variant.platform}
    started = time.monotonic()
    container = client.containers.run(variant.image, environment={"BACKEND_POLICY": "strict", **gpu.environment},
                                      detach=True, **kwargs, **gpu.kwargs(), **run_options())
    try:
        code = container.wait(timeout=timeout)["StatusCode"]
        elapsed = time.monotonic() - started
        err = container.logs(stdout=False, stderr=True).decode(errors="replace").strip()
    except requests.RequestException:
        return Check("strict exits 78", False, f"still running after {timeout:.0f} s with BACKEND_POLICY=strict "
                     "where this line cannot use CUDA", timeout)
    finally:
        container.remove(force=True)
    lines = err.splitlines()
    ok = code == EX_CONFIG and len(lines) == 1
    return Check("strict exits 78", ok, f"exit {code} after {elapsed:.1f} s: {lines[-1][:160] if lines else '(no stderr)'}",
                 timeout)


def run(chosen: list[Variant], client, log=print, ready_timeout: float = READY_TIMEOUT,
        jobs: int | None = None, engines: dict[str, Engine] | None = None,
        login: EnvLogin | None = None) -> list[VariantResult]:
    """Smoke-test every chosen variant; returns the results in the order given.

    A platform in `engines` runs on that engine, every other one on the engine client talks to.
    login: the environment's login, which pulls send to its own registry only.

    Variants that share layers (same backend and platform: the CUDA libraries,
    torch, the base) form a group: its images come into the engine first, in
    one load of what the engine lacks (images.py), then its containers start
    together. Groups overlap: up to `jobs` variants run at once across groups
    (default: two per core, at most MAX_JOBS; a native check mostly waits on
    its container, one under QEMU is a core's work), the groups under
    emulation first, since they take longest, while the next group loads.
    What smoke loaded stays for the next group and run within the disk
    budget, least recently used untagged beyond it (the groups being checked
    are kept even above it). Each variant is reported whole, in the order given.
    """
    engines = engines or {}
    sessions: dict[str, Session] = {}

    def session_for(platform: str) -> Session:
        engine = engines.get(platform)
        key = engine.name if engine else DEFAULT_ENGINE
        if key not in sessions:
            s = sessions[key] = Session(client, engine=engine, login=login, log=log)
            if engine is None:
                log(f"host GPU for containers: {s.gpu.description}")
            else:
                log(f"smoke {platform} on {engine.name}, a {engine.native_platform} engine; "
                    f"GPU for containers: {s.gpu.description}")
        return sessions[key]

    jobs = max(1, jobs or min(2 * (os.cpu_count() or 1), MAX_JOBS))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, v in enumerate(chosen):
        groups.setdefault((v.backend, v.platform), []).append(i)
    results: dict[int, VariantResult] = {}
    running: dict[int, Future] = {}
    pool = ThreadPoolExecutor(jobs, thread_name_prefix="smoke")
    try:
        order = sorted(groups, key=lambda k: native(chosen[groups[k][0]], session_for(k[1]).engine.platform))
        for key in order:  # emulated groups first: they take longest
            _start_group(chosen, groups, key, min(jobs, len(groups[key])), session_for(key[1]), pool, running,
                         ready_timeout, log)
        for key, members in groups.items():  # each reported whole and in order, whatever finishes first
            for i in members:
                r = results[i] = running[i].result()
                if len(members) > 1:
                    log(f"{r.variant.service}/{r.variant.backend} {r.variant.platform}:")
                for c in r.checks:
                    log(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    except BaseException:
        for session in sessions.values():
            session.halt()  # Ctrl-C or an error: the other checks stop at their next step, containers stopped
        raise
    finally:
        pool.shutdown(wait=True)
        for session in sessions.values():
            try:
                session.images.trim()
                if session.bytecode is not None and session.bytecode.used:
                    bytecode.prune(session.client)  # the caches of images the budget untagged go with them
            except Exception as e:  # noqa: BLE001 - the budget is kept next time
                log(f"smoke: could not trim the images kept in the engine: {str(e)[:200]}")
    return [results[i] for i in range(len(chosen))]


def _start_group(chosen: list[Variant], groups: dict[tuple[str, str], list[int]], key: tuple[str, str],
                 at_once: int, session: Session, pool: ThreadPoolExecutor, running: dict[int, Future],
                 ready_timeout: float, log) -> None:
    """Bring one group's images into the engine, then queue its checks (they start together as slots allow).

    The disk budget is applied with every group still being checked kept (this one included), so a
    run holds, beyond the budget, only the groups it is testing, as the old one-group-at-a-time did.
    """
    backend, platform = key
    members = groups[key]
    if at_once > 1:
        log(f"smoke {backend} {platform}: {len(members)} variants, {at_once} at once")
    wanted = [(chosen[i].image, chosen[i].platform) for i in members]
    try:
        session.images.prepare(wanted)
        busy = [i for g in groups.values() for i in g if i in running and not running[i].done()] + members
        session.images.trim(keep=session.images.image_ids(chosen[i].image for i in busy))
    except Exception as e:  # noqa: BLE001 - each variant's "image" check says what went wrong
        log(f"smoke {backend} {platform}: images not all in the engine: {str(e)[:200]}")
    for i in members:
        v = chosen[i]
        log(f"smoke {v.service}/{v.backend} {v.platform}: {v.image}")
        running[i] = pool.submit(check_variant, v, session.gpu, ready_timeout=ready_timeout, session=session)
