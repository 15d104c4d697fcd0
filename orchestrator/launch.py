"""`invoke run`: start a service, falling back across backends on exit 78.

Each candidate starts with BACKEND_POLICY=strict, so an image that cannot
use its backend says why and exits 78 (EX_CONFIG) within seconds; the
launcher then starts the next backend in the fallback list at once instead
of waiting for a health timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import docker
import requests

from . import engine
from .errors import EnvironmentProblem, UserError
from .select import walk_order

EX_CONFIG = 78


@dataclass
class Attempt:
    backend: str
    image: str
    outcome: str  # serving | exit 78 | failed
    detail: str
    started_at: float
    ended_at: float


@dataclass
class Launch:
    container: str | None
    backend: str | None
    url: str | None
    attempts: list[Attempt] = field(default_factory=list)


def _last_line(container) -> str:
    text = container.logs(stdout=False, stderr=True).decode(errors="replace").strip()
    return text.splitlines()[-1] if text else "(nothing on stderr)"


def launch(manifest: dict, platform: str, port: int, name: str, override: str | None = None,
           host_port: int = 0, timeout: float = 180.0, log=print) -> Launch:
    entry = manifest["platforms"].get(platform)
    if entry is None:
        raise EnvironmentProblem(f"the backend manifest has no images for {platform}")
    if override and override not in entry["backends"]:
        raise UserError(f"backend {override!r} is not published for {platform} (available: {sorted(entry['backends'])})",
                        "drop --backend to walk the fallback list")
    order = [override] if override else walk_order(entry)
    client = engine.docker_client()
    try:  # a previous run of the same service: replace it
        client.containers.get(name).remove(force=True)
    except Exception:  # noqa: BLE001 - not there
        pass
    result = Launch(None, None, None)
    for backend in order:
        image = entry["backends"][backend]["image"]
        started = time.monotonic()
        log(f"starting {backend}: {image}")
        try:
            container = client.containers.run(image, name=name, detach=True,
                                               environment={"BACKEND_POLICY": "strict"},
                                               ports={f"{port}/tcp": ("127.0.0.1", host_port or None)})
        except docker.errors.APIError as e:
            raise EnvironmentProblem(f"could not start {image}: {e.explanation or e}",
                                     "is the port in use, or the image missing from the registry?") from None
        outcome = None
        while time.monotonic() - started < timeout:
            container.reload()
            if container.status in ("exited", "dead"):
                code = container.wait()["StatusCode"]
                line = _last_line(container)
                outcome = ("exit 78", line) if code == EX_CONFIG else ("failed", f"exit {code}: {line}")
                container.remove(force=True)
                break
            binding = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{port}/tcp")
            if binding:
                url = f"http://127.0.0.1:{binding[0]['HostPort']}"
                try:
                    if requests.get(f"{url}/health", timeout=1).status_code == 200:
                        outcome = ("serving", url)
                        result.container, result.backend, result.url = container.name, backend, url
                        break
                except requests.RequestException:
                    pass
            time.sleep(0.1)
        if outcome is None:
            container.remove(force=True)
            outcome = ("failed", f"no /health within {timeout:.0f} s")
        result.attempts.append(Attempt(backend, image, outcome[0], outcome[1], started, time.monotonic()))
        log(f"  {backend}: {outcome[0]} ({outcome[1]}) after {time.monotonic() - started:.1f} s")
        if outcome[0] == "serving":
            return result
    raise EnvironmentProblem("no backend could start: " + "; ".join(f"{a.backend}: {a.outcome} ({a.detail})"
                                                                  for a in result.attempts))
