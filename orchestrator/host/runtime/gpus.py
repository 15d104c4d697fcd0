"""Which NVIDIA GPUs this machine has, and their compute capabilities.

Standard library only and no orchestrator imports, so the file can be
copied next to the image entrypoint or carried alone to a GPU host:

  python3 gpus.py    prints {"driver", "cuda_driver_api", "source", "gpus": [...], "notes"}

NVML (libnvidia-ml.so.1) answers first: it numbers GPUs as nvidia-smi and
NVIDIA_VISIBLE_DEVICES do (PCI bus order) and ignores CUDA_VISIBLE_DEVICES.
Where NVML is absent, libcuda.so.1 answers instead, asked for every GPU in
PCI bus order so its indices mean the same thing.
"""

import ctypes
import json
import os
import sys

NVML_BUFFER = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE, NVML_DEVICE_UUID_V2_BUFFER_SIZE
NVML_DRIVER_BUFFER = 80  # NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE
NVML_CALLS = ("nvmlInit_v2", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount_v2",
              "nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetName", "nvmlDeviceGetUUID",
              "nvmlDeviceGetCudaComputeCapability")
CUDA_CALLS = ("cuInit", "cuDriverGetVersion", "cuDeviceGetCount", "cuDeviceGet", "cuDeviceGetAttribute",
              "cuDeviceGetName")
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


def sm_name(major, minor):
    """(9, 0) -> 'sm_90', (12, 0) -> 'sm_120': the name torch.cuda.get_arch_list() uses."""
    return f"sm_{major}{minor}"


def _gpu(index, uuid, name, cc):
    return {"index": index, "uuid": uuid, "name": name,
            "cc": f"{cc[0]}.{cc[1]}" if cc else None, "sm": sm_name(*cc) if cc else None}


def _text(buf):
    return buf.value.decode(errors="replace") or None


def _load(name):
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def nvml_driver_version():
    """The driver version NVML reports ('580.82.07'), or None without NVML."""
    nvml = _load("libnvidia-ml.so.1")
    if nvml is None:
        return None
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
        try:
            buf = ctypes.create_string_buffer(NVML_DRIVER_BUFFER)
            return _text(buf) if nvml.nvmlSystemGetDriverVersion(buf, NVML_DRIVER_BUFFER) == 0 else None
        finally:
            nvml.nvmlShutdown()
    except AttributeError:  # a libnvidia-ml too old to have the call
        return None


def nvml_gpus():
    """{"driver", "gpus", "source": "nvml"} from NVML, or None when NVML is absent or does not start."""
    nvml = _load("libnvidia-ml.so.1")
    if nvml is None:
        return None
    try:
        for fn in NVML_CALLS:  # an NVML too old for one of them counts as absent
            getattr(nvml, fn)
        # nvmlDevice_t is a pointer: without argtypes ctypes would pass it as a 32-bit int.
        nvml.nvmlDeviceGetHandleByIndex_v2.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        for fn in ("nvmlDeviceGetName", "nvmlDeviceGetUUID"):
            getattr(nvml, fn).argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]
        nvml.nvmlDeviceGetCudaComputeCapability.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        if nvml.nvmlInit_v2() != 0:
            return None
    except AttributeError:
        return None
    notes = []
    try:
        buf = ctypes.create_string_buffer(NVML_DRIVER_BUFFER)
        driver = _text(buf) if nvml.nvmlSystemGetDriverVersion(buf, NVML_DRIVER_BUFFER) == 0 else None
        count = ctypes.c_uint(0)
        rc = nvml.nvmlDeviceGetCount_v2(ctypes.byref(count))
        if rc != 0:
            notes.append(f"nvmlDeviceGetCount_v2: NVML error {rc}")
        gpus = []
        for i in range(count.value if rc == 0 else 0):
            handle = ctypes.c_void_p()
            rc = nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle))
            if rc != 0:
                # A lost or inaccessible GPU still counts: its capability is unknown, not absent.
                notes.append(f"GPU {i}: nvmlDeviceGetHandleByIndex_v2: NVML error {rc}")
                gpus.append(_gpu(i, None, None, None))
                continue
            name, uuid = ctypes.create_string_buffer(NVML_BUFFER), ctypes.create_string_buffer(NVML_BUFFER)
            name_ok = nvml.nvmlDeviceGetName(handle, name, NVML_BUFFER) == 0
            uuid_ok = nvml.nvmlDeviceGetUUID(handle, uuid, NVML_BUFFER) == 0
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            rc = nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor))
            if rc != 0:
                notes.append(f"GPU {i}: nvmlDeviceGetCudaComputeCapability: NVML error {rc}")
            gpus.append(_gpu(i, _text(uuid) if uuid_ok else None, _text(name) if name_ok else None,
                             (major.value, minor.value) if rc == 0 else None))
    finally:
        nvml.nvmlShutdown()
    return {"driver": driver, "cuda_driver_api": None, "source": "nvml", "gpus": gpus, "notes": notes}


