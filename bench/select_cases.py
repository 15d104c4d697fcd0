"""`invoke select --json` on fake GPU hosts against the published backend manifest.

Method: for each host below, lay out a fake root (the driver's
/proc/driver/nvidia/version, libcuda.so.1, /dev/nvidia*) and a GPU report in
the shape `python3 orchestrator/host/runtime/gpus.py` prints on a real host, then
run the real CLI: `invoke select --service tts --manifest
manifests/tts-0.1.0.backends.json --root ROOT --gpus REPORT --machine ARCH
--json`. Prints each host's chosen backend and reasons; exits 1 when a
choice differs from the expected one.

Usage: .venv/bin/python bench/select_cases.py [--manifest FILE] > bench/out/select_cases.json
(after `invoke publish`, which writes the manifest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RTX5090 = {"name": "NVIDIA GeForce RTX 5090", "cc": "12.0"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "cc": "9.0"}
V100 = {"name": "Tesla V100-SXM2-32GB", "cc": "7.0"}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "cc": "8.0"}
T4 = {"name": "Tesla T4", "cc": "7.5"}
GH200 = {"name": "NVIDIA GH200 480GB", "cc": "9.0"}

# (name, machine, driver, GPUs, env, expected backend)
CASES = [
    ("Blackwell (RTX 5090) on driver 570", "x86_64", "570.133.07", [RTX5090], {}, "cpu"),
    ("Blackwell (RTX 5090) on driver 580", "x86_64", "580.82.07", [RTX5090], {}, "cuda13"),
    ("V100 (sm_70) on driver 580", "x86_64", "580.82.07", [V100], {}, "cuda"),
    ("Turing (T4, sm_75) on driver 535", "x86_64", "535.230.02", [T4], {}, "cuda"),
    ("GH200 (arm64, sm_90) on driver 580", "aarch64", "580.82.07", [GH200], {}, "cuda13"),
    ("H100 (sm_90) on driver 580", "x86_64", "580.82.07", [H100], {}, "cuda13"),
    ("mixed V100 + A100 on driver 580", "x86_64", "580.82.07", [V100, A100], {}, "cuda"),
    ("mixed V100 + A100, CUDA_VISIBLE_DEVICES=1", "x86_64", "580.82.07", [V100, A100],
     {"CUDA_VISIBLE_DEVICES": "1"}, "cuda13"),
    ("no GPU", "x86_64", None, [], {}, "cpu"),
]


def fake_host(base: Path, machine: str, driver: str | None, gpus: list[dict]) -> tuple[Path, Path]:
    root = base / "root"
    if driver:
        (root / "proc/driver/nvidia").mkdir(parents=True)
        (root / "proc/driver/nvidia/version").write_text(
            f"NVRM version: NVIDIA UNIX {machine} Kernel Module  {driver}  Release Build\n")
        lib = root / f"usr/lib/{machine}-linux-gnu"
        lib.mkdir(parents=True)
        (lib / "libcuda.so.1").write_bytes(b"")
    (root / "dev").mkdir(parents=True, exist_ok=True)
    for i, _ in enumerate(gpus):
        (root / f"dev/nvidia{i}").write_text("")
    report = {"driver": driver, "source": "nvml" if gpus else None,
              "gpus": [{"index": i, "uuid": f"GPU-{i:08d}-0000-0000-0000-000000000000", **g} for i, g in enumerate(gpus)]}
    (base / "gpus.json").write_text(json.dumps(report))
    return root, base / "gpus.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=str(ROOT / "manifests" / "tts-0.1.0.backends.json"))
    args = ap.parse_args()
    rows, ok = [], True
    for name, machine, driver, gpus, env, expected in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            root, report = fake_host(Path(tmp), machine, driver, gpus)
            run_env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}
            proc = subprocess.run([str(ROOT / ".venv/bin/invoke"), "select", "--service", "tts", "--manifest",
                                   args.manifest, "--root", str(root), "--gpus", str(report), "--machine", machine,
                                   "--json"], cwd=ROOT, capture_output=True, text=True, env={**run_env, **env})
        if proc.returncode != 0:
            ok = False
            rows.append({"host": name, "error": proc.stderr.strip()})
            print(f"{name}: FAILED {proc.stderr.strip()}", file=sys.stderr)
            continue
        out = json.loads(proc.stdout)
        same = out["backend"] == expected
        ok &= same
        rows.append({"host": name, "env": env, "expected": expected, "backend": out["backend"],
                     "platform": out["platform"], "reasons": out["reasons"]})
        print(f"{name}: {out['backend']} ({'as expected' if same else 'EXPECTED ' + expected})", file=sys.stderr)
        for r in out["reasons"]:
            print(f"    {r}", file=sys.stderr)
    print(json.dumps({"manifest": os.path.relpath(args.manifest, ROOT), "cases": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
