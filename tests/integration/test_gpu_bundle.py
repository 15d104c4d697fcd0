"""bench/gpu_bundle.py against the registry, and bench/gpu_check.py with what it took out.

The mini fixture's CUDA-libs images hold the real libcudart of each line
(nvidia-cuda-runtime-cu12 12.4, nvidia-cuda-runtime 13.0). The bundle must
hold exactly those files, by digest, and the promoted backend manifests as
the registry serves them; the GPU check then loads each one on this
machine (no GPU, no driver) the way it will on a GPU host.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from orchestrator.oci import backends

from ..conftest import ROOT

pytestmark = pytest.mark.engine

ELF_MACHINE = {"linux/amd64": 62, "linux/arm64": 183}  # EM_X86_64, EM_AARCH64


def test_a_bundle_holds_each_lines_published_libcudart_and_the_check_loads_it_here(mini_project, published, tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bundle.py"), "--project", str(mini_project.file),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    print(proc.stderr)
    assert proc.returncode == 0, proc.stderr
    made = json.loads((out / "bundle.json").read_text())
    manifest = backends.fetch_manifest(f"{mini_project.repository('echo')}:0.1.0-backends")
    assert (out / "manifests" / "echo.backends.json").read_bytes() == backends.manifest_bytes(manifest)
    lines = {(x["backend"], x["platform"]): x for x in made["lines"]}
    assert set(lines) == {("cuda13", "linux/amd64"), ("cuda13", "linux/arm64"), ("cuda", "linux/amd64")}
    for (backend, platform), x in lines.items():
        data = (out / x["file"]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == x["sha256"]
        assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == ELF_MACHINE[platform]
        spec = manifest["platforms"][platform]["backends"][backend]
        assert x["cuda_libs"]["image"].endswith("@" + spec["cuda_libs"]["digest"])  # the promoted CUDA-libs image
        assert x["path_in_image"].endswith("libcudart.so.13" if backend == "cuda13" else "libcudart.so.12")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 5_000_000, size  # a few MB to carry to the GPU host

    report_file = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(out), "--out", str(report_file)],
                          capture_output=True, text=True, timeout=600)
    print(proc.stderr)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_file.read_text())
    by = {(x["backend"], x["platform"]): x for x in report["lines"]}
    for backend, version in (("cuda13", 13000), ("cuda", 12040)):
        x = by[(backend, "linux/amd64")]
        assert x["probe"]["runtime"] == {"loaded": True, "path": str((out / x["file"]).resolve()), "version": version}
        assert x["probe"]["usable"] is False and "libcuda.so.1 not found" in x["probe"]["reason"]
        # The real libcudart without a driver: "CUDA driver version is insufficient" (35), as measured before.
        assert x["cudart"]["device_count_rc"] == 35, x["cudart"]
    assert "skipped" in by[("cuda13", "linux/arm64")]
    assert report["selection"]["services"]["echo"]["chosen"] == "cpu"
