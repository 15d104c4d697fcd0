"""Bytes sent and pulled after a change to one service's Debian packages (system_packages).

Method (as bench/pull_bytes.py): the example project copied under its own
registry namespace, the cuda `tts` image built, then a change to tts's
`system_packages`, `invoke lock` (the apt locks) and a rebuild. Counted per
change: what the registry received (the build's upload count: blobs,
config, manifest) and what a host that has the previous image pulls (the
compressed layers it lacks, plus the config), and which layers those are.

Changes: (f1) tts gains `system_packages: [espeak-ng]` (a new system-tts
layer), (f2) it becomes [espeak-ng, sox] (the same layer, re-resolved).

Usage: .venv/bin/python bench/system_packages_bytes.py > bench/out/system_packages_bytes.json
Needs `invoke engine.up` and the Debian archive (deb.debian.org). A few minutes: the first build
uploads the 3.25 GB image into the scratch namespace.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratch_registry import scratch_project  # noqa: E402
from orchestrator.build.result import BuildResult
from orchestrator import flow
from orchestrator.project import spec
from orchestrator.oci.registry import Registry, split_ref  # noqa: E402


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build_tts(project) -> tuple[BuildResult, int, float]:
    stats: dict = {}
    started = time.monotonic()
    results = flow.build(project, backends=["cuda"], services=["tts"], log=lambda *_: None, stats=stats)
    return next(r for r in results if r.image.key == "tts"), stats["uploaded_bytes"], time.monotonic() - started


def new_layers(reg: Registry, old: BuildResult, new: BuildResult) -> list[dict]:
    """The layers of new that old lacks: what `docker pull` downloads, named by the config's history."""
    _, name, digest = split_ref(new.ref)
    manifest = reg.get_manifest(name, digest).json
    history = [h["created_by"] for h in json.loads(new.assembled.config)["history"]]
    have = {x.digest for x in old.assembled.layers}
    return [{"layer": h.split(" (")[0].removeprefix("orchestrator: ").removesuffix(" layer"),
             "digest": x["digest"], "bytes": x["size"]}
            for h, x in zip(history, manifest["layers"]) if x["digest"] not in have]


def drop_namespace(reg: Registry, project) -> None:
    """Delete the run's manifests (the blobs stay: the registry shares them with the example's)."""
    for repo in ("cuda-libs", "tts"):
        name = f"{project.name}/{repo}"
        for digest in {m.digest for tag in reg.tags(name) if (m := reg.get_manifest(name, tag))}:
            reg.delete_manifest(name, digest)


def main() -> int:
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {os.uname().machine}"}
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        # A namespace of its own each run: a content tag found from an earlier run would send 0 bytes.
        pf = scratch_project(tmp, f"bench-apt-{uuid.uuid4().hex[:8]}")
        project = spec.load(pf)
        reg = Registry(project.registry)
        say("baseline build of tts (cuda)")
        prev, sent, secs = build_tts(project)
        out["baseline"] = {"registry_received_bytes": sent, "build_seconds": round(secs, 1),
                           "image_bytes": sum(x.blob_size for x in prev.assembled.layers)}
        changes = (("f1_add_espeak_ng", "[espeak-ng]", "    port: 8000\n  stt:",
                    "    port: 8000\n    system_packages: [espeak-ng]\n  stt:"),
                   ("f2_add_sox", "[espeak-ng, sox]", "system_packages: [espeak-ng]\n",
                    "system_packages: [espeak-ng, sox]\n"))
        for key, packages, old, new_text in changes:
            say(f"({key}) tts system_packages: {packages}")
            text = pf.read_text()
            assert text.count(old) == 1, f"the example project changed shape: {old!r}"
            pf.write_text(text.replace(old, new_text))
            project = spec.load(pf)
            t = time.monotonic()
            flow.lock(project, log=lambda *_: None)
            lock_secs = time.monotonic() - t
            new, sent, secs = build_tts(project)
            layers = new_layers(reg, prev, new)
            out[key] = {"system_packages": packages, "registry_received_bytes": sent,
                        "pull_bytes": len(new.assembled.config) + sum(x["bytes"] for x in layers),
                        "new_layers": layers, "lock_seconds": round(lock_secs, 1), "build_seconds": round(secs, 1),
                        "layers_in_image": len(new.assembled.layers)}
            prev = new
        drop_namespace(reg, project)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