def _cuda_uuid(cuda, dev):
    raw = ctypes.create_string_buffer(16)  # CUuuid: 16 bytes
    fn = getattr(cuda, "cuDeviceGetUuid_v2", None) or getattr(cuda, "cuDeviceGetUuid", None)
    if fn is None or fn(raw, dev) != 0:
        return None
    h = raw.raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"  # as NVML and nvidia-smi print it


def cuda_gpus(env=os.environ):
    """{"driver": None, "gpus", "source": "cuda"} from libcuda, or None without libcuda.

    CUDA_VISIBLE_DEVICES is hidden and CUDA_DEVICE_ORDER set to PCI_BUS_ID
    while libcuda initialises, so it lists every GPU in nvidia-smi's order
    and the caller applies the visibility rules itself. (Only effective
    before the first cuInit in this process.)
    """
    cuda = _load("libcuda.so.1")
    if cuda is None or not all(hasattr(cuda, fn) for fn in CUDA_CALLS):
        return None
    saved = {k: env.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    try:
        rc = cuda.cuInit(0)
    finally:
        for k, v in saved.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
    notes = []
    if rc != 0:
        # 100 is CUDA_ERROR_NO_DEVICE: a driver without a GPU.
        return {"driver": None, "cuda_driver_api": None, "source": "cuda", "gpus": [],
                "notes": [f"cuInit: CUDA error {rc}"]}
    api, count = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDriverGetVersion(ctypes.byref(api))
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        notes.append(f"cuDeviceGetCount: CUDA error {rc}")
    gpus = []
    for i in range(count.value if rc == 0 else 0):
        dev = ctypes.c_int(0)
        if cuda.cuDeviceGet(ctypes.byref(dev), i) != 0:
            notes.append(f"GPU {i}: cuDeviceGet failed")
            gpus.append(_gpu(i, None, None, None))
            continue
        name = ctypes.create_string_buffer(256)
        name_ok = cuda.cuDeviceGetName(name, 256, dev) == 0
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        rc = (cuda.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
              or cuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
        if rc != 0:
            notes.append(f"GPU {i}: cuDeviceGetAttribute: CUDA error {rc}")
        gpus.append(_gpu(i, _cuda_uuid(cuda, dev), _text(name) if name_ok else None,
                         (major.value, minor.value) if rc == 0 else None))
    return {"driver": None, "cuda_driver_api": api.value or None, "source": "cuda", "gpus": gpus, "notes": notes}


def proc_driver_version(path="/proc/driver/nvidia/version"):
    """'580.82.07' from the kernel module's version file, or None."""
    try:
        with open(path) as fh:
            words = fh.read().split()
    except OSError:
        return None
    for i, word in enumerate(words[:-1]):
        if word == "Module":  # "Kernel Module  580.82.07" or "Kernel Module for x86_64  580.82.07"
            rest = words[i + 1:i + 4]
            rest = rest[2:] if rest[:1] == ["for"] else rest
            if rest and rest[0][:1].isdigit():
                return rest[0]
    return None


def probe_gpus(env=os.environ):
    """Every GPU with its compute capability: NVML, else libcuda, else none."""
    report, notes = None, []
    for name, ask in (("NVML", nvml_gpus), ("libcuda", lambda: cuda_gpus(env))):
        try:
            report = ask()
        except (OSError, ValueError, TypeError, ctypes.ArgumentError) as e:  # a broken library: say so, go on
            notes.append(f"{name}: {e}")
        if report is not None:
            report["notes"] = notes + report["notes"]
            break
    if report is None:
        return {"driver": proc_driver_version(), "cuda_driver_api": None, "source": None, "gpus": [],
                "notes": notes or ["neither libnvidia-ml.so.1 nor libcuda.so.1 loads: no NVIDIA driver"]}
    report["driver"] = report["driver"] or proc_driver_version()
    return report


def main():
    print(json.dumps(probe_gpus(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
