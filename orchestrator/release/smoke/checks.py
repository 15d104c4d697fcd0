"""The smoke checks: small functions over a running container (or the image's config), each a `Check`.

Probe scripts run with the image's own python3 (`python3 -c`), each under
coreutils `timeout` where the image has it, so a hang is a failed check,
never a stuck run. None of these start or stop containers (runner.py does).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime

import requests

from orchestrator.host.contract import APP_DIR, LABEL_PREFIX, RUNTIME_DIR, WRITABLE_DIRS, WRITABLE_LABEL
from orchestrator.host.runtime import entrypoint as ep
from orchestrator.project import compat as compat_mod
from orchestrator.release.smoke.variant import Variant, same_torch

EXEC_TIMEOUT = 60.0  # each `python3 -c ...` inside the container
POLL_SECONDS = 0.2

TORCH_PROBE = ("import json, torch; print(json.dumps({'torch': torch.__version__, "
               "'cuda': torch.version.cuda, 'available': torch.cuda.is_available()}))")
# What the build carries, GPU or not (torch.cuda.get_arch_list() is [] without a GPU).
ARCH_PROBE = ("import json, torch; f = torch._C._cuda_getArchFlags(); "
              "print(json.dumps({'archs': f.split() if f else []}))")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    timeout: float | None = None  # the limit this check ran under, seconds


# --- running things in the container ---------------------------------------------

def exec_in(container, argv: list[str], timeout: float = EXEC_TIMEOUT) -> tuple[int, str]:
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


def exec_json(container, code: str, timeout: float = EXEC_TIMEOUT) -> dict:
    code_, out = exec_in(container, ["python3", "-c", code], timeout)
    if code_ != 0:
        raise RuntimeError(out.strip().splitlines()[-1:])
    return json.loads(out.strip().splitlines()[-1])


def logs_tail(container, lines: int = 15) -> str:
    try:
        out, err = container.get_logs()
        text = (out + err).decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])
    except Exception:  # noqa: BLE001 - the container may be gone already
        return ""


def engine_times(container) -> str:
    """'ran 1.2 s' from the engine's own State.StartedAt/FinishedAt, '' when it does not say."""
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


def short_error(e: Exception) -> str:
    text = str(e)
    for name in ("ConnectionRefused", "ConnectionReset", "RemoteDisconnected", "Read timed out",
                 "Connection aborted"):
        if name in text:
            return name
    return type(e).__name__


# --- the image's config -------------------------------------------------------------

def image_config_checks(variant: Variant, config: dict) -> tuple[list[Check], dict[str, str]]:
    """User, labels and env defaults from the image config (the engine's Config); returns (checks, the env)."""
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    labels = config.get("Labels") or {}
    user = config.get("User", "")
    checks = [Check("non-root user", bool(user) and user.split(":")[0] not in ("0", "root"), f"User={user!r}")]
    want_labels = {f"{LABEL_PREFIX}.backend": variant.backend, f"{LABEL_PREFIX}.service": variant.service,
                   "org.opencontainers.image.version": variant.version, WRITABLE_LABEL: " ".join(WRITABLE_DIRS)}
    if variant.cuda:
        want_labels[f"{LABEL_PREFIX}.cuda"] = variant.cuda
    bad = {k: labels.get(k) for k, v in want_labels.items() if labels.get(k) != v}
    checks.append(Check("labels", not bad, f"wrong or missing: {bad}" if bad else
                        "backend, service, version, writable-dirs" + (", cuda" if variant.cuda else "")))
    want_env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": "expandable_segments:True",
                "SERVICE_BACKEND_KIND": "cuda" if variant.cuda else "cpu"}
    if variant.cuda:
        want_env.update({"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"})
    bad = {k: env.get(k) for k, v in want_env.items() if env.get(k) != v}
    checks.append(Check("env defaults", not bad, f"wrong or missing: {bad}" if bad else ", ".join(want_env)))
    return checks, env


# --- the service over HTTP ---------------------------------------------------------

def wait_health(container, port: int, timeout: float) -> tuple[bool, str, str | None]:
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
            ran = engine_times(wrapped) or f"ran about {time.monotonic() - started:.1f} s"
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
                last = short_error(e)
        if time.monotonic() >= deadline:
            target = f"GET {url}/health" if url else f"GET /health on port {port}"
            return False, (f"/health: no answer within {timeout:.0f} s; tried {target} {tries} times, "
                           f"last: {last} (container {status})"), url
        time.sleep(POLL_SECONDS)


def wait_ready(base: str, timeout: float) -> tuple[bool, str]:
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
            last = short_error(e)
        time.sleep(0.5)
    return False, f"/ready did not turn 200 within {timeout:.0f} s (last answer: {last})"


