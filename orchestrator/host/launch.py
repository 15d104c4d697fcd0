"""`invoke run`: start a service, falling back across backends on exit 78.

Each candidate starts with BACKEND_POLICY=strict, so an image that cannot
use its backend says why and exits 78 (EX_CONFIG) within seconds; the
launcher then starts the next backend in the fallback list at once instead
of waiting for a health timeout.

A CUDA backend's container asks for GPUs the way this host provides them
(gpu_request: NVIDIA runtime or CDI, respecting NVIDIA_VISIBLE_DEVICES);
without that a GPU host's cuda image would find no libcuda and fall back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import docker
import requests

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.host import gpu_request as gpu_mod
from orchestrator.host.contract import EX_CONFIG, run_options
from orchestrator.host.select import walk_order


@dataclass
class Attempt:
    backend: str
    image: str
    outcome: str  # serving | exit 78 | failed
    detail: str
    started_at: float  # time.monotonic() when we asked the engine to run it
    ended_at: float  # time.monotonic() when we saw it serve, exit or time out
    # As the engine reports them (State.StartedAt / State.FinishedAt), epoch seconds:
    container_started: float | None = None
    container_finished: float | None = None  # None while it runs
    exit_code: int | None = None
    serving_since: float | None = None  # epoch seconds of the first /health 200
    gpu: str | None = None  # how a CUDA backend's container asked for GPUs (gpu_request description)


@dataclass
class Launch:
    container: str | None
    backend: str | None
    url: str | None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def fallback_latency(self) -> float | None:
        """Seconds from the first container's start (engine time) to the serving one answering /health."""
        if len(self.attempts) < 2 or self.attempts[-1].serving_since is None:
            return None
        first, last = self.attempts[0], self.attempts[-1]
        if first.container_started is not None:
            return last.serving_since - first.container_started
        return last.ended_at - first.started_at

    @property
    def restart_gap(self) -> float | None:
        """Seconds from the previous container's exit to the next one's start (engine times)."""
        if len(self.attempts) < 2:
            return None
        a, b = self.attempts[-2], self.attempts[-1]
        if a.container_finished is None or b.container_started is None:
            return None
        return b.container_started - a.container_finished


def engine_time(value: str | None) -> float | None:
    """Docker's RFC 3339 nanosecond timestamp as epoch seconds; None for the zero time."""
    if not value or value.startswith("0001-"):
        return None
    text = value.strip().replace("Z", "+00:00")
    if "." in text:  # nanoseconds: Python takes at most microseconds
        head, rest = text.split(".", 1)
        digits = "".join(ch for ch in rest if ch.isdigit())
        tz = rest[len(digits):]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tz}"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _state_times(container) -> tuple[float | None, float | None]:
    state = container.attrs.get("State") or {}
    return engine_time(state.get("StartedAt")), engine_time(state.get("FinishedAt"))


def _last_line(container) -> str:
    text = container.logs(stdout=False, stderr=True).decode(errors="replace").strip()
    return text.splitlines()[-1] if text else "(nothing on stderr)"


def is_cuda_backend(spec: dict) -> bool:
    """A backend manifest entry needs CUDA when its requires names a CUDA release (names are free-form)."""
    return bool((spec.get("requires") or {}).get("cuda"))


def gpu_start_error(text: str) -> bool:
    """Did the engine refuse a container because of its GPU request (not a port or a missing image)?"""
    text = text.lower()
    return any(w in text for w in ("device driver", "nvidia", "cdi", "gpu"))


def _remove(client, name: str) -> None:
    try:
        client.containers.get(name).remove(force=True)
    except Exception:  # noqa: BLE001 - not there
        pass


