"""bench/gpu_check.py, the first run on a GPU host, against stand-ins so every code path runs here.

The NVIDIA libraries are small gcc-built stand-ins (tests/gpu_standins.py)
that report the GPUs the environment names; torch is a stand-in package.
The script runs as it would on the GPU host: a file, in processes of its
own, with a bundle of libcudart files and backend manifests. Checked: the
GPU report (NVML, else libcuda), each line's libcudart through the
entrypoint's own probe and asked itself, arch support per GPU, selection
replayed against the manifests (or said not to be, where the tool's
dependencies are missing, and replayed later with --replay), and torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .. import gpu_standins
from ..conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"
DIGEST = "sha256:" + "b" * 64
ARCHS_124 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
ARCHS_130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
H100 = "NVIDIA H100 80GB HBM3=9.0"
RTX5090 = "NVIDIA GeForce RTX 5090=12.0"

FAKE_TORCH = '''
import os
__version__ = os.environ.get("FAKE_TORCH_VERSION", "2.13.0+cu130")


class version:
    cuda = os.environ.get("FAKE_TORCH_CUDA", "13.0")


class Tensor:
    def __init__(self, rows, device="cpu"):
        self.rows, self.device = rows, device

    def to(self, device):
        return Tensor(self.rows, device)

    def cpu(self):
        return Tensor(self.rows, "cpu")

    def __matmul__(self, other):
        cols = list(zip(*other.rows))
        out = [[sum(a * b for a, b in zip(r, c)) for c in cols] for r in self.rows]
        if self.device == "cuda" and os.environ.get("FAKE_TORCH_BROKEN_GPU"):
            out[0][0] += 1.0
        return Tensor(out, self.device)

    def __sub__(self, other):
        return Tensor([[a - b for a, b in zip(r, s)] for r, s in zip(self.rows, other.rows)], self.device)

    def abs(self):
        return Tensor([[abs(a) for a in r] for r in self.rows], self.device)

    def max(self):
        return Tensor([[max(max(r) for r in self.rows)]], self.device)

    def item(self):
        return self.rows[0][0]


_seed = [1]


def manual_seed(n):
    _seed[0] = n + 1


def randn(n, m):
    out = []
    for i in range(n):
        row = []
        for j in range(m):
            _seed[0] = (_seed[0] * 1103515245 + 12345) % 2 ** 31
            row.append(_seed[0] / 2 ** 30 - 1.0)
        out.append(row)
    return Tensor(out)


class _Cuda:
    def is_available(self):
        return bool(os.environ.get("FAKE_TORCH_GPU"))

    def get_arch_list(self):
        return os.environ.get("FAKE_TORCH_ARCHS", "").split()

    def device_count(self):
        return 1

    def get_device_name(self, i):
        return "NVIDIA H100 80GB HBM3"

    def get_device_capability(self, i):
        return (9, 0)

    def synchronize(self):
        pass


cuda = _Cuda()
'''


def sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def manifest() -> dict:
    """echo's published manifest: cuda13 and cuda (12.4) and cpu on amd64, cuda13 and cpu on arm64."""
    repo = "127.0.0.1:5000/orch-mini/echo"

    def cuda(line, driver, archs, tag):
        return {"image": f"{repo}@{DIGEST}", "size": 1, "torch": "2.13.0",
                "requires": {"cuda": line, "driver": driver, "archs": archs}, "cuda_libs": {"tag": tag, "digest": DIGEST}}

    cpu = {"image": f"{repo}@{'sha256:' + 'c' * 64}", "size": 1, "torch": "2.13.0"}
    return {"schemaVersion": 2, "project": "orch-mini", "service": "echo", "version": "0.1.0",
            "platforms": {"linux/amd64": {"default": "cuda13", "fallback": ["cuda13", "cuda", "cpu"], "backends": {
                "cuda13": cuda("13.0", ">=580.65.06", ARCHS_130, "cu130-v1"),
                "cuda": cuda("12.4", ">=525.60.13", ARCHS_124, "cu124-v1"), "cpu": cpu}},
                "linux/arm64": {"default": "cpu", "fallback": ["cpu"], "backends": {"cpu": cpu}}},
            "smoke": {"ran": True, "variants": 4}}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return gpu_standins.build(tmp_path_factory.mktemp("standins"))