def info_check(variant: Variant, gpu: bool, info: dict, why: str = "") -> Check:
    """/info against what the variant should report; gpu: it should serve on CUDA here, why: the reason not."""
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
    # A fallback must say why; serving as asked has nothing to explain.
    falls_back = bool(variant.cuda) and not gpu
    reason = info.get("backend_reason")
    if falls_back != bool(reason):
        bad["backend_reason"] = reason
    detail = ", ".join(f"{k}={info.get(k)!r}" for k in ("backend_effective", "torch", "torch_cuda", "cuda_available"))
    if falls_back:
        detail += f", backend_reason={reason!r}" + (f" (expected: {why})" if why else "")
    if bad or missing:
        detail = f"expected {want}, wrong: {bad}" + (f", missing: {missing}" if missing else "")
    return Check("/info", not bad and not missing, detail)


# --- inside the container ------------------------------------------------------------

def arch_list_check(variant: Variant, found: list[str], image_env: dict[str, str]) -> Check:
    """torch's arch list in the image against the compat data (Variant.archs) and the image's CUDA_ARCHS."""
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


def inside_checks(variant: Variant, gpu: bool, container, timeout: float = EXEC_TIMEOUT,
                  image_env: dict[str, str] | None = None, info: dict | None = None) -> list[Check]:
    """torch, its arch list, the user, the read-only root, system packages and the CUDA-libs layer, from inside.

    info: the service's /info answer. Its torch fields come from the tool's runtime in the service's own
    process (host/runtime/contract.py), the same values TORCH_PROBE and ARCH_PROBE read; taking them from
    there saves importing torch again (about 24 s under QEMU, 3-5 s natively). Without them, the probes run.
    """
    checks: list[Check] = []
    if variant.torch is not None:
        want = {"torch": variant.torch, "cuda": variant.cuda, "available": bool(variant.cuda and gpu)}
        reported = isinstance(info, dict) and info.get("torch") is not None
        try:
            if reported:
                t = {"torch": info["torch"], "cuda": info.get("torch_cuda"), "available": info.get("cuda_available")}
            else:
                t = exec_json(container, TORCH_PROBE, timeout)
            ok = same_torch(t["torch"], variant.torch) and t["cuda"] == want["cuda"] and t["available"] == want["available"]
            detail = json.dumps(t) if ok else f"expected {want}, got {t}"
            checks.append(Check("torch in container", ok,
                                detail + (" (the service's process, on /info)" if reported else ""), timeout))
        except TimeoutError as e:
            checks.append(Check("torch in container", False, f"timed out: {e}", timeout))
        except Exception as e:  # noqa: BLE001
            checks.append(Check("torch in container", False, f"import failed: {e}", timeout))
        if variant.cuda:
            try:
                if reported and isinstance(info.get("torch_archs"), list):
                    found, where = info["torch_archs"], " (the service's process, on /info)"
                else:
                    found, where = exec_json(container, ARCH_PROBE, timeout)["archs"], ""
                check = arch_list_check(variant, found, image_env or {})
                check.timeout, check.detail = timeout, check.detail + where
                checks.append(check)
            except TimeoutError as e:
                checks.append(Check("torch arch list", False, f"timed out: {e}", timeout))
            except Exception as e:  # noqa: BLE001
                checks.append(Check("torch arch list", False, f"torch._C._cuda_getArchFlags() failed: {e}",
                                           timeout))
    # The user, the read-only root, the system packages and the CUDA probe in one process: each
    # `python3` start costs a second or more under QEMU.
    found = inside_probe(container, variant.system_packages, timeout, cuda=bool(variant.cuda))
    uid = str(found.get("uid", ""))
    checks.append(Check("runs as non-root", uid not in ("0", ""), f"uid {uid}" if uid else found["error"], timeout))
    checks.append(read_only_check(container, timeout, found))
    if variant.system_packages:
        checks.append(system_packages_check(container, variant.system_packages, timeout, found))
    if variant.cuda:
        if found.get("cuda_probe") is None:  # the probe failed: running it again would wait as long again
            checks.append(Check("cuda-libs layer", False, found.get("error", "probe failed"), timeout))
        else:
            checks.append(cuda_libs_check(variant, found["cuda_probe"], timeout))
    return checks


