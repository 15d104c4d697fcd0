#!/usr/bin/env python3
"""The first run on a real GPU host: do the published CUDA lines and selection hold up against real hardware?

Runs on a Linux host with an NVIDIA GPU, Python 3 and whatever torch the
host has; no Docker, no network. Needs this checkout (for the image's own
probe code, orchestrator/host/runtime/*.py, loaded as files) and a bundle
that `bench/gpu_bundle.py` made from the registry beforehand: each CUDA
line's libcudart, taken out of its published CUDA-libs layer (a few MB, with
its digest), and the published backend manifests. Writes one JSON report:

  host       the host probe (orchestrator/host/probe.py) with the GPU report below
  gpus       orchestrator/host/runtime/gpus.py: the real GPUs (NVML, then libcuda)
  lines      per CUDA line (backend and platform) of the bundle: its libcudart loaded
             through the entrypoint's own probe (host/runtime/entrypoint.py: runtime
             version, the driver's devices and compute capabilities, usable or why
             not), then asked itself (cudaGetDeviceCount, each device's compute
             capability), and whether the line's arch list supports each GPU
  selection  host/select.py replayed with this host against each published manifest:
             the chosen line and the reasons (needs the tool's Python dependencies;
             without them the report says so, and `--replay` fills it in elsewhere)
  torch      where the host has torch: its version, torch.version.cuda,
             torch.cuda.get_arch_list(), and a matmul on the GPU against the CPU

Each probe runs in its own process (two libcudart versions, libcuda and torch's
own CUDA libraries never share one), under a timeout.

Usage:
  python3 bench/gpu_check.py BUNDLE [--out gpu-check.json]
  python3 bench/gpu_check.py --replay REPORT BUNDLE [--out REPORT]   # selection only, with the tool installed
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import json
import platform as platform_mod
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "orchestrator" / "host" / "runtime"
FORMAT = 1
PART_TIMEOUT = 180.0
MATMUL_SIZE = 512
# cudaDeviceAttr: cudaDevAttrComputeCapabilityMajor / Minor (the driver API's numbers, the same).
CC_MAJOR, CC_MINOR = 75, 76


def runtime_module(name: str):
    """orchestrator/host/runtime/<name>.py loaded as a file: stdlib only, the bytes every image carries."""
    spec = importlib.util.spec_from_file_location(f"orch_runtime_{name}", RUNTIME / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- parts, each run in a process of its own ---------------------------------------------

def part_gpus() -> dict:
    return runtime_module("gpus").probe_gpus()


def _cudart_error(cudart, rc: int) -> str | None:
    try:
        fn = cudart.cudaGetErrorString
        fn.restype = ctypes.c_char_p
        text = fn(rc)
        return text.decode(errors="replace") if text else None
    except (AttributeError, OSError):
        return None


def ask_cudart(path: str) -> dict:
    """The bundled libcudart itself against this host's driver: its device count and each device's compute capability."""
    try:
        cudart = ctypes.CDLL(path)
    except OSError as e:
        return {"loaded": False, "error": str(e)}
    out: dict = {"loaded": True}
    driver, count = ctypes.c_int(0), ctypes.c_int(0)
    rc = cudart.cudaDriverGetVersion(ctypes.byref(driver))
    out["driver_api"] = driver.value if rc == 0 else None
    rc = cudart.cudaGetDeviceCount(ctypes.byref(count))
    out["device_count_rc"] = rc
    if rc != 0:
        out["device_count"] = 0
        out["error"] = f"cudaGetDeviceCount: CUDA error {rc}" + (f" ({_cudart_error(cudart, rc)})"
                                                                   if _cudart_error(cudart, rc) else "")
        out["devices"] = []
        return out
    out["device_count"] = count.value
    devices = []
    for i in range(count.value):
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        rc = (cudart.cudaDeviceGetAttribute(ctypes.byref(major), CC_MAJOR, i)
              or cudart.cudaDeviceGetAttribute(ctypes.byref(minor), CC_MINOR, i))
        devices.append({"index": i, "cc": f"{major.value}.{minor.value}" if rc == 0 else None,
                        **({"error": f"cudaDeviceGetAttribute: CUDA error {rc}"} if rc else {})})
    out["devices"] = devices
    return out


def part_line(line: dict) -> dict:
    """One CUDA line: the entrypoint's probe with the bundled libcudart, then libcudart asked itself."""
    ep = runtime_module("entrypoint")
    lib = Path(line["path"])
    env = {"SERVICE_BACKEND": line["backend"], "SERVICE_BACKEND_KIND": "cuda", "CUDA_LIBS_DIR": str(lib.parent),
           "CUDA_RUNTIME_LIB": lib.name, "CUDA_MIN_DRIVER": line.get("min_driver") or "",
           "CUDA_ARCHS": " ".join(line.get("archs") or [])}
    probe = ep.probe(env)
    archs = probe["archs"]
    devices = (probe.get("driver") or {}).get("devices") or []
    supported = []
    for d in devices:
        cc = ep.parse_cc(d.get("cc"))
        supported.append({"index": d.get("index"), "name": d.get("name"), "cc": d.get("cc"), "arch": d.get("arch"),
                          "supported": (ep.cc_supported(archs, cc) if cc else None) if archs else None})
    return {"probe": probe, "cudart": ask_cudart(str(lib)), "gpus_supported": supported,
            "archs": ep.describe_archs(archs) if archs else "(none listed: no arch check)"}


