"""Signing and verification: what signatures and provenance add to a publish, and what checking them costs a host.

Usage: .venv/bin/python bench/signing.py [--runs 3] [--out bench/out/signing.json]

Per run, the mini fixture (tests/fixtures/mini: 8 images, 5 indexes, 1
backend manifest) is copied under a fresh registry namespace on the local
registry, with a fresh release key it trusts, built (layers come from the
blob cache) and published with --no-smoke. Measured inside that real
publish, by timing the functions that do the work (wall time):
  release:     publish.sign_release: every image's provenance (its SLSA
               statement made, its DSSE envelope signed, attached as a
               referrer) and signature, and every index's signature, on
               publish.SIGNING_THREADS threads: 13 signatures and 8
               provenance attestations on the mini fixture;
  manifests:   orchestrator.oci.signing.sign for each backend manifest (1),
               called from the publishing thread;
and extrapolated per artifact to the example project (project.yaml: 10
variants = 10 service images + 3 CUDA-libs images, 8 indexes, 2 backend
manifests): release x (21 signatures + 13 provenance) / (13 + 8), plus
manifests x 2. Then a no-op
re-publish (seconds, bytes sent, signatures made, and the seconds spent
finding the signatures and provenance already there) and verification as hosts
do it: `select` (the backend manifest, then one variant's image and index:
flow.verify for cpu on linux/amd64) and `run` (every backend of linux/amd64),
medians of 20. The namespace is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import flow  # noqa: E402
from orchestrator.build import bases  # noqa: E402
from orchestrator.machine import daemon  # noqa: E402
from orchestrator.oci import backends, signing  # noqa: E402
from orchestrator.project import spec  # noqa: E402
from orchestrator.release import publish as publish_mod  # noqa: E402
from tests.conftest import cleanup_namespace  # noqa: E402  (the suite's own clean-up: tags, referrers, local images)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = {"signatures": 23, "provenance": 13}  # 13 images + 8 indexes + 2 backend manifests; 13 images


def mini_copy(tmp: Path, name: str) -> spec.Project:
    """tests/fixtures/mini under its own namespace, trusting a fresh key (tmp/release.pub), bases pinned, locked."""
    work = tmp / "mini"
    shutil.copytree(ROOT / "tests" / "fixtures" / "mini", work)
    signing.write_key_pair(tmp / "release.key", work / "keys" / "release.pub")
    pf = work / "project.yaml"
    pf.write_text(pf.read_text().replace("project: orch-mini", f"project: {name}")
                  + "trust:\n  keys: [keys/release.pub]\n")
    project = spec.load(pf)
    for platform in daemon.base_platforms(project):
        bases.ensure(project, platform, log=lambda *_: None)
    flow.lock(project, log=lambda *_: None)
    return project


class Timed:
    """Wraps a module function: total seconds, calls, and calls that sent bytes (main_only: the main thread's)."""

    def __init__(self, module, attr: str, main_only: bool = False):
        self.module, self.attr, self.real = module, attr, getattr(module, attr)
        self.seconds, self.calls, self.sent = 0.0, 0, 0
        self.main_only = main_only

    def __enter__(self):
        def wrapper(*args, **kwargs):
            if self.main_only and threading.current_thread() is not threading.main_thread():
                return self.real(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                out = self.real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
            sent = out[1] if isinstance(out, tuple) else out
            self.sent += bool(sent)
            return out

        setattr(self.module, self.attr, wrapper)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.attr, self.real)


def median_seconds(fn, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def one_run() -> dict:
    with tempfile.TemporaryDirectory(prefix="orch-bench-signing-") as tmp:
        project = mini_copy(Path(tmp), f"bench-sign-{uuid.uuid4().hex[:8]}")
        try:
            signer = signing.signer_from_file(Path(tmp) / "release.key")
            flow.build(project, log=lambda *_: None)  # not timed: layers from the cache, pushed by content tag
            t0 = time.perf_counter()
            with Timed(signing, "sign", main_only=True) as manifests, Timed(publish_mod, "sign_release") as release:
                first = flow.publish(project, log=lambda *_: None, smoke=False, signer=signer)
            publish_seconds = time.perf_counter() - t0
            images = len(first.provenance)
            indexes = first.signatures - images - manifests.calls
            t0 = time.perf_counter()
            with Timed(signing, "sign", main_only=True) as m2, Timed(publish_mod, "sign_release") as r2:
                again = flow.publish(project, log=lambda *_: None, smoke=False, signer=signer)
            noop_seconds = time.perf_counter() - t0
            noop_checks = r2.seconds + m2.seconds  # finding every signature and provenance already there
            ref = f"{project.repository('echo')}:{backends.artifact_tag(project.services['echo'].version)}"
            data, digest = backends.fetch_artifact(ref)
            platform = "linux/amd64"
            all_backends = sorted(data["platforms"][platform]["backends"])
            select_s = median_seconds(lambda: flow.verify(project, data, ref, ref, digest, platform, ["cpu"]))
            run_s = median_seconds(lambda: flow.verify(project, data, ref, ref, digest, platform, all_backends))
        finally:
            cleanup_namespace(project)
    units = (images + indexes) + images  # signatures and provenance attestations in sign_release
    example_units = (EXAMPLE["signatures"] - 2) + EXAMPLE["provenance"]
    per_manifest = manifests.seconds / manifests.calls
    return {"publish_seconds": round(publish_seconds, 2), "signatures_made": first.signatures,
            "images": images, "indexes": indexes, "backend_manifests": manifests.calls,
            "release_seconds": round(release.seconds, 3), "manifest_seconds": round(manifests.seconds, 3),
            "signing_seconds": round(release.seconds + manifests.seconds, 3),
            "example_extrapolated_seconds": round(release.seconds * example_units / units + 2 * per_manifest, 2),
            "noop_publish_seconds": round(noop_seconds, 2), "noop_uploaded_bytes": again.uploaded_bytes,
            "noop_signature_checks_seconds": round(noop_checks, 3),
            "noop_signatures_made": again.signatures,
            "verify_select_ms": round(select_s * 1000, 1), "verify_run_ms": round(run_s * 1000, 1),
            "run_backends": all_backends}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="bench/out/signing.json")
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        runs.append(one_run())
        r = runs[-1]
        print(f"run {i + 1}: {r['signatures_made']} signatures and {r['images']} provenance attestations in "
              f"{r['signing_seconds']} s; example ~{r['example_extrapolated_seconds']} s; no-op publish "
              f"{r['noop_publish_seconds']} s, {r['noop_uploaded_bytes']} bytes; verify select "
              f"{r['verify_select_ms']} ms, run {r['verify_run_ms']} ms", flush=True)
    keys = ("signing_seconds", "example_extrapolated_seconds", "noop_publish_seconds", "noop_signature_checks_seconds",
            "noop_uploaded_bytes", "verify_select_ms", "verify_run_ms")
    result = {"date": time.strftime("%Y-%m-%d"), "machine": os.uname().machine, "cpus": os.cpu_count(),
              "registry": "Debian docker-registry 2.8 on 127.0.0.1:5000 (no referrers API: the tag schema)",
              "example": EXAMPLE, "signing_threads": publish_mod.SIGNING_THREADS, "runs": runs,
              "median": {k: statistics.median(r[k] for r in runs) for k in keys}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