@pytest.fixture
def bundle(tmp_path, standins):
    """What bench/gpu_bundle.py writes, with the stand-in libcudart files as the published ones."""
    d = tmp_path / "bundle"
    lines = []
    for backend, line, platform, lib, tag, archs, version, driver in [
            ("cuda13", "13.0", "linux/amd64", "cudart13", "cu130-v1", ARCHS_130, 13000, "580.65.06"),
            ("cuda", "12.4", "linux/amd64", "cudart12", "cu124-v1", ARCHS_124, 12040, "525.60.13"),
            ("cuda13", "13.0", "linux/arm64", "cudart13", "cu130-v1", ARCHS_130, 13000, "580.65.06")]:
        rel = Path("lib") / f"{tag}-{platform.split('/')[1]}" / standins[lib].name
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(standins[lib], d / rel)
        lines.append({"backend": backend, "cuda": line, "platform": platform, "file": str(rel),
                      "sha256": sha(d / rel), "runtime_version": version, "min_driver": driver, "archs": archs,
                      "cuda_libs": {"image": f"127.0.0.1:5000/orch-mini/cuda-libs@{DIGEST}", "tag": tag}})
    (d / "manifests").mkdir()
    (d / "manifests" / "echo.backends.json").write_text(json.dumps(manifest()))
    (d / "bundle.json").write_text(json.dumps({"format": 1, "made_at": "2026-12-06T00:00:00Z", "project": "orch-mini",
                                               "registry": "127.0.0.1:5000", "lines": lines,
                                               "manifests": {"echo": {"file": "manifests/echo.backends.json"}}}))
    return d


def host_root(tmp_path, driver: str | None) -> Path:
    """A host root with the driver's files: its version, a device node, libcuda where Debian puts it."""
    root = tmp_path / "host"
    root.mkdir()
    if driver:
        (root / "proc/driver/nvidia").mkdir(parents=True)
        (root / "proc/driver/nvidia/version").write_text(
            f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Tue Oct  1 00:00:00 UTC 2025\n")
        (root / "dev").mkdir()
        (root / "dev/nvidia0").write_text("")
        (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
        (root / "usr/lib/x86_64-linux-gnu/libcuda.so.1").write_text("")
    return root


def run(tmp_path, bundle, root, libs=(), torch=False, extra_path=(), **fake) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "NVIDIA_VISIBLE", "CUDA_VISIBLE"))}
    env["LD_LIBRARY_PATH"] = ":".join(str(p) for p in libs)
    paths = [str(p) for p in extra_path]
    if torch:
        (tmp_path / "torch-standin" / "torch").mkdir(parents=True, exist_ok=True)
        (tmp_path / "torch-standin" / "torch" / "__init__.py").write_text(FAKE_TORCH)
        paths.append(str(tmp_path / "torch-standin"))
    env["PYTHONPATH"] = ":".join(paths)
    env.update({k: str(v) for k, v in fake.items()})
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(bundle), "--out", str(out), "--root", str(root),
                           "--machine", "x86_64", "--matmul-size", "24", "--timeout", "60"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stderr


def line(report, backend, platform="linux/amd64") -> dict:
    return next(x for x in report["lines"] if (x["backend"], x["platform"]) == (backend, platform))


def test_an_h100_on_a_580_driver_runs_both_lines_selects_cuda13_and_torch_agrees_with_the_cpu(
        tmp_path, bundle, standins):
    report, printed = run(tmp_path, bundle, host_root(tmp_path, "580.82.07"), [standins["driver"], standins["nvml"]],
                          torch=True, FAKE_GPUS=H100, FAKE_DRIVER="580.82.07", FAKE_DRIVER_API=13000,
                          FAKE_TORCH_GPU=1, FAKE_TORCH_ARCHS=" ".join(ARCHS_130))
    gpus = report["gpus"]
    assert gpus["source"] == "nvml" and gpus["driver"] == "580.82.07"
    assert [(g["name"], g["cc"], g["sm"]) for g in gpus["gpus"]] == [("NVIDIA H100 80GB HBM3", "9.0", "sm_90")]
    cu13 = line(report, "cuda13")
    # The entrypoint's own probe with the bundled libcudart: version, the driver's device, usable.
    assert cu13["probe"]["runtime"]["version"] == 13000 and cu13["probe"]["runtime"]["path"].endswith("libcudart.so.13")
    assert cu13["probe"]["usable"] is True and cu13["probe"]["driver"]["device_count"] == 1
    # libcudart asked itself, against the (stand-in) driver.
    assert cu13["cudart"] == {"loaded": True, "driver_api": 13000, "device_count_rc": 0, "device_count": 1,
                              "devices": [{"index": 0, "cc": "9.0"}]}
    assert cu13["gpus_supported"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "cc": "9.0", "arch": "sm_90",
                                       "supported": True}]
    assert line(report, "cuda")["probe"]["usable"] is True  # Hopper is in 12.4's sm_50..sm_90 too
    assert line(report, "cuda13", "linux/arm64")["skipped"].startswith("a linux/arm64 library")
    sel = report["selection"]
    assert sel["replayed"] and sel["services"]["echo"]["chosen"] == "cuda13"
    assert sel["services"]["echo"]["reasons"][0].startswith("cuda13: default, requirements met (driver 580.82.07")
    t = report["torch"]
    assert (t["version"], t["cuda"], t["arch_list"]) == ("2.13.0+cu130", "13.0", ARCHS_130)
    assert t["matmul"]["ran"] and t["matmul"]["matches"] and t["matmul"]["size"] == 24
    assert report["host"]["driver_version"] == "580.82.07" and report["host"]["devices"] == ["/dev/nvidia0"]
    print(printed)
    assert "select echo: cuda13" in printed and "matches the CPU" in printed


