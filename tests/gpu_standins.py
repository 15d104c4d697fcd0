"""Stand-ins for the NVIDIA libraries, built with gcc, so every GPU code path runs on a machine without a GPU.

- libcuda.so.1 (the driver API the entrypoint and gpus.py call: cuInit, cuDriverGetVersion,
  cuDeviceGetCount, cuDeviceGet, cuDeviceGetAttribute, cuDeviceGetName, cuDeviceGetUuid);
- libnvidia-ml.so.1 (the NVML calls gpus.py makes);
- libcudart.so.<major> (cudaRuntimeGetVersion, cudaDriverGetVersion, cudaGetDeviceCount,
  cudaDeviceGetAttribute, cudaGetErrorString), which asks libcuda.so.1 as the real one does:
  error 35 (driver too old, or none) and 100 (no device) where the real one gives them.

The GPUs they report come from the environment of the process that loads them:
FAKE_GPUS="NVIDIA H100 80GB HBM3=9.0;NVIDIA GeForce RTX 5090=12.0", FAKE_DRIVER (NVML's driver
version), FAKE_DRIVER_API (cuDriverGetVersion, e.g. 13000), FAKE_CU_INIT (cuInit's answer).
Loaded by soname through LD_LIBRARY_PATH, or by path (libcudart, as a bundle holds it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .conftest import unavailable

SOURCE = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int env_int(const char *key, int fallback) {
    const char *s = getenv(key);
    return s && *s ? atoi(s) : fallback;
}

static int n_gpus(void) {
    const char *s = getenv("FAKE_GPUS");
    int n = 1;
    if (!s || !*s) return 0;
    for (; *s; s++) if (*s == ';') n++;
    return n;
}

/* GPU `index` of FAKE_GPUS: its name and compute capability. */
static int gpu(int index, char *name, int len, int *major, int *minor) {
    const char *s = getenv("FAKE_GPUS"), *eq, *end, *dot;
    if (!s || index < 0) return -1;
    for (int i = 0; i < index; i++) { s = strchr(s, ';'); if (!s) return -1; s++; }
    end = strchr(s, ';');
    if (!end) end = s + strlen(s);
    eq = strchr(s, '=');
    if (!eq || eq > end) return -1;
    if (name && len > 0) { int n = (int)(eq - s); if (n >= len) n = len - 1; memcpy(name, s, n); name[n] = 0; }
    dot = strchr(eq, '.');
    if (major) *major = atoi(eq + 1);
    if (minor) *minor = (dot && dot < end) ? atoi(dot + 1) : 0;
    return 0;
}

#ifdef DRIVER
int cuInit(unsigned flags) { (void)flags; return env_int("FAKE_CU_INIT", 0); }
int cuDriverGetVersion(int *v) { *v = env_int("FAKE_DRIVER_API", 13000); return 0; }
int cuDeviceGetCount(int *n) { *n = n_gpus(); return 0; }
int cuDeviceGet(int *dev, int ordinal) { if (ordinal < 0 || ordinal >= n_gpus()) return 101; *dev = ordinal; return 0; }
int cuDeviceGetAttribute(int *v, int attr, int dev) {
    int major, minor;
    if (gpu(dev, 0, 0, &major, &minor)) return 101;
    if (attr == 75) { *v = major; return 0; }
    if (attr == 76) { *v = minor; return 0; }
    return 1;
}
int cuDeviceGetName(char *name, int len, int dev) { return gpu(dev, name, len, 0, 0) ? 101 : 0; }
int cuDeviceGetUuid(unsigned char *uuid, int dev) { for (int i = 0; i < 16; i++) uuid[i] = (unsigned char)(dev * 16 + i); return 0; }
#endif

#ifdef NVML
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
int nvmlSystemGetDriverVersion(char *buf, unsigned len) {
    snprintf(buf, len, "%s", getenv("FAKE_DRIVER") ? getenv("FAKE_DRIVER") : "580.82.07");
    return 0;
}
int nvmlDeviceGetCount_v2(unsigned *n) { *n = (unsigned)n_gpus(); return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned i, void **handle) {
    if ((int)i >= n_gpus()) return 2;
    *handle = (void *)(long)(i + 1);
    return 0;
}
int nvmlDeviceGetName(void *h, char *name, unsigned len) { return gpu((int)(long)h - 1, name, (int)len, 0, 0) ? 2 : 0; }
int nvmlDeviceGetUUID(void *h, char *buf, unsigned len) {
    snprintf(buf, len, "GPU-%08d-0000-4000-8000-000000000000", (int)(long)h - 1);
    return 0;
}
int nvmlDeviceGetCudaComputeCapability(void *h, int *major, int *minor) {
    return gpu((int)(long)h - 1, 0, 0, major, minor) ? 2 : 0;
}
#endif

#ifdef RUNTIME_VERSION
static void *driver(void) {
    static void *handle;
    if (!handle) handle = dlopen("libcuda.so.1", RTLD_NOW);
    return handle;
}
static int ready(void) {  /* 0, or the error the real runtime gives */
    void *h = driver();
    int api = 0;
    if (!h) return 35;  /* cudaErrorInsufficientDriver: no driver at all */
    ((int (*)(int *))dlsym(h, "cuDriverGetVersion"))(&api);
    if (api / 1000 < RUNTIME_VERSION / 1000) return 35;
    if (((int (*)(unsigned))dlsym(h, "cuInit"))(0) != 0) return 100;  /* cudaErrorNoDevice */
    return 0;
}
int cudaRuntimeGetVersion(int *v) { *v = RUNTIME_VERSION; return 0; }
int cudaDriverGetVersion(int *v) {
    void *h = driver();
    *v = 0;
    return h ? ((int (*)(int *))dlsym(h, "cuDriverGetVersion"))(v) : 0;
}
int cudaGetDeviceCount(int *n) {
    int rc = ready();
    *n = 0;
    if (rc) return rc;
    ((int (*)(int *))dlsym(driver(), "cuDeviceGetCount"))(n);
    return *n ? 0 : 100;
}
int cudaDeviceGetAttribute(int *v, int attr, int dev) {
    int rc = ready();
    if (rc) return rc;
    return ((int (*)(int *, int, int))dlsym(driver(), "cuDeviceGetAttribute"))(v, attr, dev) ? 101 : 0;
}
const char *cudaGetErrorString(int rc) {
    if (rc == 35) return "CUDA driver version is insufficient for CUDA runtime version";
    if (rc == 100) return "no CUDA-capable device is detected";
    if (rc == 101) return "invalid device ordinal";
    return "unknown error";
}
#endif
"""


