"""Are image digests a function of the inputs alone? Two cold builds, two registries, two bootstraps.

Usage: .venv/bin/python bench/reproducible.py [--project project.yaml] [--backend cuda] [--service tts]
                                               [--bootstraps linux/amd64] [--out bench/out/reproducible.json]

Cold build 1: its own empty cache dir (ORCH_CACHE_DIR: blob cache and uv's
wheel cache, so uv downloads and installs every wheel again, and the tool
writes every Python layer again), BuildKit cache pruned (the app stage),
pushed to the project registry. Cold build 2: another empty cache dir,
BuildKit cache pruned again, pushed to a second, fresh registry
(bench/scratch_registry.py on 127.0.0.1:5055 with empty storage; the base
is copied there, not bootstrapped). Then the base is bootstrapped twice from
scratch with mmdebstrap. Every layer, config, manifest and index digest is
compared.
Warning: `docker builder prune -af` empties the whole BuildKit cache of the
engine (other users' too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import flow
from orchestrator.debian import bootstrap as bootstrap_mod  # noqa: E402
from orchestrator.oci import image
from orchestrator.oci import layers
from orchestrator.project import spec
from scratch_registry import scratch_registry  # noqa: E402

SECOND_PORT = 5055


def cold_build(project_file: str, registry: str, backend: str, service: str) -> dict:
    subprocess.run(["docker", "builder", "prune", "-af"], check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory(prefix="orch-cold-cache-") as cache:
        os.environ["ORCH_CACHE_DIR"] = cache
        os.environ["ORCH_REGISTRY"] = registry
        project = spec.load(project_file)
        started = time.monotonic()
        results = flow.build(project, [backend], [service], ["linux/amd64"], log=lambda *_: None, force=True)
        took = time.monotonic() - started
    out = {"seconds": round(took), "registry": registry, "images": {}}
    for r in results:
        out["images"][r.image.key] = {"manifest": r.digest, "config": r.assembled.config_digest,
                                      "layers": [x.digest for x in r.assembled.layers],
                                      "diff_ids": [x.diff_id for x in r.assembled.layers]}
    svc = [r for r in results if r.image.kind == "service"]
    out["index"] = image.digest_of(image.index([(r.image.platform, r.assembled) for r in svc]))
    return out


def bootstraps(project_file: str, platforms: list[str]) -> dict:
    project = spec.load(project_file)
    out = {}
    for platform in platforms:
        runs = []
        for _ in range(2):
            with tempfile.TemporaryDirectory(prefix="orch-boot-cache-") as cache:
                started = time.monotonic()
                img, packages = bootstrap_mod.bootstrap(project, platform, layers.BlobCache(Path(cache)), log=lambda *_: None)
                runs.append({"seconds": round(time.monotonic() - started), "config": img.config_digest,
                             "manifest": img.digest, "layer": img.layers[0].digest, "packages": len(packages)})
        out[platform] = {"runs": runs, "identical": runs[0]["manifest"] == runs[1]["manifest"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default="project.yaml")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--service", default="tts")
    ap.add_argument("--bootstraps", default="linux/amd64", help="comma list; arm64 takes minutes under QEMU")
    ap.add_argument("--out", default="bench/out/reproducible.json")
    args = ap.parse_args()
    first_registry = spec.load(args.project).registry
    with scratch_registry(SECOND_PORT) as second:
        one = cold_build(args.project, first_registry, args.backend, args.service)
        two = cold_build(args.project, second, args.backend, args.service)
    os.environ.pop("ORCH_REGISTRY", None)
    boots = bootstraps(args.project, [p for p in args.bootstraps.split(",") if p])
    same = {k: one["images"][k] == two["images"][k] for k in one["images"]}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": os.uname().machine, "cpus": os.cpu_count(),
              "cold_builds": [one, two], "identical_images": same, "identical_index": one["index"] == two["index"],
              "bootstraps": boots}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"identical_images": same, "identical_index": result["identical_index"],
                      "cold_build_seconds": [one["seconds"], two["seconds"]],
                      "bootstraps": {p: b["identical"] for p, b in boots.items()}}, indent=2))
    ok = all(same.values()) and result["identical_index"] and all(b["identical"] for b in boots.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