def test_a_blackwell_card_on_a_570_driver_is_refused_by_both_lines_for_the_right_reasons(tmp_path, bundle, standins):
    report, printed = run(tmp_path, bundle, host_root(tmp_path, "570.86.10"), [standins["driver"]],
                          FAKE_GPUS=RTX5090, FAKE_DRIVER_API=12080)
    gpus = report["gpus"]
    assert gpus["source"] == "cuda" and gpus["driver"] is None  # no NVML: libcuda answered
    assert gpus["cuda_driver_api"] == 12080 and gpus["gpus"][0]["sm"] == "sm_120"
    cu13 = line(report, "cuda13")
    assert cu13["probe"]["usable"] is False and "supports CUDA 12.8, this image needs CUDA 13.x" in cu13["probe"]["reason"]
    assert cu13["cudart"]["device_count_rc"] == 35
    assert "insufficient for CUDA runtime version" in cu13["cudart"]["error"]
    cu12 = line(report, "cuda")
    assert cu12["cudart"]["devices"] == [{"index": 0, "cc": "12.0"}]  # 12.4's runtime sees the card...
    assert cu12["gpus_supported"][0]["supported"] is False  # ...but its torch has no kernels for it
    assert cu12["probe"]["reason"] == "GPU 0 (NVIDIA GeForce RTX 5090) is sm_120, this torch build has sm_50..sm_90"
    reasons = report["selection"]["services"]["echo"]["reasons"]
    assert report["selection"]["services"]["echo"]["chosen"] == "cpu"
    assert reasons[0] == "cuda13: skipped, driver 570.86.10 < 580.65.06"
    assert reasons[1].startswith("cuda: skipped, GPU 0 (NVIDIA GeForce RTX 5090) is sm_120, this build has sm_50..sm_90")
    assert report["torch"] == {"installed": False, "why": "No module named 'torch'"}
    assert "GPU 0 sm_120 NOT in sm_50..sm_90" in printed


def test_a_host_without_a_gpu_says_so_and_each_libcudart_still_loads(tmp_path, bundle):
    report, printed = run(tmp_path, bundle, host_root(tmp_path, None))
    assert report["gpus"]["gpus"] == [] and report["gpus"]["source"] is None
    cu13 = line(report, "cuda13")
    assert cu13["probe"]["runtime"]["loaded"] and cu13["probe"]["runtime"]["version"] == 13000
    assert cu13["probe"]["reason"].startswith("no NVIDIA driver")
    assert cu13["cudart"]["device_count_rc"] == 35  # as the real libcudart answers without a driver
    assert report["selection"]["services"]["echo"]["chosen"] == "cpu"
    assert printed.splitlines()[0].startswith("no NVIDIA GPU on this host")


def test_a_library_that_does_not_match_its_digest_is_not_loaded(tmp_path, bundle):
    made = json.loads((bundle / "bundle.json").read_text())
    (bundle / made["lines"][0]["file"]).write_bytes(b"\x7fELF not the published bytes")
    report, _ = run(tmp_path, bundle, host_root(tmp_path, None))
    assert "does not match its digest" in line(report, "cuda13")["skipped"]
    assert "probe" not in line(report, "cuda13")


def test_without_the_tools_dependencies_selection_is_left_for_replay(tmp_path, bundle, standins):
    bare = tmp_path / "bare-host"  # a GPU host's Python: no jsonschema, requests, packaging
    bare.mkdir()
    for name in ("jsonschema", "requests", "packaging"):
        (bare / f"{name}.py").write_text(f'raise ImportError("No module named {name!r} (a bare host)")\n')
    report, printed = run(tmp_path, bundle, host_root(tmp_path, "580.82.07"), [standins["driver"], standins["nvml"]],
                          extra_path=[bare], FAKE_GPUS=H100, FAKE_DRIVER="580.82.07", FAKE_DRIVER_API=13000)
    assert report["selection"]["replayed"] is False and "dependencies are missing" in report["selection"]["why"]
    assert line(report, "cuda13")["probe"]["usable"] is True  # everything else ran on the bare host
    assert "selection not replayed" in printed
    # Elsewhere, with the tool: the selection from the report's own host probe.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--replay", str(tmp_path / "report.json"), str(bundle)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    replayed = json.loads((tmp_path / "report.json").read_text())
    assert replayed["selection"]["services"]["echo"]["chosen"] == "cuda13"
    assert replayed["gpus"] == report["gpus"]  # nothing else changed


def test_the_runtime_files_are_imported_as_they_ship_not_copied():
    text = SCRIPT.read_text()
    assert 'RUNTIME / f"{name}.py"' in text and "runtime_module(\"entrypoint\")" in text
    assert "def assess" not in text and "def probe_gpus" not in text  # no second copy of the image's probe