def build(d: Path) -> dict[str, Path]:
    """Compile the stand-ins into d: {'driver': dir with libcuda.so.1, 'nvml': dir with libnvidia-ml.so.1,
    'cudart12': libcudart.so.12 (12040), 'cudart13': libcudart.so.13 (13000)}."""
    if not shutil.which("gcc"):
        unavailable("gcc is not installed (ci/setup.sh installs build-essential)")
    d.mkdir(parents=True, exist_ok=True)
    src = d / "standin.c"
    src.write_text(SOURCE)
    out = {"driver": d / "driver", "nvml": d / "nvml", "cudart12": d / "cudart" / "libcudart.so.12",
           "cudart13": d / "cudart" / "libcudart.so.13"}
    for p in out.values():
        (p if p.suffix == "" and not p.name.startswith("lib") else p.parent).mkdir(parents=True, exist_ok=True)

    def cc(target: Path, *flags: str) -> None:
        subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-o", str(target), str(src), *flags, "-ldl"],
                       check=True, capture_output=True)

    cc(out["driver"] / "libcuda.so.1", "-DDRIVER")
    cc(out["nvml"] / "libnvidia-ml.so.1", "-DNVML")
    cc(out["cudart12"], "-DRUNTIME_VERSION=12040")
    cc(out["cudart13"], "-DRUNTIME_VERSION=13000")
    return out
