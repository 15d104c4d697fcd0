"""Image entrypoint: probe CUDA, apply the backend policy, exec the service.

Standard library only: it runs before anything else in the image and must
not depend on the layers it checks.

  BACKEND_POLICY=strict    a cuda image that cannot run here (no driver, an
                           old driver, a GPU the torch build has no kernels
                           for) prints one line saying why and exits 78
                           (EX_CONFIG) at once, so a launcher can start the
                           next backend without waiting for a health timeout;
  BACKEND_POLICY=fallback  (default) it serves on CPU and says why.

Environment read (set by the image; see plan.py):
  SERVICE_BACKEND       the backend's name, free-form (cuda, cuda13, cpu, ...)
  SERVICE_BACKEND_KIND  cuda | cpu: whether to probe CUDA. Images built before
                        it existed have SERVICE_BACKEND=cuda and no kind.
  CUDA_LIBS_DIR         the CUDA-libs site dir (/opt/site/cuda-libs)
  CUDA_RUNTIME_LIB      libcudart relative to CUDA_LIBS_DIR (default: the 12.x path)
  CUDA_MIN_DRIVER       the driver this CUDA line needs (580.65.06)
  CUDA_ARCHS            what the torch build has kernels for ("sm_75 ... sm_120");
                        empty or absent: no arch check (an image without torch)

The result is handed to the service in BACKEND_EFFECTIVE (cuda | cpu),
BACKEND_REASON (why not cuda; absent when it is) and CUDA_PROBE (JSON).
`python3 entrypoint.py --probe` prints the probe as JSON and exits 0.
"""

import ctypes
import json
import os
import re
import sys

EX_CONFIG = 78
DEFAULT_LIBS_DIR = "/opt/site/cuda-libs"
# Images built before CUDA_RUNTIME_LIB existed carry the 12.x wheel layout.
DEFAULT_RUNTIME_LIB = "nvidia/cuda_runtime/lib/libcudart.so.12"
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
KINDS = ("cuda", "cpu")
POLICIES = ("strict", "fallback")

# sm_90, sm_90a, sm_100f, compute_90: the last digit is the minor version.
_ARCH_RE = re.compile(r"^(sm|compute)_(\d+)(\d)([af]?)$")


def _version_tuple(text):
    try:
        return tuple(int(x) for x in text.strip().split("."))
    except ValueError:
        return ()


# --- compute capabilities vs the torch build (pure) ----------------------

def parse_arch(text):
    """'sm_86' -> ('sm', 8, 6, ''); 'sm_120' -> ('sm', 12, 0, ''); 'compute_90' -> ('compute', 9, 0, '').

    The suffix is '' (plain), 'a' (arch-specific) or 'f' (family). None for
    anything else.
    """
    m = _ARCH_RE.match(text.strip().lower())
    if not m:
        return None
    return m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)


def parse_archs(text):
    """CUDA_ARCHS / torch's arch flags ('sm_50 sm_60', also comma- or semicolon-separated) as a list."""
    return [a for a in re.split(r"[\s,;]+", text or "") if a]


def arch_supports(arch, cc):
    """Can code built for `arch` run on a GPU of compute capability cc = (major, minor)?

    CUDA's binary compatibility: cubin for sm_XY runs on X.y with y >= Y
    (same major only); an 'a' suffix (sm_90a) runs on exactly X.Y; PTX
    (compute_XY) is JIT-compiled for any X.Y or newer. An 'f' suffix
    (family: sm_100f, compute_100f) runs on later minors of the same major.
    The same rules as select.py's, which judges the host before a start.
    """
    parsed = parse_arch(arch)
    if parsed is None:
        return False
    kind, major, minor, suffix = parsed
    cc = tuple(cc)
    if suffix == "a":
        return (major, minor) == cc
    if kind == "compute" and not suffix:
        return (major, minor) <= cc
    return major == cc[0] and minor <= cc[1]


def cc_supported(archs, cc):
    return any(arch_supports(a, cc) for a in archs)


def parse_cc(text):
    """'12.0' -> (12, 0); None for anything else (an unknown compute capability)."""
    cc = _version_tuple(text or "")
    return cc if len(cc) == 2 else None


def cc_arch(cc):
    """(12, 0) -> 'sm_120'."""
    return f"sm_{cc[0]}{cc[1]}"


