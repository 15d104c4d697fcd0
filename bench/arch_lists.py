"""The GPU architectures each CUDA build of torch carries, measured in the built images.

Method: for every CUDA backend with torch in the project and every platform
it is built for, take the image `invoke build` made (a no-op when it is in
the registry), start it with the entrypoint bypassed and ask torch for
`torch._C._cuda_getArchFlags()`: the list `torch.cuda.get_arch_list()`
returns on a GPU host (that one returns [] where no GPU is visible). arm64
images run under QEMU (where the compat data says that torch build crashes
under QEMU, the row says so and is not measured). Compares each list with the compatibility data
(orchestrator/data/compat.yaml, `archs`) and exits 1 on a difference.

Usage: .venv/bin/python bench/arch_lists.py [--project project.yaml] > bench/out/arch_lists.json
Needs `invoke engine.up` first.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator import flow
from orchestrator.project import compat as compat_mod
from orchestrator.machine import daemon
from orchestrator.project import spec

PROBE = ("import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
         "'archs': torch._C._cuda_getArchFlags().split()}))")


LIB = "/opt/site/torch/torch/lib/libtorch_python.so"
ARCH_STRING = re.compile(rb"(?:(?:sm|compute)_[0-9]+[a-z]? )+(?:sm|compute)_[0-9]+[a-z]?")


def archs_from_library(client, ref: str, platform: str) -> list[str]:
    """The arch list compiled into torch (the literal behind torch._C._cuda_getArchFlags()), without running it."""
    repo, digest = ref.split("@")
    client.api.pull(repo, tag=digest, platform=platform)
    container = client.containers.create(ref, platform=platform)
    try:
        stream, _ = container.get_archive(LIB)
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            data = tar.extractfile(tar.getmembers()[0]).read()
    finally:
        container.remove(force=True)
    found = ARCH_STRING.findall(data)
    return max(found, key=len).decode().split() if found else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", default=str(ROOT / "project.yaml"))
    args = ap.parse_args()
    project = spec.load(args.project)
    compat = compat_mod.load()
    wanted = [b.name for b in project.backends.values() if b.is_cuda and any(t for _, t in b.torch_by_platform)]
    results = flow.build(project, backends=wanted, log=lambda *_: None)
    client = daemon.docker_client()
    rows, ok = [], True
    for r in results:
        if r.image.kind != "service" or r.image.service.name != next(iter(project.services)):
            continue  # one service per (backend, platform): the torch layer is shared
        backend, platform = r.image.backend, r.image.platform
        ref = f"{r.image.repository}@{r.digest}"
        blocker = compat.emulation_blocker(backend.torch_for(platform), platform)
        if blocker and platform != daemon.host_platform():
            # torch cannot run here: read the string _cuda_getArchFlags() returns out of libtorch_python.so.
            expected = list(compat.archs(backend.torch_for(platform), backend.cuda, platform))
            found = archs_from_library(client, ref, platform)
            same = found == expected
            ok &= same
            rows.append({"backend": backend.name, "platform": platform, "image": ref, "archs": found,
                         "method": "libtorch_python.so arch-flags string (" + blocker + ")",
                         "compat": expected, "matches_compat": same})
            print(f"{backend.name} {platform}: {' '.join(found)} from libtorch_python.so "
                  f"({'matches' if same else 'DIFFERS from'} compat.yaml; torch cannot run under QEMU here)", file=sys.stderr)
            continue
        started = time.monotonic()
        repo, digest = ref.split("@")
        # The low-level pull: docker-py's images.pull() looks the foreign-arch image up by digest afterwards,
        # which Docker 20.10 does not answer.
        client.api.pull(repo, tag=digest, platform=platform)
        out = client.containers.run(ref, ["-c", PROBE], entrypoint="python3", platform=platform,
                                    remove=True, stderr=False).decode().strip().splitlines()[-1]
        measured = json.loads(out)
        expected = list(compat.archs(backend.torch_for(platform), backend.cuda, platform))
        same = measured["archs"] == expected
        ok &= same
        rows.append({"backend": backend.name, "platform": platform, "image": ref, **measured,
                     "compat": expected, "matches_compat": same, "seconds": round(time.monotonic() - started, 1)})
        print(f"{backend.name} {platform}: torch {measured['torch']} CUDA {measured['cuda']}: "
              f"{' '.join(measured['archs'])} ({'matches' if same else 'DIFFERS from'} compat.yaml)", file=sys.stderr)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "project": project.name, "builds": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
