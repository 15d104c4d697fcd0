"""No-op and app-only rebuild + publish of every variant of the example project.

Usage: .venv/bin/python bench/rebuild_all.py [--out bench/out/rebuild_all.json]

Copies the project under its own namespace (`bench-rebuild`), publishes it
once (build, smoke, promote), then times:
  no-op:     `publish` again with nothing changed (content tags found, smoke
             skipped for digests the promoted release already passed, 0 bytes);
  app-only:  one line added to every service's app, then `publish` (the app
             layers rebuilt, the new digests smoke-tested, promoted); the
             smoke part is reported on its own, and the bytes uploaded.
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

from scratch_registry import scratch_project  # noqa: E402
from orchestrator import flow
from orchestrator.release import smoke
from orchestrator.project import spec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out/rebuild_all.json")
    args = ap.parse_args()
    quiet = lambda *_: None  # noqa: E731
    out: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="orch-bench-rebuild-") as tmp:
        pf = scratch_project(tmp, "bench-rebuild")
        project = spec.load(pf)
        started = time.monotonic()
        flow.publish(project, log=quiet)
        out["first_publish_seconds"] = round(time.monotonic() - started, 1)

        started = time.monotonic()
        noop = flow.publish(project, log=quiet)
        out["noop"] = {"seconds": round(time.monotonic() - started, 1), "uploaded_bytes": noop.uploaded_bytes}

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
        started = time.monotonic()
        app_only = flow.publish(project, log=quiet)
        total = time.monotonic() - started
        smoke.run = real_run
        out["app_only"] = {"seconds": round(total, 1), "smoke_seconds": round(sum(smoke_seconds), 1),
                           "build_and_promote_seconds": round(total - sum(smoke_seconds), 1),
                           "uploaded_bytes": app_only.uploaded_bytes,
                           "variants_smoked": len(app_only.smoke)}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
