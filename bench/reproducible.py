"""Is a layer a function of its lock alone? Build, prune BuildKit's cache, rebuild, compare.

Usage: .venv/bin/python bench/reproducible.py [--project project.yaml] [--backend cuda] [--service tts]
Warning: `docker builder prune -af` empties the whole BuildKit cache (pip's
download cache mount included), so the next builds download again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import build, engine, spec  # noqa: E402


def layers(ref: str) -> list[str]:
    return engine.docker_client().images.get(ref).attrs["RootFS"]["Layers"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", default="project.yaml")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--service", default="tts")
    args = ap.parse_args()
    project = spec.load(args.project)
    quiet = lambda *_: None  # noqa: E731
    first = build.build(project, [args.backend], [args.service], ["linux/amd64"], log=quiet)
    before = {r.image.key: layers(r.image.ref(r.content_tag)) for r in first}
    subprocess.run(["docker", "builder", "prune", "-af"], check=True, stdout=subprocess.DEVNULL)
    started = time.monotonic()
    second = build.build(project, [args.backend], [args.service], ["linux/amd64"], log=quiet, force=True)
    after = {r.image.key: layers(r.image.ref(r.content_tag)) for r in second}
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "cold_rebuild_seconds": round(time.monotonic() - started),
                      "identical": before == after,
                      "images": {k: {"before": before[k], "after": after[k]} for k in before}}, indent=2))
    return 0 if before == after else 1


if __name__ == "__main__":
    sys.exit(main())