# Inside the container, in one process: the user; whether the app dir refuses writes (read-only root)
# and each declared writable dir takes one; each declared Debian package is installed (the layer's
# status.d stanza, or the base's dpkg status), and its binary of the same name, if it has one,
# answers its version flag; and what the image's entrypoint prints for `--probe` (the CUDA-libs layer),
# its runtime loaded by path (an app module may be named entrypoint too).
# argv: a JSON {"dirs": [...], "packages": [...], "entrypoint": path or null}.
INSIDE_PROBE = """
import contextlib, importlib.util, io, json, os, subprocess, sys, tempfile
want = json.loads(sys.argv[1])
cuda_probe = None
if want['entrypoint']:
    spec = importlib.util.spec_from_file_location('orchestrator_runtime_entrypoint', want['entrypoint'])
    entrypoint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entrypoint)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        entrypoint.main(['--probe'])
    cuda_probe = printed.getvalue()
dirs = {}
for d in want['dirs']:
    try:
        with tempfile.NamedTemporaryFile(dir=d):
            dirs[d] = 'writable'
    except OSError as e:
        dirs[d] = os.strerror(e.errno)
status = open('/var/lib/dpkg/status').read() if os.path.exists('/var/lib/dpkg/status') else ''
packages = {}
for name in want['packages']:
    found = os.path.exists('/var/lib/dpkg/status.d/' + name) or ('Package: %s\\n' % name) in status
    binary = '/usr/bin/' + name
    if not os.path.exists(binary):
        packages[name] = {'installed': found}
        continue
    p = subprocess.run([binary, '-version' if name in ('ffmpeg', 'ffprobe') else '--version'],
                       capture_output=True, text=True)
    packages[name] = {'installed': found, 'exit': p.returncode,
                      'says': ((p.stdout or p.stderr).strip().splitlines() or [''])[0][:80]}
print(json.dumps({'uid': os.getuid(), 'dirs': dirs, 'packages': packages, 'cuda_probe': cuda_probe}))
"""


def inside_probe(container, packages: tuple[str, ...] = (), timeout: float = EXEC_TIMEOUT, cuda: bool = False) -> dict:
    """INSIDE_PROBE's answer: {"uid", "dirs", "packages", "cuda_probe" (the entrypoint's --probe output; None
    unless cuda)}; or {"error": why} when it timed out or failed, for each check to report."""
    arg = json.dumps({"dirs": [APP_DIR, *WRITABLE_DIRS], "packages": list(packages),
                      "entrypoint": f"{RUNTIME_DIR}/entrypoint.py" if cuda else None})
    try:
        code, out = exec_in(container, ["python3", "-c", INSIDE_PROBE, arg], timeout)
        if code != 0:
            return {"error": f"probe failed: {out.strip()[-200:]}"}
        return json.loads(out.strip().splitlines()[-1])
    except TimeoutError as e:
        return {"error": f"timed out: {e}"}
    except (ValueError, IndexError) as e:
        return {"error": f"probe failed: {str(e)[-200:]}"}


def healthcheck_check(container, variant: Variant, config: dict, timeout: float = EXEC_TIMEOUT) -> Check:
    """The image's HEALTHCHECK (config: the engine's Config) asks /health on the service's port, and passes
    against the running service."""
    hc = config.get("Healthcheck") or {}
    test = list(hc.get("Test") or [])
    if not test or test[0] != "CMD" or f":{variant.port}/health" not in " ".join(test):
        return Check("HEALTHCHECK", False, f"does not ask /health on port {variant.port}: {test}")
    try:
        code, out = exec_in(container, test[1:], timeout)
    except TimeoutError as e:
        return Check("HEALTHCHECK", False, f"timed out: {e}", timeout)
    return Check("HEALTHCHECK", code == 0, f"GET :{variant.port}/health from inside: exit {code}"
                 + (f": {out.strip()[-160:]}" if code else ""), timeout)


def read_only_check(container, timeout: float = EXEC_TIMEOUT, found: dict | None = None) -> Check:
    """Started like `invoke run` starts it (read-only root, tmpfs on WRITABLE_DIRS): only those take writes.

    found: inside_probe's answer, if it already ran."""
    found = inside_probe(container, (), timeout) if found is None else found
    if "dirs" not in found:
        return Check("read-only root", False, found.get("error", "probe failed"), timeout)
    want = {APP_DIR: os.strerror(30), **{d: "writable" for d in WRITABLE_DIRS}}  # 30: EROFS
    bad = {d: v for d, v in found["dirs"].items() if v != want[d]}
    return Check("read-only root", not bad, f"unexpected: {bad}" if bad else
                 f"{APP_DIR} read-only; writable: {', '.join(WRITABLE_DIRS)}", timeout)


def system_packages_check(container, packages: tuple[str, ...], timeout: float = EXEC_TIMEOUT,
                          found: dict | None = None) -> Check:
    """The declared Debian packages are in the image and their binaries run (`ffmpeg -version`), arm64 under QEMU too.

    found: inside_probe's answer, if it already ran."""
    found = inside_probe(container, packages, timeout) if found is None else found
    if "packages" not in found:
        return Check("system packages", False, found.get("error", "probe failed"), timeout)
    bad, said = [], []
    for name in packages:
        f = found["packages"].get(name, {})
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
