"""Running the smoke checks: one container per variant, variants that share layers together.

`check_variant` starts one variant (read-only root, tmpfs on the declared
writable dirs, GPUs as this host hands them out), waits for /health, then
runs the checks of checks.py against it. `run` takes the variants of a
build, groups those that share layers (same backend and platform), brings a
group's images into the engine (images.py) and starts its variants
together, several groups overlapping, and stops every container of the run
on the first error or Ctrl-C: a `Session` holds what one run shares (the engine
client, the GPU request, the halt flag, the containers it started), so two
runs never see each other's state.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from orchestrator.host import gpu_request as gpu_mod
from orchestrator.host.contract import EX_CONFIG, run_options
from orchestrator.machine import daemon
from orchestrator.release.smoke import images as images_mod
from orchestrator.release.smoke.checks import (EXEC_TIMEOUT, Check, healthcheck_check, image_config_checks, info_check,
                                               inside_checks, logs_tail, wait_health, wait_ready)
from orchestrator.release.smoke.variant import Variant, expected_cuda, gpu_for, host_gpu_request, native

# The Ryuk reaper image cannot be pulled offline; we remove our containers.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

# Per-check limits (seconds); check_variant's arguments override start and ready.
START_TIMEOUT = 60.0  # container start -> /health 200
READY_TIMEOUT = 180.0  # /health -> /ready 200 (model loading)
STRICT_EXIT_TIMEOUT = 60.0  # BACKEND_POLICY=strict must exit within this
MAX_JOBS = 6  # variants at once across groups, whatever the cores


@dataclass
class VariantResult:
    variant: Variant
    checks: list[Check] = field(default_factory=list)
    logs: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def as_json(self) -> dict:
        v = self.variant
        return {"service": v.service, "backend": v.backend, "platform": v.platform, "image": v.image,
                "ok": self.ok, "seconds": round(self.seconds, 1),
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

    def __init__(self, client, gpu: gpu_mod.GpuRequest | None = None, log=None):
        self.client = client
        self.gpu = gpu if gpu is not None else host_gpu_request(client)
        # Images come from the tool's blobs; an engine on another machine pulls them from the registry.
        self.images = images_mod.EngineImages(client, pull=not daemon.is_local(daemon.default_builder()), log=log)
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


def _container(variant: Variant, env: dict[str, str], gpu: gpu_mod.GpuRequest):
    from testcontainers.core.container import DockerContainer  # its import costs every task a few 100 ms

    c = DockerContainer(variant.image).with_exposed_ports(variant.port)
    for k, v in {**env, **gpu.environment}.items():
        c = c.with_env(k, v)
    # One with_kwargs call: testcontainers keeps only the last one's arguments.
    # Read-only root with a tmpfs per declared writable dir, as `invoke run` starts it.
    # (testcontainers passes its own tmpfs dict to the engine: fill that one.)
    hardening = run_options()
    c.tmpfs.update(hardening.pop("tmpfs"))
    kwargs = {**({} if native(variant) else {"platform": variant.platform}), **gpu.kwargs(), **hardening}
    return c.with_kwargs(**kwargs)


def _stop(container) -> None:
    try:
        container.stop()
    except Exception:  # noqa: BLE001 - already gone
        pass


def check_variant(variant: Variant, gpu: gpu_mod.GpuRequest | bool, ready_timeout: float = READY_TIMEOUT,
                  start_timeout: float | None = None, env: dict[str, str] | None = None,
                  exec_timeout: float = EXEC_TIMEOUT, strict_timeout: float = STRICT_EXIT_TIMEOUT,
                  session: Session | None = None, client=None) -> VariantResult:
    """Start the variant and check it. gpu: this host's GpuRequest, or False (none; see gpu_for).

    session: the run it belongs to (run() passes it); alone, client is the engine to use (default: $DOCKER_HOST's).
    """
    if session is None:
        session = Session(client if client is not None else daemon.docker_client(),
                          gpu if isinstance(gpu, gpu_mod.GpuRequest) else gpu_mod.decide(None, cuda=False))
    result = VariantResult(variant)
    started = time.monotonic()
    try:
        _check(variant, gpu_for(variant, gpu), result, session, ready_timeout, start_timeout, env or {},
               exec_timeout, strict_timeout)
    finally:
        result.seconds = time.monotonic() - started
    return result


def _check(variant: Variant, request: gpu_mod.GpuRequest, result: VariantResult, session: Session,
           ready_timeout: float, start_timeout: float | None, env: dict[str, str], exec_timeout: float,
           strict_timeout: float) -> None:
    if start_timeout is None:  # an emulated platform (QEMU) starts several times slower
        start_timeout = START_TIMEOUT if native(variant) else 3 * START_TIMEOUT
    local, check = session.images.ensure(variant.image, variant.platform)
    result.checks.append(check)
    if local is None:
        return
    variant = dataclasses.replace(variant, image=local)  # run by image ID: exactly the published config
    config = session.client.images.get(variant.image).attrs["Config"]
    checks, image_env = image_config_checks(variant, config)
    result.checks += checks
    if variant.emulation_blocker and not native(variant):
        _check_emulated_without_service(variant, result, session, exec_timeout, strict_timeout, image_env)
        return
    # Whether it should serve on CUDA: a GPU was handed over, unless /info shows this host cannot run the line.
    serves_cuda = request.requested
    container = _container(variant, {"BACKEND_POLICY": "fallback", **env}, request)
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
        if not ok:
            result.logs = logs_tail(container, 30)
            if result.logs:
                result.checks[-1].detail += f"; last log line: {result.logs.splitlines()[-1][:200]}"
            return
        ok, detail = wait_ready(base, ready_timeout)
        result.checks.append(Check("/ready", ok, detail, ready_timeout))
        if ok:
            try:
                info = requests.get(f"{base}/info", timeout=10).json()
            except (requests.RequestException, ValueError) as e:
                result.checks.append(Check("/info", False, f"no JSON from /info: {e}", 10))
            else:
                serves_cuda, why = expected_cuda(variant, request, info)
                result.checks.append(info_check(variant, serves_cuda, info, why))
        result.checks += inside_checks(variant, serves_cuda, container, exec_timeout, image_env)
        result.checks.append(healthcheck_check(container, variant, config, exec_timeout))
        if not result.ok:
            result.logs = logs_tail(container)
    finally:
        session.untrack(container)
        _stop(container)
    if variant.cuda and not serves_cuda:
        # With the same GPU request: a GPU this line cannot drive must also exit 78, not only a missing one.
        result.checks.append(strict_exit_check(session.client, variant, strict_timeout, request))


def _check_emulated_without_service(variant: Variant, result: VariantResult, session: Session, exec_timeout: float,
                                    strict_timeout: float, image_env: dict[str, str]) -> None:
    """What QEMU allows when this torch crashes under emulation: everything but the service itself.

    The entrypoint (stdlib) runs a sleep in place of the service, so the probe, the CUDA-libs layer,
    the user and the system packages are checked in the real image; strict must still exit 78.
    """
    container = _container(variant, {"BACKEND_POLICY": "fallback"}, gpu_mod.decide(None, cuda=False))
    container = container.with_command(["python3", "-c", "import time; time.sleep(3600)"])
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
    result.checks.append(Check("service (not started under emulation)", True,
                               f"{variant.emulation_blocker}; checked instead: the entrypoint's probe, the CUDA-libs "
                               "layer, the user, system packages and strict exit 78 (run it on a native host for the rest)"))
    if variant.cuda:
        result.checks.append(strict_exit_check(session.client, variant, strict_timeout,
                                               gpu_mod.decide(None, cuda=False)))


def strict_exit_check(client, variant: Variant, timeout: float = STRICT_EXIT_TIMEOUT,
                      gpu: gpu_mod.GpuRequest | None = None) -> Check:
    """BACKEND_POLICY=strict where the variant cannot use CUDA must exit 78 at once with one line on stderr.

    gpu: the request the variant's containers make here (none on a GPU-less host).
    """
    gpu = gpu or gpu_mod.decide(None, cuda=False)
    kwargs = {} if native(variant) else {"platform": variant.platform}
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
        jobs: int | None = None) -> list[VariantResult]:
    """Smoke-test every chosen variant on the engine client talks to; returns the results in the order given.

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
    session = Session(client, log=log)
    log(f"host GPU for containers: {session.gpu.description}")
    jobs = max(1, jobs or min(2 * (os.cpu_count() or 1), MAX_JOBS))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, v in enumerate(chosen):
        groups.setdefault((v.backend, v.platform), []).append(i)
    results: dict[int, VariantResult] = {}
    running: dict[int, Future] = {}
    pool = ThreadPoolExecutor(jobs, thread_name_prefix="smoke")
    try:
        for key in sorted(groups, key=lambda k: native(chosen[groups[k][0]])):  # emulated groups first
            _start_group(chosen, groups, key, min(jobs, len(groups[key])), session, pool, running, ready_timeout,
                         log)
        for key, members in groups.items():  # each reported whole and in order, whatever finishes first
            for i in members:
                r = results[i] = running[i].result()
                if len(members) > 1:
                    log(f"{r.variant.service}/{r.variant.backend} {r.variant.platform}:")
                for c in r.checks:
                    log(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    except BaseException:
        session.halt()  # Ctrl-C or an error: the other checks stop at their next step, containers stopped
        raise
    finally:
        pool.shutdown(wait=True)
        try:
            session.images.trim()
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
