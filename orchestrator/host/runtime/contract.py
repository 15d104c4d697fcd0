"""The health contract every service image follows (importable as `contract`).

  GET /health  200 while the process lives (liveness)
  GET /ready   503 until the model is loaded, then 200 (readiness)
  GET /info    JSON: service, version, backend_requested, backend_kind,
               backend_effective, backend_reason (why not the requested
               backend, or null), cuda_probe (what the entrypoint found:
               usable, reason, runtime_version, driver_version,
               cuda_driver_api, gpus [{index, name, cc, arch}], archs; null
               for a cpu image), torch, torch_cuda (torch.version.cuda),
               torch_archs (the arch list torch was built for),
               cuda_available, devices [{name, memory_total,
               memory_allocated}], ready

A service of your own can follow it without this module: it only reads the
environment the entrypoint sets (SERVICE_*, BACKEND_EFFECTIVE,
BACKEND_REASON, CUDA_PROBE).
"""

import json
import os
import threading
import time


def _read_probe(text):
    """CUDA_PROBE as a dict; None when unset or not JSON (a service started without the entrypoint)."""
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def probe_summary(probe):
    """The part of the entrypoint's probe worth showing in /info (no library paths or raw errors)."""
    if not probe:
        return None
    runtime = probe.get("runtime") or {}
    driver = probe.get("driver") or {}
    return {"usable": bool(probe.get("usable")), "reason": probe.get("reason"),
            "runtime_version": runtime.get("version"), "driver_version": driver.get("driver_version"),
            "cuda_driver_api": driver.get("cuda_driver_api"),
            "gpus": [{k: d.get(k) for k in ("index", "name", "cc", "arch")} for d in driver.get("devices") or []],
            "archs": probe.get("archs") or []}


class Contract:
    def __init__(self, name=None):
        self.name = name or os.environ.get("SERVICE_NAME", "service")
        self.version = os.environ.get("SERVICE_VERSION", "0")
        self.requested = os.environ.get("SERVICE_BACKEND", "cpu")
        self.kind = os.environ.get("SERVICE_BACKEND_KIND") or ("cuda" if self.requested == "cuda" else "cpu")
        self.effective = os.environ.get("BACKEND_EFFECTIVE", "cpu")
        self.probe = _read_probe(os.environ.get("CUDA_PROBE"))
        self.reason = os.environ.get("BACKEND_REASON") or (
            self.probe.get("reason") if self.probe and not self.probe.get("usable") else None)
        self.ready = threading.Event()
        self.started = time.time()
        self.model_info = {}

    def device(self):
        import torch

        return "cuda" if self.effective == "cuda" and torch.cuda.is_available() else "cpu"

    def load_in_background(self, loader):
        """Run loader() -> dict off the request path; /ready turns 200 when it returns."""

        def run():
            self.model_info = loader() or {}
            self.ready.set()

        threading.Thread(target=run, name="model-loader", daemon=True).start()

    def load_torch_model(self, build, on_loaded):
        """Build a torch module in the background (seeded, on the effective device, eval mode).

        on_loaded(model) receives it; /ready turns 200 afterwards.
        """

        def loader():
            import torch

            torch.manual_seed(0)
            model = build().to(self.device()).eval()
            on_loaded(model)
            return {"name": type(model).__name__, "device": self.device(),
                    "parameters": sum(p.numel() for p in model.parameters())}

        self.load_in_background(loader)

    def info(self):
        out = {"service": self.name, "version": self.version, "backend_requested": self.requested,
               "backend_kind": self.kind, "backend_effective": self.effective, "backend_reason": self.reason,
               "cuda_probe": probe_summary(self.probe), "ready": self.ready.is_set(),
               "uptime_s": round(time.time() - self.started, 1), "model": self.model_info,
               "torch": None, "torch_cuda": None, "torch_archs": [], "cuda_available": False, "devices": []}
        try:
            import torch
        except ImportError:
            return out
        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = bool(torch.cuda.is_available())
        flags = getattr(torch._C, "_cuda_getArchFlags", None)  # what the build carries, GPU or not
        out["torch_archs"] = (flags() or "").split() if flags else []
        if out["cuda_available"]:
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                out["devices"].append({"name": props.name, "memory_total": props.total_memory,
                                       "memory_allocated": torch.cuda.memory_allocated(i),
                                       "memory_reserved": torch.cuda.memory_reserved(i)})
        else:
            out["devices"].append({"name": "cpu", "threads": torch.get_num_threads()})
        return out

    def install(self, app):
        """Add /health, /ready and /info to a FastAPI app."""
        from fastapi.responses import JSONResponse

        @app.get("/health")
        def health():
            return {"status": "ok"}

        @app.get("/ready")
        def ready():
            if self.ready.is_set():
                return {"status": "ready"}
            return JSONResponse({"status": "loading"}, status_code=503)

        @app.get("/info")
        def info():
            return self.info()