def launch(client, manifest: dict, platform: str, port: int, name: str, override: str | None = None,
           host_port: int = 0, timeout: float = 180.0, log=print, environ=None) -> Launch:
    """Start the first backend of the fallback list (or `override`) that serves /health.

    client: a docker-py client of the engine to run on.
    environ: the caller's environment for the GPU choice (NVIDIA_VISIBLE_DEVICES, ...); os.environ by default.
    """
    entry = manifest["platforms"].get(platform)
    if entry is None:
        raise EnvironmentProblem(f"the backend manifest has no images for {platform}")
    if override and override not in entry["backends"]:
        raise UserError(f"backend {override!r} is not published for {platform} (available: {sorted(entry['backends'])})",
                        "drop --backend to walk the fallback list")
    facts = None  # docker info once, and only when a CUDA backend is tried
    result = Launch(None, None, None)
    for backend in [override] if override else walk_order(entry):
        spec = entry["backends"][backend]
        cuda = is_cuda_backend(spec)
        if cuda and facts is None:
            facts = gpu_mod.host_facts(client.info(), environ)
        attempt, url = _attempt(client, backend, spec["image"], gpu_mod.decide(facts, cuda), cuda, port, name,
                                host_port, timeout, log)
        result.attempts.append(attempt)
        if attempt.outcome == "serving":
            result.container, result.backend, result.url = name, backend, url
            return result
    raise EnvironmentProblem("no backend could start: " + "; ".join(f"{a.backend}: {a.outcome} ({a.detail})"
                                                                  for a in result.attempts))


def _attempt(client, backend: str, image: str, gpu: gpu_mod.GpuRequest, cuda: bool, port: int, name: str,
             host_port: int, timeout: float, log) -> tuple[Attempt, str | None]:
    """Start one backend's image with BACKEND_POLICY=strict and watch it: (what happened, its URL if it serves)."""
    started = time.monotonic()
    log(f"starting {backend}: {image}" + (f" ({gpu.description})" if cuda else ""))
    _remove(client, name)  # a previous run of the service, or an attempt left behind
    try:
        container = client.containers.run(image, name=name, detach=True,
                                           environment={"BACKEND_POLICY": "strict", **gpu.environment},
                                           ports={f"{port}/tcp": ("127.0.0.1", host_port or None)},
                                           **gpu.kwargs(), **run_options())
    except docker.errors.APIError as e:
        if (not gpu.requested or isinstance(e, docker.errors.NotFound)
                or not gpu_start_error(str(e.explanation or e))):
            raise EnvironmentProblem(f"could not start {image}: {e.explanation or e}",
                                     "is the port in use, or the image missing from the registry?") from None
        # The engine could not attach the GPUs (driver gone, toolkit broken): the next backend may still serve.
        _remove(client, name)
        detail = f"the engine could not attach GPUs ({gpu.description}): {e.explanation or e}"
        log(f"  {backend}: failed ({detail})")
        return Attempt(backend, image, "failed", detail, started, time.monotonic(),
                       gpu=gpu.description if cuda else None), None
    outcome, code, serving_since = _watch(container, port, started, timeout)
    ended = time.monotonic()
    try:
        container.reload()
    except docker.errors.APIError:
        pass
    container_started, container_finished = _state_times(container)
    if outcome[0] != "serving":
        container.remove(force=True)
        container_finished = container_finished or (time.time() if outcome[1].startswith("no /health") else None)
    else:
        container_finished = None
    log(f"  {backend}: {outcome[0]} ({outcome[1]}) after {time.monotonic() - started:.1f} s")
    return (Attempt(backend, image, outcome[0], outcome[1], started, ended, container_started, container_finished,
                    code, serving_since, gpu.description if cuda else None),
            outcome[1] if outcome[0] == "serving" else None)


def _watch(container, port: int, started: float, timeout: float) -> tuple[tuple[str, str], int | None, float | None]:
    """Until it serves /health, exits or times out: ((outcome, detail or URL), exit code, epoch of first 200)."""
    while time.monotonic() - started < timeout:
        container.reload()
        if container.status in ("exited", "dead"):
            code = container.wait()["StatusCode"]
            container.reload()  # FinishedAt
            line = _last_line(container)
            return (("exit 78", line) if code == EX_CONFIG else ("failed", f"exit {code}: {line}")), code, None
        binding = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{port}/tcp")
        if binding:
            url = f"http://127.0.0.1:{binding[0]['HostPort']}"
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    return ("serving", url), None, time.time()
            except requests.RequestException:
                pass
        time.sleep(0.1)
    return ("failed", f"no /health within {timeout:.0f} s"), None, None