def part_torch(size: int) -> dict:
    try:
        import torch
    except ImportError as e:
        return {"installed": False, "why": str(e)}
    out: dict = {"installed": True, "version": torch.__version__, "cuda": getattr(torch.version, "cuda", None)}
    available = bool(torch.cuda.is_available())
    out["cuda_available"] = available
    out["arch_list"] = list(torch.cuda.get_arch_list()) if available else []
    if not available:
        out["matmul"] = {"ran": False, "why": "torch.cuda.is_available() is False"}
        return out
    out["devices"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                       "cc": "%d.%d" % tuple(torch.cuda.get_device_capability(i))}
                      for i in range(torch.cuda.device_count())]
    torch.manual_seed(0)
    a, b = torch.randn(size, size), torch.randn(size, size)
    started = time.monotonic()
    on_cpu = a @ b
    on_gpu = (a.to("cuda") @ b.to("cuda")).cpu()
    torch.cuda.synchronize()
    diff = float((on_cpu - on_gpu).abs().max().item())
    scale = float(on_cpu.abs().max().item()) or 1.0
    # float32 sums of `size` products in another order (and TF32, where enabled) differ in the last bits.
    out["matmul"] = {"ran": True, "size": size, "max_abs_diff": diff, "max_rel_diff": diff / scale,
                     "matches": diff / scale < 1e-3, "seconds": round(time.monotonic() - started, 3)}
    return out


PARTS = {"gpus": lambda arg: part_gpus(), "line": lambda arg: part_line(json.loads(arg)),
         "torch": lambda arg: part_torch(int(arg or MATMUL_SIZE))}


