"""Cold publish of one image: this tool's push path against `docker push`, same image, same registry, same run.

Usage: .venv/bin/python bench/publish_speed.py [--project project.yaml] [--backend cuda] [--service tts]
                                                [--runs 3] [--out bench/out/publish_speed.json]

The image (the cuda `tts` image by default, with its CUDA-libs layers) is
built once so every layer stage sits in BuildKit's cache. Then, per run, in
a fresh registry (bench/scratch_registry.py) so neither side can skip or
mount a blob:
  tool:        an empty blob cache and a fresh repository namespace: every
               layer is exported from BuildKit, normalized, compressed
               (multi-member gzip, ISA-L, all cores) and uploaded;
  docker push: the same image, loaded into the engine (docker pull), tagged
               into a fresh repository and pushed with `docker push`, which
               compresses every layer with Go's gzip on one core.
Bytes are the compressed layer sizes each manifest lists. Medians over the
runs; the ratio is taken within each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import flow
from orchestrator.machine import daemon
from orchestrator.project import spec
from orchestrator.oci.registry import Registry, split_ref  # noqa: E402
from scratch_registry import scratch_registry  # noqa: E402


def manifest_bytes(reg: Registry, name: str, ref: str) -> int:
    m = reg.get_manifest(name, ref).json
    return m["config"]["size"] + sum(x["size"] for x in m["layers"])


def tool_run(project_file: str, backend: str, service: str, registry: str) -> dict:
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="orch-bench-cache-") as cache:
        os.environ["ORCH_CACHE_DIR"] = cache
        project = dataclasses.replace(spec.load(project_file), name=ns, registry=registry)
        started = time.monotonic()
        results = flow.build(project, [backend], [service], ["linux/amd64"], log=lambda *_: None)
        took = time.monotonic() - started
    svc = next(r for r in results if r.image.kind == "service")
    reg = Registry(project.registry)
    _, name, _ = split_ref(svc.ref)
    return {"seconds": round(took, 1), "uploaded_bytes": sum(r.uploaded_bytes for r in results),
            "image_bytes": manifest_bytes(reg, name, svc.digest), "ref": svc.ref, "namespace": ns}


def docker_push_run(local_ref: str, registry: str, service: str) -> dict:
    target = f"{registry}/bench-docker-{uuid.uuid4().hex[:8]}/{service}:push"
    subprocess.run(["docker", "tag", local_ref, target], check=True)
    started = time.monotonic()
    subprocess.run(["docker", "push", target], check=True, stdout=subprocess.DEVNULL)
    took = time.monotonic() - started
    host, name, tag = split_ref(target)
    size = manifest_bytes(Registry(host), name, tag)
    subprocess.run(["docker", "rmi", target], check=False, stdout=subprocess.DEVNULL)
    return {"seconds": round(took, 1), "image_bytes": size, "ref": target}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default="project.yaml")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--service", default="tts")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/out/publish_speed.json")
    args = ap.parse_args()
    project = spec.load(args.project)
    warm = flow.build(project, [args.backend], [args.service], ["linux/amd64"], log=lambda *_: None)
    ref = next(r.ref for r in warm if r.image.kind == "service")
    daemon.docker_client().images.pull(ref)  # the same image in the engine, for docker push
    runs = []
    for i in range(args.runs):
        # Fresh registries: neither side can skip or mount a blob (docker knows the digests it pulled
        # from the project registry, so it pushes to one it has never seen).
        with scratch_registry(5060 + 2 * i) as tool_reg, scratch_registry(5061 + 2 * i) as docker_reg:
            tool = tool_run(args.project, args.backend, args.service, tool_reg)
            docker = docker_push_run(ref, docker_reg, args.service)
            runs.append({"tool": tool, "docker_push": docker,
                         "speedup": round(docker["seconds"] / tool["seconds"], 1)})
            print(f"run {i + 1}: tool {tool['seconds']} s, {tool['image_bytes']:,} B; docker push {docker['seconds']} s, "
                  f"{docker['image_bytes']:,} B; {runs[-1]['speedup']}x", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": os.uname().machine, "cpus": os.cpu_count(),
              "image": f"{args.service}/{args.backend} linux/amd64", "runs": runs,
              "median": {"tool_seconds": statistics.median(r["tool"]["seconds"] for r in runs),
                         "docker_push_seconds": statistics.median(r["docker_push"]["seconds"] for r in runs),
                         "speedup": statistics.median(r["speedup"] for r in runs),
                         "tool_bytes": statistics.median(r["tool"]["image_bytes"] for r in runs),
                         "docker_push_bytes": statistics.median(r["docker_push"]["image_bytes"] for r in runs)}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
