"""A second project whose CUDA-libs layers the registry already holds sends none of them.

Usage: .venv/bin/python bench/second_project.py [--backends cuda,cuda13] [--platforms linux/amd64,linux/arm64]
                                                 [--source DIR] [--out bench/out/second_project.json]

The example project (or --source) is copied twice, under two fresh
namespaces. The first copy builds its CUDA-libs images (layers from the blob
cache when this machine built them before, else installed and written; its
blobs land in, or are mounted into, its own repositories). Then the second
copy builds the same CUDA-libs images: nothing in its own repositories and
no parent to mount from, only what this machine remembers the registry
holds (orchestrator/oci/registry/known.py). Recorded per image: seconds,
bytes uploaded, layer blobs sent, and the layer bytes sent (the target: 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import flow
from orchestrator.build import images
from orchestrator.build.plan import BuildPlan
from orchestrator.build.render import render_all
from orchestrator.project import spec
from scratch_registry import scratch_project  # noqa: E402


def build_cuda_libs(pf: Path, backends: list[str], platforms: list[str] | None) -> tuple[float, list]:
    project = spec.load(pf)
    full = flow.plan(project, backends, None, platforms)
    plan = BuildPlan(project, tuple(i for i in full.images if i.kind == "cuda-libs"))
    started = time.monotonic()
    results = images.build(project, plan, render_all(full), log=lambda *_: None)
    return time.monotonic() - started, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="cuda,cuda13")
    ap.add_argument("--platforms", default="", help="comma list (default: every platform the backends build)")
    ap.add_argument("--source", default=None, help="another project to copy (tests/fixtures/mini: a quick try)")
    ap.add_argument("--out", default="bench/out/second_project.json")
    args = ap.parse_args()
    backends = args.backends.split(",")
    platforms = [p for p in args.platforms.split(",") if p] or None
    source = Path(args.source) if args.source else None
    run = uuid.uuid4().hex[:6]
    out: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "backends": backends,
                 "project": args.source or "project.yaml"}
    with tempfile.TemporaryDirectory(prefix="orch-bench-second-") as tmp:
        for which in ("first", "second"):
            pf = scratch_project(str(Path(tmp) / which), f"bench-{which}-{run}", source)
            seconds, results = build_cuda_libs(pf, backends, platforms)
            rows = []
            for r in results:
                layer_bytes = r.uploaded_bytes - (len(r.assembled.config) + len(r.assembled.manifest())
                                                  if r.built else 0)
                rows.append({"image": f"{r.image.key}/{r.image.backend.name} {r.image.platform}",
                             "layers": len(r.assembled.layers), "layer_blobs_sent": r.pushed_layers,
                             "uploaded_bytes": r.uploaded_bytes, "layer_bytes_sent": layer_bytes,
                             "seconds": round(r.seconds, 1)})
                print(f"{which}: {rows[-1]['image']}: {r.pushed_layers} of {len(r.assembled.layers)} layer blobs "
                      f"sent, {layer_bytes:,} B of layers, {r.uploaded_bytes:,} B in all", flush=True)
            out[which] = {"namespace": f"bench-{which}-{run}", "seconds": round(seconds, 1), "images": rows,
                          "layer_bytes_sent": sum(x["layer_bytes_sent"] for x in rows)}
    out["target_met"] = out["second"]["layer_bytes_sent"] == 0
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: (v if k not in ("first", "second") else {"seconds": v["seconds"],
                                                                   "layer_bytes_sent": v["layer_bytes_sent"]})
                      for k, v in out.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
