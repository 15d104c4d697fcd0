"""Image entrypoint: probe CUDA, apply the backend policy, exec the service.

Standard library only: it runs before anything else in the image and must
not depend on the layers it checks.

  BACKEND_POLICY=strict    a cuda image without a usable GPU prints one line
                           saying why and exits 78 (EX_CONFIG) at once, so a
                           launcher can start the next backend without
                           waiting for a health timeout;
  BACKEND_POLICY=fallback  (default) it serves on CPU and says so.

The result is handed to the service in BACKEND_EFFECTIVE and CUDA_PROBE
(JSON). `python3 entrypoint.py --probe` prints the probe as JSON and exits.
"""

import ctypes
import json
import os
import sys

EX_CONFIG = 78


def _version_tuple(text):
    try:
        return tuple(int(x) for x in text.strip().split("."))
    except ValueError:
        return ()


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


def probe_runtime(libs_dir):
    """cudart from the CUDA-libs layer: loads without a GPU and reports its version."""
    path = os.path.join(libs_dir, "nvidia", "cuda_runtime", "lib", "libcudart.so.12")
    try:
        cudart = ctypes.CDLL(path)
    except OSError as e:
        return {"loaded": False, "path": path, "error": str(e)}
    version = ctypes.c_int(0)
    rc = cudart.cudaRuntimeGetVersion(ctypes.byref(version))
    return {"loaded": True, "path": path, "version": version.value if rc == 0 else None}


def probe_driver():
    """libcuda from the host driver (mounted by the NVIDIA Container Toolkit)."""
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
    return out


def probe(env=os.environ):
    """Is this cuda image usable here? Returns a dict with 'usable' and 'reason'."""
    result = {"usable": False, "reason": None}
    libs = env.get("CUDA_LIBS_DIR", "/opt/site/cuda-libs")
    result["runtime"] = probe_runtime(libs)
    if not result["runtime"]["loaded"]:
        result["reason"] = f"the CUDA-libs layer is broken: {result['runtime']['error']}"
        return result
    driver = probe_driver()
    result["driver"] = driver
    if not driver["present"] or driver.get("reason"):
        result["reason"] = driver["reason"]
        return result
    if driver["device_count"] < 1:
        result["reason"] = "the driver reports no CUDA device"
        return result
    runtime_version = result["runtime"]["version"] or 0
    if driver["cuda_driver_api"] // 1000 < runtime_version // 1000:
        result["reason"] = (f"driver supports CUDA {driver['cuda_driver_api'] // 1000}.{driver['cuda_driver_api'] % 1000 // 10}, "
                            f"image needs CUDA {runtime_version // 1000}.x")
        return result
    minimum = env.get("CUDA_MIN_DRIVER")
    have = driver.get("driver_version")
    if minimum and have and _version_tuple(have) < _version_tuple(minimum):
        result["reason"] = f"driver {have} < {minimum}"
        return result
    result["usable"] = True
    return result


def main(argv):
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    requested = os.environ.get("SERVICE_BACKEND", "cpu")
    policy = os.environ.get("BACKEND_POLICY", "fallback")
    if policy not in ("strict", "fallback"):
        print(f"entrypoint: BACKEND_POLICY={policy!r} is not 'strict' or 'fallback'", file=sys.stderr)
        return EX_CONFIG
    if argv[:1] == ["--probe"]:
        print(json.dumps(probe() if requested == "cuda" else {"usable": False, "reason": "cpu image"}, indent=2))
        return 0
    effective = "cpu"
    if requested == "cuda":
        result = probe()
        os.environ["CUDA_PROBE"] = json.dumps(result)
        if result["usable"]:
            effective = "cuda"
        elif policy == "strict":
            print(f"entrypoint: cuda backend unusable here: {result['reason']} (BACKEND_POLICY=strict)",
                  file=sys.stderr, flush=True)
            return EX_CONFIG
        else:
            print(f"entrypoint: cuda backend unusable here ({result['reason']}); serving on CPU "
                  "(BACKEND_POLICY=fallback)", file=sys.stderr, flush=True)
    os.environ["BACKEND_EFFECTIVE"] = effective
    if not argv:
        print("entrypoint: no command to run", file=sys.stderr)
        return EX_CONFIG
    os.execvp(argv[0], argv)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
