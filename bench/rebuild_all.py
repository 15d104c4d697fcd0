"""No-op and app-only rebuild + publish of every variant of the example project, with where the time goes.

Usage: .venv/bin/python bench/rebuild_all.py [--out bench/out/rebuild_all.json] [--keep-gb N]

Copies the project under its own namespace (`bench-rebuild`), publishes it
once (build, smoke, promote), then times:
  no-op:     `publish` again with nothing changed (content tags found, smoke
             skipped for digests the promoted release already passed, 0 bytes);
  app-only:  one line added to every service's app, then `publish` (the app
             layers rebuilt, the new digests smoke-tested, promoted); the
             smoke part is reported on its own, and the bytes uploaded;
             --runs times (3), the median reported.
Each publish records its phases (orchestrator.common.meter: build, export,
compress, hash, upload, smoke, promote; seconds and bytes) and the floor;
the app-only smoke also records, per variant, the "image" check line (how
many layers were loaded into the engine: after the first publish, only the
app layer should travel). --keep-gb sets ORCH_SMOKE_KEEP_GB (smoke's disk
budget in the engine; the default, 24 GB, should hold the example's 10
variants, so the app-only publish loads no CUDA or torch layer again).
Target (issue 21): the app-only publish of all 10 variants under 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu_use import cpu_busy_seconds  # noqa: E402
from scratch_registry import scratch_project  # noqa: E402
from orchestrator import flow
from orchestrator.machine import daemon, kept
from orchestrator.release import smoke
from orchestrator.project import spec


def phases(report) -> dict:
    if report.timings is None:
        return {}
    for line in report.timings.lines():
        print(line, flush=True)
    return report.timings.as_json()


def image_lines(report) -> list[str]:
    return [f"{r.variant.service}/{r.variant.backend} {r.variant.platform}: {c.detail}"
            for r in report.smoke for c in r.checks if c.name == "image"]


def app_only_run(project, quiet) -> dict:
    """One line added to every service's app, then `publish`: its seconds, smoke's part, bytes, per variant."""
    for svc in project.services.values():
        app = svc.path / "app.py"
        app.write_text(app.read_text() + f"\n# bench: app-only change {time.time()}\n")
    smoke_seconds = []
    real_run = smoke.run

    def timed_run(*a, **kw):
        t = time.monotonic()
        try:
            return real_run(*a, **kw)
        finally:
            smoke_seconds.append(time.monotonic() - t)

    smoke.run = timed_run
    busy = cpu_busy_seconds()
    started = time.monotonic()
    try:
        report = flow.publish(project, log=quiet)
    finally:
        smoke.run = real_run
    total = time.monotonic() - started
    busy = cpu_busy_seconds() - busy
    label = lambda r: f"{r.variant.service}/{r.variant.backend} {r.variant.platform}"  # noqa: E731
    return {"seconds": round(total, 1), "smoke_seconds": round(sum(smoke_seconds), 1),
            "build_and_promote_seconds": round(total - sum(smoke_seconds), 1),
            "uploaded_bytes": report.uploaded_bytes,
            "variants_smoked": len(report.smoke),
            "smoke_per_variant_seconds": {label(r): round(r.seconds, 1) for r in report.smoke},
            "image_check_lines": image_lines(report),
            "bytecode_cache": {label(r): r.bytecode for r in report.smoke},
            # Every process on the machine (the engine, QEMU, the services), from /proc/stat: how much of
            # the cores the publish kept busy, so whether less work or more overlap would make it faster.
            "machine_cpu_busy_seconds": round(busy, 1),
            "machine_cpu_busy_fraction": round(busy / (total * os.cpu_count()), 3),
            "phases": phases(report)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out/rebuild_all.json")
    ap.add_argument("--keep-gb", type=float, default=None, help="ORCH_SMOKE_KEEP_GB for the runs")
    ap.add_argument("--runs", type=int, default=3, help="app-only publishes to take the median of")
    ap.add_argument("--source", default=None, help="another project to copy (tests/fixtures/mini: a quick try)")
    args = ap.parse_args()
    if args.keep_gb is not None:
        os.environ["ORCH_SMOKE_KEEP_GB"] = f"{args.keep_gb:g}"
    quiet = lambda *_: None  # noqa: E731
    out: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "smoke_budget": kept.budget()[1],
                 "project": args.source or "project.yaml"}
    with tempfile.TemporaryDirectory(prefix="orch-bench-rebuild-") as tmp:
        pf = scratch_project(tmp, "bench-rebuild" + ("-" + Path(args.source).name if args.source else ""),
                             Path(args.source) if args.source else None)
        project = spec.load(pf)
        started = time.monotonic()
        first = flow.publish(project, log=quiet)
        out["first_publish_seconds"] = round(time.monotonic() - started, 1)
        out["first_publish_phases"] = phases(first)
        print(f"first publish: {out['first_publish_seconds']} s", flush=True)

        started = time.monotonic()
        noop = flow.publish(project, log=quiet)
        out["noop"] = {"seconds": round(time.monotonic() - started, 1), "uploaded_bytes": noop.uploaded_bytes,
                       "phases": phases(noop)}
        print(f"no-op publish: {out['noop']['seconds']} s, {noop.uploaded_bytes:,} B", flush=True)

        runs = []
        for n in range(args.runs):
            runs.append(app_only_run(project, quiet))
            print(f"app-only publish {n + 1}/{args.runs}: {runs[-1]['seconds']} s "
                  f"(smoke {runs[-1]['smoke_seconds']} s)", flush=True)
        median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        out["app_only_runs_seconds"] = [r["seconds"] for r in runs]
        out["app_only"] = {**median, "median_of": len(runs), "target_under_30_s": median["seconds"] < 30}
        engine = kept.engine_key(daemon.docker_client())
        used, count, words = kept.summary(engine)
        out["smoke_kept"] = {"bytes": used, "images": count, "budget": words}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if "phases" not in k}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
