"""Stage 7: launch every built variant and check the runtime contract.

The manual checklist (torch.version.cuda, torch.cuda.is_available(), curl
/health on every service) as code, with testcontainers: start the image,
wait on /health, then check /ready, /info, torch inside the container, the
CUDA-libs layer, the arch list torch was built for, the non-root user,
labels and env defaults, and on a host without a GPU (or one this CUDA line
cannot drive) that a cuda image exits 78 under BACKEND_POLICY=strict and
serves on CPU under fallback, saying why in /info.

A CUDA variant's container asks for GPUs the way this host provides them
(gpu_request); backend names are free-form, Variant.cuda says what is CUDA.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# The Ryuk reaper image cannot be pulled offline; we remove our containers.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

import requests  # noqa: E402

from . import compat as compat_mod  # noqa: E402
from . import engine  # noqa: E402
from . import gpu_request as gpu_mod  # noqa: E402
from .plan import APP_DIR, WRITABLE_DIRS, run_options  # noqa: E402
from .registry import docker_auth_config  # noqa: E402
from .spec import Project  # noqa: E402

EX_CONFIG = 78
TORCH_PROBE = ("import json, torch; print(json.dumps({'torch': torch.__version__, "
               "'cuda': torch.version.cuda, 'available': torch.cuda.is_available()}))")
# What the build carries, GPU or not (torch.cuda.get_arch_list() is [] without a GPU).
ARCH_PROBE = ("import json, torch; f = torch._C._cuda_getArchFlags(); "
              "print(json.dumps({'archs': f.split() if f else []}))")


@dataclass(frozen=True)
class Variant:
    service: str
    backend: str
    platform: str
    image: str  # repo@sha256:... or any local reference
    port: int
    version: str
    torch: str | None  # expected torch.__version__, None if the image has no torch
    cuda: str | None  # expected torch.version.cuda / CUDA release, None for cpu
    archs: tuple[str, ...] = ()  # expected torch arch list (compat data); () = take the image's CUDA_ARCHS
    system_packages: tuple[str, ...] = ()  # Debian packages the project file asks for (names)
    # Why this torch cannot run under QEMU on this platform (compat data), or None.
    emulation_blocker: str | None = None


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    timeout: float | None = None  # the limit this check ran under, seconds


# Per-check limits (seconds); check_variant's arguments override start and ready.
START_TIMEOUT = 60.0  # container start -> /health 200
READY_TIMEOUT = 180.0  # /health -> /ready 200 (model loading)
EXEC_TIMEOUT = 60.0  # each `python3 -c ...` inside the container
STRICT_EXIT_TIMEOUT = 60.0  # BACKEND_POLICY=strict must exit within this
POLL_SECONDS = 0.2


@dataclass
class VariantResult:
    variant: Variant
    checks: list[Check] = field(default_factory=list)
    logs: str = ""
    seconds: float = 0.0
    pulled: bool = False  # the image was not here before the check: `run` removes it when its group is done

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


# --- which variants (registry reads only) -------------------------------

def variants(project: Project, services=None, backends=None, platforms=None, log=None) -> list[Variant]:
    """The images of the project's current inputs, by digest: built and pushed by content tag
    if missing (a no-op when they are there), never found again by a human tag."""
    from . import build as build_mod

    results = build_mod.build(project, backends, services, platforms, log=log or (lambda *_: None))
    return variants_from_builds(project, results)


def variants_from_builds(project: Project, results) -> list[Variant]:
    """Exactly the per-platform digests a build made (service images only)."""
    out = []
    for r in results:
        if r.image.kind != "service":
            continue
        svc, backend = r.image.service, r.image.backend
        torch = backend.torch_for(r.image.platform)
        archs = compat_mod.load().archs(torch, backend.cuda, r.image.platform) if (torch and backend.cuda) else ()
        out.append(Variant(svc.name, backend.name, r.image.platform, f"{r.image.repository}@{r.digest}",
                           svc.port, svc.version, torch, backend.cuda, tuple(archs), r.image.system_packages(),
                           compat_mod.load().emulation_blocker(torch, r.image.platform) if torch else None))
    return out


def same_torch(found: str | None, wanted: str) -> bool:
    """'2.5.1+cu124' is the 2.5.1 asked for; a local version asked for must match exactly."""
    from packaging.version import InvalidVersion, Version

    try:
        f, w = Version(found or ""), Version(wanted)
    except InvalidVersion:
        return False
    return f == w if w.local else f.public == w.public


def host_gpu_request(client=None) -> gpu_mod.GpuRequest:
    """How this host's CUDA containers get GPUs (none when it cannot hand them any)."""
    return gpu_mod.for_host(client or engine.docker_client())