def describe_archs(archs):
    """'sm_50..sm_90', 'sm_75..sm_120 + PTX compute_120': how a reason line names a build's arch list."""
    parsed = [(a, parse_arch(a)) for a in archs]
    sm = sorted(((p[1], p[2], p[3]), a) for a, p in parsed if p and p[0] == "sm")
    ptx = [a for _, a in sorted(((p[1], p[2], p[3]), a) for a, p in parsed if p and p[0] == "compute")]
    other = [a for a, p in parsed if p is None]
    text = (sm[0][1] if len(sm) == 1 else f"{sm[0][1]}..{sm[-1][1]}") if sm else ""
    if ptx:
        text = f"{text} + PTX {' '.join(ptx)}" if text else f"PTX {' '.join(ptx)}"
    if other:
        text = " ".join([text, *other]).strip()
    return text or "no kernels"


def unsupported_devices(devices, archs):
    """The devices (probe dicts with 'cc': 'M.m') no arch in archs can run on. Unknown cc: not judged."""
    out = []
    for d in devices:
        cc = parse_cc(d.get("cc"))
        if cc and not cc_supported(archs, cc):
            out.append(d)
    return out


# --- the probe (effects: ctypes) -----------------------------------------

def _nvml_driver_version():
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        buf = ctypes.create_string_buffer(96)
        ok = nvml.nvmlSystemGetDriverVersion(buf, 96) == 0
        nvml.nvmlShutdown()
        return buf.value.decode() if ok else None
    except (OSError, AttributeError):
        return None


def _proc_driver_version():
    try:
        with open("/proc/driver/nvidia/version") as fh:
            for word in fh.read().split():
                if _version_tuple(word) and word.count(".") >= 1 and word[0].isdigit():
                    return word
    except OSError:
        pass
    return None


def runtime_lib_path(env=os.environ):
    """Where libcudart lives: CUDA_LIBS_DIR joined with CUDA_RUNTIME_LIB (an absolute CUDA_RUNTIME_LIB wins)."""
    libs = env.get("CUDA_LIBS_DIR") or DEFAULT_LIBS_DIR
    return os.path.join(libs, env.get("CUDA_RUNTIME_LIB") or DEFAULT_RUNTIME_LIB)


def probe_runtime(path):
    """cudart from the CUDA-libs layer: loads without a GPU and reports its version."""
    try:
        cudart = ctypes.CDLL(path)
    except OSError as e:
        return {"loaded": False, "path": path, "error": str(e)}
    version = ctypes.c_int(0)
    rc = cudart.cudaRuntimeGetVersion(ctypes.byref(version))
    return {"loaded": True, "path": path, "version": version.value if rc == 0 else None}