def run_part(name: str, arg: str = "", timeout: float = PART_TIMEOUT) -> dict:
    """A part in a process of its own: its JSON, or what went wrong (exit, signal, timeout) with its stderr."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--part", name] + ([arg] if arg else [])
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{name}: no answer within {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"{name}: exit {proc.returncode}", "stderr": proc.stderr[-2000:]}
    try:
        return json.loads(lines[-1])
    except ValueError:
        return {"error": f"{name}: not JSON: {lines[-1][:200]}", "stderr": proc.stderr[-2000:]}


# --- the host, the bundle and the selection ------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def host_probe(root: str, machine: str | None, gpus: dict) -> dict:
    """orchestrator/host/probe.py (stdlib only) with the GPU report above in place of asking NVML again."""
    sys.path.insert(0, str(ROOT))
    from orchestrator.host import probe

    host = probe.probe(root, machine=machine, nvml=lambda: gpus.get("driver"),
                       gpus=lambda: [probe.Gpu.from_report(g, gpus.get("source") or "report")
                                     for g in gpus.get("gpus") or []])
    return host.as_json()


def host_from_json(data: dict):
    from orchestrator.host import probe

    gpus = tuple(probe.Gpu.from_report(g, g.get("source")) for g in data.get("gpus") or [])
    visible = data.get("visible") or {}
    return probe.Host(data["platform"], data.get("driver_version"), data.get("driver_source"), data.get("libcuda"),
                      tuple(data.get("devices") or ()), tuple(data.get("notes") or ()), bool(data.get("wsl")), gpus,
                      visible.get("NVIDIA_VISIBLE_DEVICES"), visible.get("CUDA_VISIBLE_DEVICES"))


def replay_selection(host_json: dict, bundle: Path, manifests: dict) -> dict:
    """host/select.py with this host against each bundled manifest (the tool's dependencies needed)."""
    sys.path.insert(0, str(ROOT))
    try:
        from orchestrator.common.errors import UserError
        from orchestrator.host import select as select_mod
    except ImportError as e:
        return {"replayed": False, "why": f"the tool's Python dependencies are missing here ({e})",
                "replay": "on a machine with the tool: python3 bench/gpu_check.py --replay REPORT BUNDLE"}
    host = host_from_json(host_json)
    out: dict = {"replayed": True, "services": {}}
    for service, entry in manifests.items():
        manifest = json.loads((bundle / entry["file"]).read_text())
        try:
            choice = select_mod.select(manifest, host, source=f"{service} {entry.get('ref', '')}".strip())
        except UserError as e:
            out["services"][service] = {"chosen": None, "error": e.message}
            continue
        out["services"][service] = {"chosen": choice.backend, "image": choice.image, "platform": choice.platform,
                                    "reasons": list(choice.reasons)}
    return out


def check(bundle: Path, root: str = "/", machine: str | None = None, matmul_size: int = MATMUL_SIZE,
          timeout: float = PART_TIMEOUT) -> dict:
    made = json.loads((bundle / "bundle.json").read_text())
    report: dict = {"format": FORMAT, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "machine": {"arch": machine or platform_mod.machine(), "kernel": platform_mod.release(),
                                "python": platform_mod.python_version()},
                    "bundle": {"made_at": made.get("made_at"), "registry": made.get("registry"),
                               "project": made.get("project")}}
    gpus = report["gpus"] = run_part("gpus", timeout=timeout)
    host = report["host"] = host_probe(root, machine, gpus if "error" not in gpus else {})
    lines = []
    for line in made.get("lines") or []:
        entry = {k: line.get(k) for k in ("backend", "cuda", "platform", "cuda_libs", "file", "sha256",
                                          "runtime_version", "min_driver")}
        path = bundle / line["file"]
        if line["platform"] != host["platform"]:
            entry["skipped"] = f"a {line['platform']} library; this host is {host['platform']}"
        elif not path.is_file() or sha256_file(path) != line["sha256"]:
            entry["skipped"] = f"{line['file']} is missing or does not match its digest {line['sha256'][:19]}"
        else:
            entry.update(run_part("line", json.dumps({**line, "path": str(path.resolve())}), timeout))
        lines.append(entry)
    report["lines"] = lines
    report["selection"] = replay_selection(host, bundle, made.get("manifests") or {})
    report["torch"] = run_part("torch", str(matmul_size), timeout=timeout)
    report["summary"] = summary(report)
    return report


def summary(report: dict) -> list[str]:
    """What a reader wants first, one line each."""
    out = []
    gpus = report.get("gpus") or {}
    if gpus.get("error"):
        out.append(f"GPU report failed: {gpus['error']}")
    elif not gpus.get("gpus"):
        out.append("no NVIDIA GPU on this host: " + "; ".join(gpus.get("notes") or []))
    for g in gpus.get("gpus") or []:
        out.append(f"GPU {g['index']}: {g.get('name')} (compute capability {g.get('cc')}, {g.get('sm')}); "
                   f"driver {gpus.get('driver')} via {gpus.get('source')}")
    for line in report.get("lines") or []:
        name = f"{line['backend']} (CUDA {line['cuda']}, {line['platform']})"
        if "skipped" in line:
            out.append(f"{name}: not checked: {line['skipped']}")
            continue
        if "error" in line:
            out.append(f"{name}: probe failed: {line['error']}")
            continue
        probe, cudart = line["probe"], line["cudart"]
        runtime = probe.get("runtime") or {}
        said = (f"{name}: libcudart {runtime.get('version')} loaded; it sees {cudart.get('device_count', 0)} device(s)"
                + (f" ({cudart['error']})" if cudart.get("error") else ""))
        said += "; usable" if probe.get("usable") else f"; NOT usable: {probe.get('reason')}"
        for g in line.get("gpus_supported") or []:
            if g.get("supported") is not None:
                said += f"; GPU {g['index']} {g['arch']} {'in' if g['supported'] else 'NOT in'} {line['archs']}"
        out.append(said)
    selection = report.get("selection") or {}
    if not selection.get("replayed"):
        out.append(f"selection not replayed: {selection.get('why')}")
    for service, s in (selection.get("services") or {}).items():
        out.append(f"select {service}: {s['chosen'] or 'nothing'}" + (f" ({s['error']})" if s.get("error") else
                                                                       f" ({s['reasons'][-1]})"))
    t = report.get("torch") or {}
    if t.get("error"):
        out.append(f"torch check failed: {t['error']}")
    elif not t.get("installed"):
        out.append("torch: not installed here")
    else:
        m = t.get("matmul") or {}
        out.append(f"torch {t['version']} (CUDA {t.get('cuda')}), arch list {' '.join(t.get('arch_list') or []) or '-'}; "
                   + (f"matmul {m['size']}x{m['size']} on the GPU {'matches' if m['matches'] else 'DIFFERS FROM'} "
                      f"the CPU (max relative difference {m['max_rel_diff']:.1e})" if m.get("ran") else
                      f"no GPU matmul: {m.get('why')}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", help="the directory bench/gpu_bundle.py wrote")
    parser.add_argument("--out", help="where the JSON report goes (default: gpu-check-<time>.json here)")
    parser.add_argument("--replay", metavar="REPORT", help="fill in the selection of a report made elsewhere")
    parser.add_argument("--root", default="/", help=argparse.SUPPRESS)  # a fake host root (tests)
    parser.add_argument("--machine", help=argparse.SUPPRESS)  # with --root: the host's uname -m (tests)
    parser.add_argument("--matmul-size", type=int, default=MATMUL_SIZE, help="n of the n x n matmul (default 512)")
    parser.add_argument("--timeout", type=float, default=PART_TIMEOUT, help="seconds each probe may take")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # run one part in this process, print its JSON
    args = parser.parse_args(argv)
    if args.part:
        print(json.dumps(PARTS[args.part](args.bundle)))  # the part's argument lands in the first positional
        return 0
    if not args.bundle:
        parser.error("give the bundle directory bench/gpu_bundle.py wrote")
    bundle = Path(args.bundle)
    if not (bundle / "bundle.json").is_file():
        parser.error(f"{bundle} has no bundle.json: make one with bench/gpu_bundle.py where the registry is reachable")
    if args.replay:
        report = json.loads(Path(args.replay).read_text())
        made = json.loads((bundle / "bundle.json").read_text())
        report["selection"] = replay_selection(report["host"], bundle, made.get("manifests") or {})
        report["summary"] = summary(report)
        out = Path(args.out or args.replay)
    else:
        report = check(bundle, args.root, args.machine, args.matmul_size, args.timeout)
        out = Path(args.out or f"gpu-check-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    for line in report["summary"]:
        print(line, file=sys.stderr)
    print(f"report: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