def host_has_gpu(client=None) -> bool:
    """The engine can hand GPUs to containers (NVIDIA runtime or CDI), the host has one, and the caller wants it."""
    return host_gpu_request(client).requested


def _native(variant: Variant) -> bool:
    return variant.platform == f"linux/{engine._host_arch()}"


def gpu_for(variant: Variant, gpu) -> gpu_mod.GpuRequest:
    """The request a variant's container makes: gpu is a GpuRequest, or True (this host's) / False (none).

    Only native CUDA variants get GPUs: an emulated arm64 container cannot use an amd64 host's driver.
    """
    if not variant.cuda or not _native(variant) or not gpu:
        return gpu_mod.decide(None, cuda=False)
    return gpu if isinstance(gpu, gpu_mod.GpuRequest) else host_gpu_request()


# --- checking one variant (effects: containers) -------------------------

def _container(variant: Variant, env: dict[str, str], gpu: gpu_mod.GpuRequest):
    from testcontainers.core.container import DockerContainer

    c = DockerContainer(variant.image).with_exposed_ports(variant.port)
    for k, v in {**env, **gpu.environment}.items():
        c = c.with_env(k, v)
    # One with_kwargs call: testcontainers keeps only the last one's arguments.
    # Read-only root with a tmpfs per declared writable dir, as `invoke run` starts it.
    # (testcontainers passes its own tmpfs dict to the engine: fill that one.)
    hardening = run_options()
    c.tmpfs.update(hardening.pop("tmpfs"))
    kwargs = {**({} if _native(variant) else {"platform": variant.platform}), **gpu.kwargs(), **hardening}
    return c.with_kwargs(**kwargs)


def _logs_tail(container, lines: int = 15) -> str:
    try:
        out, err = container.get_logs()
        text = (out + err).decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])
    except Exception:  # noqa: BLE001 - the container may be gone already
        return ""


def _exec(container, argv: list[str], timeout: float = EXEC_TIMEOUT) -> tuple[int, str]:
    """Run argv in the container, killed after timeout seconds (coreutils `timeout` when the image has it)."""
    wrapped = ["timeout", "-s", "KILL", str(int(timeout)), *argv]
    result = container.exec(wrapped)
    out = result.output.decode(errors="replace")
    if result.exit_code in (126, 127) and "timeout" in out and "not found" in out.lower():
        result = container.exec(argv)  # no coreutils: run unguarded
        out = result.output.decode(errors="replace")
    if result.exit_code in (124, 137):
        raise TimeoutError(f"{' '.join(argv[:2])}... did not finish within {timeout:.0f} s")
    return result.exit_code, out


def _exec_json(container, code: str, timeout: float = EXEC_TIMEOUT) -> dict:
    code_, out = _exec(container, ["python3", "-c", code], timeout)
    if code_ != 0:
        raise RuntimeError(out.strip().splitlines()[-1:])
    return json.loads(out.strip().splitlines()[-1])


def _check_image_config(variant: Variant, result: VariantResult) -> dict[str, str]:
    """Labels, env defaults and user from the image config; returns the image's env."""
    attrs = engine.docker_client().images.get(variant.image).attrs["Config"]
    env = dict(e.split("=", 1) for e in attrs.get("Env") or [])
    labels = attrs.get("Labels") or {}
    user = attrs.get("User", "")
    result.checks.append(Check("non-root user", bool(user) and user.split(":")[0] not in ("0", "root"), f"User={user!r}"))
    want_labels = {"io.orchestrator.backend": variant.backend, "io.orchestrator.service": variant.service,
                   "org.opencontainers.image.version": variant.version,
                   "io.orchestrator.writable-dirs": " ".join(WRITABLE_DIRS)}
    if variant.cuda:
        want_labels["io.orchestrator.cuda"] = variant.cuda
    bad = {k: labels.get(k) for k, v in want_labels.items() if labels.get(k) != v}
    result.checks.append(Check("labels", not bad, f"wrong or missing: {bad}" if bad else "backend, service, version, writable-dirs"
                               + (", cuda" if variant.cuda else "")))
    want_env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": "expandable_segments:True",
                "SERVICE_BACKEND_KIND": "cuda" if variant.cuda else "cpu"}
    if variant.cuda:
        want_env.update({"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"})
    bad = {k: env.get(k) for k, v in want_env.items() if env.get(k) != v}
    result.checks.append(Check("env defaults", not bad, f"wrong or missing: {bad}" if bad else ", ".join(want_env)))
    return env