def device_info(cuda, index):
    """Name and compute capability of device `index` through libcuda (after cuInit)."""
    dev = ctypes.c_int(0)
    rc = cuda.cuDeviceGet(ctypes.byref(dev), index)
    if rc != 0:
        return {"index": index, "name": None, "cc": None, "arch": None, "error": f"cuDeviceGet: CUDA error {rc}"}
    name = ctypes.create_string_buffer(256)
    name_ok = cuda.cuDeviceGetName(name, 256, dev) == 0
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    rc = (cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
          or cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
    out = {"index": index, "name": name.value.decode(errors="replace") if name_ok else None}
    if rc != 0:
        out.update({"cc": None, "arch": None, "error": f"cuDeviceGetAttribute: CUDA error {rc}"})
    else:
        out.update({"cc": f"{major.value}.{minor.value}", "arch": cc_arch((major.value, minor.value))})
    return out


def probe_driver():
    """libcuda from the host driver (mounted by the NVIDIA Container Toolkit or CDI): versions and devices."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return {"present": False, "reason": "no NVIDIA driver in the container (libcuda.so.1 not found; "
                                            "run with --gpus all on a host with the NVIDIA Container Toolkit)"}
    out = {"present": True}
    rc = cuda.cuInit(0)
    if rc != 0:
        out["reason"] = f"cuInit failed with CUDA error {rc} (driver loaded but no usable device)"
        return out
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDriverGetVersion(ctypes.byref(version))
    cuda.cuDeviceGetCount(ctypes.byref(count))
    out["cuda_driver_api"] = version.value
    out["device_count"] = count.value
    out["driver_version"] = _nvml_driver_version() or _proc_driver_version()
    out["devices"] = [device_info(cuda, i) for i in range(count.value)]
    return out


# --- decisions (pure) ----------------------------------------------------

def _cuda_text(api):
    return f"{api // 1000}.{api % 1000 // 10}"


def assess(runtime, driver, env):
    """Is a cuda image usable, given what probe_runtime and probe_driver found? -> probe dict.

    {'usable', 'reason', 'runtime', 'driver', 'archs'}; reason is one line
    saying why not, or None.
    """
    archs = parse_archs(env.get("CUDA_ARCHS", ""))
    result = {"usable": False, "reason": None, "runtime": runtime, "driver": driver, "archs": archs}
    if not runtime.get("loaded"):
        result["reason"] = f"the CUDA-libs layer is broken: {runtime.get('error')}"
        return result
    if driver is None:
        result["reason"] = "the driver was not probed"
        return result
    if not driver.get("present") or driver.get("reason"):
        result["reason"] = driver.get("reason") or "no NVIDIA driver in the container"
        return result
    if driver.get("device_count", 0) < 1:
        result["reason"] = "the driver reports no CUDA device"
        return result
    runtime_version = runtime.get("version") or 0
    api = driver.get("cuda_driver_api") or 0
    minimum = env.get("CUDA_MIN_DRIVER")
    if api // 1000 < runtime_version // 1000:
        result["reason"] = (f"driver {driver.get('driver_version') or '?'} supports CUDA {_cuda_text(api)}, "
                            f"this image needs CUDA {runtime_version // 1000}.x"
                            + (f" (driver >= {minimum})" if minimum else ""))
        return result
    have = driver.get("driver_version")
    if minimum and have and _version_tuple(have) < _version_tuple(minimum):
        result["reason"] = f"driver {have} < {minimum}"
        return result
    if archs:
        bad = unsupported_devices(driver.get("devices") or [], archs)
        if bad:
            gpus = ", ".join(f"GPU {d['index']} ({d.get('name') or 'unnamed'}) is {d['arch']}" for d in bad)
            result["reason"] = f"{gpus}, this torch build has {describe_archs(archs)}"
            return result
    result["usable"] = True
    return result


def backend_kind(env):
    """cuda | cpu (| whatever an image says, rejected by decide). Old images: the name 'cuda' meant the kind."""
    kind = env.get("SERVICE_BACKEND_KIND")
    if kind:
        return kind
    return "cuda" if env.get("SERVICE_BACKEND") == "cuda" else "cpu"


def decide(env, result):
    """What main does, from the environment and the probe result (None for a cpu image).

    -> (exit_code or None, effective backend, one line for stderr or None).
    exit_code None means: exec the command with BACKEND_EFFECTIVE=effective.
    """
    name = env.get("SERVICE_BACKEND", "cpu")
    policy = env.get("BACKEND_POLICY", "fallback")
    kind = backend_kind(env)
    if policy not in POLICIES:
        return EX_CONFIG, None, (f"entrypoint: BACKEND_POLICY={policy!r} is not 'strict' or 'fallback' "
                                 "(set it in the image or with -e BACKEND_POLICY=...)")
    if kind not in KINDS:
        return EX_CONFIG, None, f"entrypoint: SERVICE_BACKEND_KIND={kind!r} is not one of {', '.join(KINDS)}"
    if kind == "cpu":
        return None, "cpu", None
    if result["usable"]:
        return None, "cuda", None
    reason = result["reason"]
    if policy == "strict":
        return EX_CONFIG, None, f"entrypoint: {name} backend unusable here: {reason} (BACKEND_POLICY=strict)"
    return None, "cpu", f"entrypoint: {name} backend unusable here ({reason}); serving on CPU (BACKEND_POLICY=fallback)"


# --- effects -------------------------------------------------------------

def probe(env=os.environ):
    """Is this cuda image usable here? The probe dict (see assess)."""
    runtime = probe_runtime(runtime_lib_path(env))
    # No driver probe without a runtime: the reason is the broken layer either way.
    driver = probe_driver() if runtime["loaded"] else None
    return assess(runtime, driver, env)


def _one_line(text):
    return " ".join(str(text).split())


def main(argv, env=None):
    env = os.environ if env is None else env
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    if argv[:1] == ["--probe"]:
        cuda = backend_kind(env) == "cuda"
        print(json.dumps(probe(env) if cuda else {"usable": False, "reason": "cpu image"}, indent=2))
        return 0
    result = probe(env) if backend_kind(env) == "cuda" and env.get("BACKEND_POLICY", "fallback") in POLICIES else None
    if result is not None:
        result["reason"] = result["reason"] and _one_line(result["reason"])
        env["CUDA_PROBE"] = json.dumps(result)
    code, effective, message = decide(env, result)
    if message:
        print(message, file=sys.stderr, flush=True)
    if code is not None:
        return code
    env["BACKEND_EFFECTIVE"] = effective
    if result is not None and not result["usable"]:
        env["BACKEND_REASON"] = result["reason"]
    else:
        env.pop("BACKEND_REASON", None)
    if not argv:
        print("entrypoint: no command to run (give the service's command as CMD)", file=sys.stderr)
        return EX_CONFIG
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