def _engine_times(container) -> str:
    """'ran 1.2 s' from the engine's own State.StartedAt/FinishedAt, '' when it does not say."""
    from datetime import datetime

    state = container.attrs.get("State", {})

    def parse(t):
        if not t or t.startswith("0001-"):
            return None
        t = t.rstrip("Z")
        t = t[:26] if "." in t else t  # nanoseconds -> microseconds
        try:
            return datetime.fromisoformat(t)
        except ValueError:
            return None

    start, end = parse(state.get("StartedAt")), parse(state.get("FinishedAt"))
    if start and end:
        return f"ran {(end - start).total_seconds():.1f} s"
    return ""


def _wait_health(container, port: int, timeout: float) -> tuple[bool, str, str | None]:
    """Poll the container's state and GET /health every POLL_SECONDS.

    Returns (ok, detail, base url). An exited container is reported at once
    with its exit code and run time; a hang with what was tried.
    """
    wrapped = container.get_wrapped_container()
    host = container.get_container_host_ip()
    started = time.monotonic()
    deadline = started + timeout
    tries, last, url = 0, "no port mapped yet", None
    while True:
        wrapped.reload()
        status = wrapped.status
        if status in ("exited", "dead"):
            code = wrapped.attrs.get("State", {}).get("ExitCode")
            ran = _engine_times(wrapped) or f"ran about {time.monotonic() - started:.1f} s"
            return False, (f"container exited with code {code} before /health answered ({ran}; "
                           f"{tries} GET /health tried)"), url
        if url is None:
            # Not container.get_exposed_port: it waits for "running" and would hide an exit.
            binding = (wrapped.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{port}/tcp")
            if binding:
                url = f"http://{host}:{binding[0]['HostPort']}"
            else:
                last = f"port {port} not published yet"
        if url is not None:
            tries += 1
            try:
                r = requests.get(f"{url}/health", timeout=min(2.0, max(0.2, deadline - time.monotonic())))
                if r.status_code == 200:
                    return True, f"200 after {time.monotonic() - started:.1f} s ({tries} tries)", url
                last = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                last = _short_error(e)
        if time.monotonic() >= deadline:
            target = f"GET {url}/health" if url else f"GET /health on port {port}"
            return False, (f"/health: no answer within {timeout:.0f} s; tried {target} {tries} times, "
                           f"last: {last} (container {status})"), url
        time.sleep(POLL_SECONDS)


def _short_error(e: Exception) -> str:
    text = str(e)
    for name in ("ConnectionRefused", "ConnectionReset", "RemoteDisconnected", "Read timed out",
                 "Connection aborted"):
        if name in text:
            return name
    return type(e).__name__


def _wait_ready(base: str, timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    last = "no answer"
    saw_503 = False
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{base}/ready", timeout=3)
            if r.status_code == 200:
                return True, "200" + (" (503 while loading before)" if saw_503 else "")
            saw_503 = saw_503 or r.status_code == 503
            last = str(r.status_code)
        except requests.RequestException as e:
            last = _short_error(e)
        time.sleep(0.5)
    return False, f"/ready did not turn 200 within {timeout:.0f} s (last answer: {last})"


def check_variant(variant: Variant, gpu, ready_timeout: float = READY_TIMEOUT,
                  start_timeout: float | None = None, env: dict[str, str] | None = None,
                  exec_timeout: float = EXEC_TIMEOUT, strict_timeout: float = STRICT_EXIT_TIMEOUT) -> VariantResult:
    """Start the variant and check it. gpu: this host's GpuRequest, or True/False (see gpu_for)."""
    result = VariantResult(variant)
    started = time.monotonic()
    request = gpu_for(variant, gpu)
    if start_timeout is None:  # an emulated platform (QEMU) starts several times slower
        start_timeout = START_TIMEOUT if _native(variant) else 3 * START_TIMEOUT
    client = engine.docker_client()
    try:
        client.images.get(variant.image)
    except Exception:  # noqa: BLE001 - not local yet
        try:
            # The same credentials the tool pushed with (env, config.json, helpers), not only the CLI's.
            pull_started = time.monotonic()
            client.images.pull(variant.image, platform=variant.platform,
                               auth_config=docker_auth_config(variant.image.split("/")[0]))
            result.pulled = True
            result.checks.append(Check("pull", True, f"pulled from {variant.image.split('/')[0]} in "
                                       f"{time.monotonic() - pull_started:.1f} s"))
        except Exception as e:  # noqa: BLE001 - no such image, registry down: this variant fails
            result.checks.append(Check("pull", False, f"cannot pull {variant.image}: {str(e)[:200]}"))
            result.seconds = time.monotonic() - started
            return result
    image_env = _check_image_config(variant, result)
    if variant.emulation_blocker and not _native(variant):
        _check_emulated_without_service(variant, result, exec_timeout, strict_timeout, image_env)
        result.seconds = time.monotonic() - started
        return result
    # Whether it should serve on CUDA: a GPU was handed over, unless /info shows this host cannot run the line.
    serves_cuda = request.requested
    container = _container(variant, {"BACKEND_POLICY": "fallback", **(env or {})}, request)
    _track(container)
    try:
        try:
            container.start()  # no wait strategy: _wait_health watches the container itself
        except Exception as e:  # noqa: BLE001 - the engine refused to start it
            result.checks.append(Check("/health", False, f"container did not start: {str(e).splitlines()[0][:200]}"
                                       + (f" ({request.description})" if request.requested else ""), start_timeout))
            result.logs = _logs_tail(container)
            return result
        ok, detail, base = _wait_health(container, variant.port, start_timeout)
        result.checks.append(Check("/health", ok, detail, start_timeout))
        if not ok:
            result.logs = _logs_tail(container, 30)
            if result.logs:
                result.checks[-1].detail += f"; last log line: {result.logs.splitlines()[-1][:200]}"
            return result
        ok, detail = _wait_ready(base, ready_timeout)
        result.checks.append(Check("/ready", ok, detail, ready_timeout))
        if ok:
            try:
                info = requests.get(f"{base}/info", timeout=10).json()
            except (requests.RequestException, ValueError) as e:
                result.checks.append(Check("/info", False, f"no JSON from /info: {e}", 10))
            else:
                serves_cuda, why = expected_cuda(variant, request, info)
                _check_info(variant, serves_cuda, info, result, why)
        _check_inside(variant, serves_cuda, container, result, exec_timeout, image_env)
        result.checks.append(healthcheck_check(container, variant, exec_timeout))
        if not result.ok:
            result.logs = _logs_tail(container)
    finally:
        with _running_lock:
            _running.discard(container)
        try:
            container.stop()
        except Exception:  # noqa: BLE001 - already gone
            pass
        result.seconds = time.monotonic() - started
    if variant.cuda and not serves_cuda:
        # With the same GPU request: a GPU this line cannot drive must also exit 78, not only a missing one.
        result.checks.append(_check_strict_exit(variant, strict_timeout, request))
    result.seconds = time.monotonic() - started
    return result


def _check_emulated_without_service(variant: Variant, result: VariantResult, exec_timeout: float,
                                    strict_timeout: float, image_env: dict[str, str]) -> None:
    """What QEMU allows when this torch crashes under emulation: everything but the service itself.

    The entrypoint (stdlib) runs a sleep in place of the service, so the probe, the CUDA-libs layer,
    the user and the system packages are checked in the real image; strict must still exit 78.
    """
    import dataclasses

    container = _container(variant, {"BACKEND_POLICY": "fallback"}, gpu_mod.decide(None, cuda=False))
    container = container.with_command(["python3", "-c", "import time; time.sleep(3600)"])
    try:
        container.start()
        _check_inside(dataclasses.replace(variant, torch=None), False, container, result, exec_timeout, image_env)
    except Exception as e:  # noqa: BLE001 - the engine refused to start it
        result.checks.append(Check("container under emulation", False, f"did not start: {str(e)[:200]}"))
    finally:
        try:
            container.stop()
        except Exception:  # noqa: BLE001 - already gone
            pass
    result.checks.append(Check("service (not started under emulation)", True,
                               f"{variant.emulation_blocker}; checked instead: the entrypoint's probe, the CUDA-libs "
                               "layer, the user, system packages and strict exit 78 (run it on a native host for the rest)"))
    if variant.cuda:
        result.checks.append(_check_strict_exit(variant, strict_timeout, gpu_mod.decide(None, cuda=False)))


def expected_cuda(variant: Variant, request: gpu_mod.GpuRequest, info: dict) -> tuple[bool, str]:
    """Should this variant serve on CUDA, given its GPU request and the GPUs /info's probe saw? -> (yes, why not).

    Judged from the compat data (arch list, minimum driver), not from the
    entrypoint's own verdict: a GPU host that this line cannot drive (an
    sm_120 card for a 12.4 build, a driver older than the line needs) must
    fall back, any other must serve on CUDA.
    """
    from .runtime import entrypoint as ep

    if not variant.cuda:
        return False, "cpu backend"
    if not request.requested:
        return False, "no GPU handed to the container"
    probe = info.get("cuda_probe") or {}
    archs = list(variant.archs) or list(probe.get("archs") or [])
    for g in probe.get("gpus") or []:
        cc = ep.parse_cc(g.get("cc"))
        if archs and cc and not ep.cc_supported(archs, cc):
            gpu = f"GPU {g.get('index')} ({g.get('name')})"
            return False, f"{gpu} is {g.get('arch')}, not in {ep.describe_archs(archs)}"
    release = compat_mod.load().cuda(variant.cuda)
    have = probe.get("driver_version")
    if release and have and ep._version_tuple(have) < ep._version_tuple(release.min_driver):
        return False, f"driver {have} < {release.min_driver} (CUDA {variant.cuda})"
    return True, ""


def _check_info(variant: Variant, gpu: bool, info: dict, result: VariantResult, why: str = "") -> None:
    """gpu: the variant should serve on CUDA here; why: the reason it should not (for the detail)."""
    want = {"backend_requested": variant.backend,
            "backend_effective": "cuda" if (variant.cuda and gpu) else "cpu",
            "version": variant.version,
            "cuda_available": bool(variant.cuda and gpu)}
    if variant.torch is not None:
        want["torch_cuda"] = variant.cuda
    missing = [k for k in ("devices",) if k not in info]
    bad = {k: info.get(k) for k, v in want.items() if info.get(k) != v}
    if variant.torch is not None and not same_torch(info.get("torch"), variant.torch):
        bad["torch"] = info.get("torch")
    # A fallback must say why (item 7); serving as asked has nothing to explain.
    falls_back = bool(variant.cuda) and not gpu
    reason = info.get("backend_reason")
    if falls_back != bool(reason):
        bad["backend_reason"] = reason
    detail = ", ".join(f"{k}={info.get(k)!r}" for k in ("backend_effective", "torch", "torch_cuda", "cuda_available"))
    if falls_back:
        detail += f", backend_reason={reason!r}" + (f" (expected: {why})" if why else "")
    if bad or missing:
        detail = f"expected {want}, wrong: {bad}" + (f", missing: {missing}" if missing else "")
    result.checks.append(Check("/info", not bad and not missing, detail))


def arch_list_check(variant: Variant, found: list[str], image_env: dict[str, str]) -> Check:
    """torch's arch list in the image against the compat data (Variant.archs) and the image's CUDA_ARCHS."""
    from .runtime import entrypoint as ep

    env_archs = ep.parse_archs(image_env.get("CUDA_ARCHS", ""))
    got = set(found)
    problems = []
    if not got:
        problems.append("torch reports no CUDA arch (a CPU build of torch in a CUDA image?)")
    if variant.archs and got != set(variant.archs):
        problems.append(f"compat data says {' '.join(variant.archs)}")
    if got != set(env_archs):
        # The entrypoint judges GPUs by CUDA_ARCHS: a wrong one refuses good GPUs or accepts bad ones.
        problems.append(f"the image's CUDA_ARCHS says {' '.join(env_archs) or '(unset)'}")
    shown = " ".join(found) or "(none)"
    if problems:
        return Check("torch arch list", False, f"torch has {shown}; " + "; ".join(problems))
    source = "compat data and CUDA_ARCHS" if variant.archs else "CUDA_ARCHS"
    return Check("torch arch list", True, f"{shown} (matches {source})")


def _check_inside(variant: Variant, gpu: bool, container, result: VariantResult,
                  timeout: float = EXEC_TIMEOUT, image_env: dict[str, str] | None = None) -> None:
    if variant.torch is not None:
        try:
            t = _exec_json(container, TORCH_PROBE, timeout)
            want = {"torch": variant.torch, "cuda": variant.cuda, "available": bool(variant.cuda and gpu)}
            ok = same_torch(t["torch"], variant.torch) and t["cuda"] == want["cuda"] and t["available"] == want["available"]
            result.checks.append(Check("torch in container", ok, json.dumps(t) if ok else f"expected {want}, got {t}",
                                       timeout))
        except TimeoutError as e:
            result.checks.append(Check("torch in container", False, f"timed out: {e}", timeout))
        except Exception as e:  # noqa: BLE001
            result.checks.append(Check("torch in container", False, f"import failed: {e}", timeout))
        if variant.cuda:
            try:
                found = _exec_json(container, ARCH_PROBE, timeout)["archs"]
                check = arch_list_check(variant, found, image_env or {})
                check.timeout = timeout
                result.checks.append(check)
            except TimeoutError as e:
                result.checks.append(Check("torch arch list", False, f"timed out: {e}", timeout))
            except Exception as e:  # noqa: BLE001
                result.checks.append(Check("torch arch list", False, f"torch._C._cuda_getArchFlags() failed: {e}",
                                           timeout))
    try:
        _, uid = _exec(container, ["python3", "-c", "import os; print(os.getuid())"], timeout)
        uid = uid.strip()
        result.checks.append(Check("runs as non-root", uid not in ("0", ""), f"uid {uid}", timeout))
    except TimeoutError as e:
        result.checks.append(Check("runs as non-root", False, f"timed out: {e}", timeout))
    result.checks.append(read_only_check(container, timeout))
    if variant.system_packages:
        result.checks.append(system_packages_check(container, variant.system_packages, timeout))
    if variant.cuda:
        try:
            _, out = _exec(container, ["python3", "/opt/runtime/entrypoint.py", "--probe"], timeout)
        except TimeoutError as e:
            result.checks.append(Check("cuda-libs layer", False, f"probe timed out: {e}", timeout))
            return
        result.checks.append(cuda_libs_check(variant, out, timeout))


# Inside the container: each package is installed (the layer's status.d stanza, or the base's dpkg
# status), and its binary of the same name, if it has one, answers its version flag.
SYSTEM_PROBE = """
import json, os, subprocess, sys
status = open('/var/lib/dpkg/status').read() if os.path.exists('/var/lib/dpkg/status') else ''
out = {}
for name in sys.argv[1:]:
    found = os.path.exists('/var/lib/dpkg/status.d/' + name) or ('Package: %s\\n' % name) in status
    binary = '/usr/bin/' + name
    if not os.path.exists(binary):
        out[name] = {'installed': found}
        continue
    p = subprocess.run([binary, '-version' if name in ('ffmpeg', 'ffprobe') else '--version'],
                       capture_output=True, text=True)
    out[name] = {'installed': found, 'exit': p.returncode,
                 'says': ((p.stdout or p.stderr).strip().splitlines() or [''])[0][:80]}
print(json.dumps(out))
"""


def healthcheck_check(container, variant: Variant, timeout: float = EXEC_TIMEOUT) -> Check:
    """The image's HEALTHCHECK asks /health on the service's port, and passes against the running service."""
    hc = engine.docker_client().images.get(variant.image).attrs["Config"].get("Healthcheck") or {}
    test = list(hc.get("Test") or [])
    if not test or test[0] != "CMD" or f":{variant.port}/health" not in " ".join(test):
        return Check("HEALTHCHECK", False, f"does not ask /health on port {variant.port}: {test}")
    try:
        code, out = _exec(container, test[1:], timeout)
    except TimeoutError as e:
        return Check("HEALTHCHECK", False, f"timed out: {e}", timeout)
    return Check("HEALTHCHECK", code == 0, f"GET :{variant.port}/health from inside: exit {code}"
                 + (f": {out.strip()[-160:]}" if code else ""), timeout)


# Inside the container: the app dir refuses writes (read-only root), each declared writable dir takes one.
READ_ONLY_PROBE = """
import json, os, sys, tempfile
out = {}
for d in sys.argv[1:]:
    try:
        with tempfile.NamedTemporaryFile(dir=d):
            out[d] = 'writable'
    except OSError as e:
        out[d] = os.strerror(e.errno)
print(json.dumps(out))
"""


def read_only_check(container, timeout: float = EXEC_TIMEOUT) -> Check:
    """Started like `invoke run` starts it (read-only root, tmpfs on WRITABLE_DIRS): only those take writes."""
    try:
        code, out = _exec(container, ["python3", "-c", READ_ONLY_PROBE, APP_DIR, *WRITABLE_DIRS], timeout)
        found = json.loads(out.strip().splitlines()[-1])
    except TimeoutError as e:
        return Check("read-only root", False, f"timed out: {e}", timeout)
    except (ValueError, IndexError):
        return Check("read-only root", False, f"probe failed: {out.strip()[-200:]}", timeout)
    want = {APP_DIR: os.strerror(30), **{d: "writable" for d in WRITABLE_DIRS}}  # 30: EROFS
    bad = {d: v for d, v in found.items() if v != want[d]}
    return Check("read-only root", not bad, f"unexpected: {bad}" if bad else
                 f"{APP_DIR} read-only; writable: {', '.join(WRITABLE_DIRS)}", timeout)


def system_packages_check(container, packages: tuple[str, ...], timeout: float = EXEC_TIMEOUT) -> Check:
    """The declared Debian packages are in the image and their binaries run (`ffmpeg -version`), arm64 under QEMU too."""
    try:
        code, out = _exec(container, ["python3", "-c", SYSTEM_PROBE, *packages], timeout)
        found = json.loads(out.strip().splitlines()[-1])
    except TimeoutError as e:
        return Check("system packages", False, f"timed out: {e}", timeout)
    except (ValueError, IndexError):
        return Check("system packages", False, f"probe failed: {out.strip()[-200:]}", timeout)
    bad, said = [], []
    for name in packages:
        f = found.get(name, {})
        if not f.get("installed"):
            bad.append(f"{name}: not installed")
        elif "exit" in f and f["exit"] != 0:
            bad.append(f"/usr/bin/{name} exits {f['exit']}: {f.get('says')}")
        else:
            said.append(f"{name}: {f['says']}" if "says" in f else f"{name}: installed (no /usr/bin/{name})")
    return Check("system packages", not bad, "; ".join(bad or said), timeout)


def cuda_libs_check(variant: Variant, probe_out: str, timeout: float | None = None) -> Check:
    """The entrypoint's --probe output: libcudart (at CUDA_RUNTIME_LIB) loads and is the line's runtime version."""
    release = compat_mod.load().cuda(variant.cuda)
    if release is None:
        return Check("cuda-libs layer", False, f"CUDA {variant.cuda} is not in the compatibility data", timeout)
    try:
        data = json.loads(probe_out)
    except ValueError:
        return Check("cuda-libs layer", False, f"probe failed: {probe_out[-200:]}", timeout)
    runtime = data.get("runtime") or {}
    want = release.runtime_version
    ok = runtime.get("version") == want
    path = runtime.get("path") or release.runtime_lib
    detail = (f"libcudart {runtime.get('version')} from the CUDA-libs layer ({path})" if ok else
              f"CUDA-libs layer broken: {runtime.get('error') or runtime.get('version')} "
              f"(expected CUDA runtime {want} at {path})")
    return Check("cuda-libs layer", ok, detail, timeout)


def _check_strict_exit(variant: Variant, timeout: float = STRICT_EXIT_TIMEOUT,
                       gpu: gpu_mod.GpuRequest | None = None) -> Check:
    """BACKEND_POLICY=strict where the variant cannot use CUDA must exit 78 at once with one line on stderr.

    gpu: the request the variant's containers make here (none on a GPU-less host).
    """
    gpu = gpu or gpu_mod.decide(None, cuda=False)
    client = engine.docker_client()
    kwargs = {} if _native(variant) else {"platform": variant.platform}
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


def run(project: Project, services=None, backends=None, platforms=None, log=print,
        ready_timeout: float = 180.0, chosen: list[Variant] | None = None,
        jobs: int | None = None) -> list[VariantResult]:
    """Smoke-test every chosen variant; returns the results in the order given.

    Variants that share layers (same backend and platform: the CUDA libraries,
    torch, the base) run together, up to `jobs` at once (default: one per
    core; an emulated service's start is one core's work under QEMU), and
    the images this run pulled are removed when their group is done: a
    publish of every backend holds one group's images at a time (about 5 GB
    for a CUDA line), not all of them (the example's 13 variants pulled
    outgrew a 60 GB disk). They stay in the registry; `invoke run` pulls
    them again.
    """
    gpu = host_gpu_request()
    log(f"host GPU for containers: {gpu.description}")
    if chosen is None:
        chosen = variants(project, services, backends, platforms)
    jobs = max(1, jobs or min(os.cpu_count() or 1, MAX_JOBS))
    groups: dict[tuple[str, str], list[int]] = {}
    for i, v in enumerate(chosen):
        groups.setdefault((v.backend, v.platform), []).append(i)
    results: dict[int, VariantResult] = {}
    try:
        for (backend, platform), members in groups.items():
            _run_group(chosen, members, backend, platform, min(jobs, len(members)), gpu, ready_timeout, results, log)
    finally:
        _halt.clear()  # every worker has ended: the next run, or a direct check_variant, starts unhalted
    return [results[i] for i in range(len(chosen))]


def _run_group(chosen: list[Variant], members: list[int], backend: str, platform: str, at_once: int, gpu,
               ready_timeout: float, results: dict[int, VariantResult], log) -> None:
    """Check one group's variants, at_once at a time; remove what they pulled when the group is done."""
    if at_once > 1:
        log(f"smoke {backend} {platform}: {len(members)} variants, {at_once} at once")
    pool = ThreadPoolExecutor(at_once, thread_name_prefix="smoke")
    try:
        running = {}
        for i in members:
            v = chosen[i]
            log(f"smoke {v.service}/{v.backend} {v.platform}: {v.image}")
            running[i] = pool.submit(check_variant, v, gpu, ready_timeout=ready_timeout)
        for i in members:  # each reported whole and in order, whatever finishes first
            r = results[i] = running[i].result()
            if at_once > 1:
                log(f"{r.variant.service}/{r.variant.backend} {r.variant.platform}:")
            for c in r.checks:
                log(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    except BaseException:
        _halt.set()  # Ctrl-C or an error: the other checks stop at their next step, containers stopped
        _stop_running()
        raise
    finally:
        pool.shutdown(wait=True)
        _remove_pulled([results[i] for i in members if i in results])


MAX_JOBS = 4
# Checks run in worker threads, which Ctrl-C does not reach: run() sets _halt and stops the containers
# they started, so each check ends at its next step instead of waiting out its timeouts.
_halt = threading.Event()
_running: set = set()
_running_lock = threading.Lock()


class Halted(Exception):
    """A smoke run was stopped (Ctrl-C or a failure elsewhere) before this check started its container."""


def _track(container) -> None:
    """Note a container about to start, for _stop_running; refused once the run is halted."""
    with _running_lock:
        if _halt.is_set():
            raise Halted("smoke run stopped")
        _running.add(container)


def _stop_running() -> None:
    with _running_lock:
        containers = list(_running)
    for c in containers:
        try:
            c.stop()
        except Exception:  # noqa: BLE001 - already gone
            pass


def _remove_pulled(results: list[VariantResult]) -> None:
    client = engine.docker_client()
    for r in results:
        if r.pulled:
            try:
                client.images.remove(r.variant.image)
            except Exception:  # noqa: BLE001 - in use or already gone: it only costs disk
                pass
