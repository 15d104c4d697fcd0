"""Several CUDA lines side by side: selection by driver AND compute capability.

Fake host roots as in test_probe_select.py, with the GPU list injected in
place of NVML/libcuda and the visibility variables passed as `env`. The
manifest has cuda13 (13.0, sm_75..sm_120, driver >= 580.65.06), cuda (12.4,
sm_50..sm_90, driver >= 525.60.13) and cpu on amd64; cuda13 and cpu on arm64.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from orchestrator.host import probe
from orchestrator.common.errors import UserError
from orchestrator.host.probe import Gpu, Host, visible_gpus
from orchestrator.host.runtime import gpus as gpus_mod
from orchestrator.host.select import arch_range, check_schema_version, parse_arch, select, supports

from .test_probe_select import ARM_CUDA13_IMAGE, CPU_IMAGE, CUDA13_IMAGE, CUDA_IMAGE, manifest

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "orchestrator/data/backend-manifest.schema.json").read_text())

UUID_V100 = "GPU-1f3a6c52-7d0e-4b2a-9c11-0a1b2c3d4e5f"
UUID_A100 = "GPU-a100c0de-5e6f-7a8b-9c0d-1e2f3a4b5c6d"
RTX_5090 = Gpu(0, "GPU-5090aaaa-0000-0000-0000-000000000000", "NVIDIA GeForce RTX 5090", (12, 0), "nvml")
V100 = Gpu(0, UUID_V100, "Tesla V100-SXM2-32GB", (7, 0), "nvml")
A100 = Gpu(1, UUID_A100, "NVIDIA A100-SXM4-80GB", (8, 0), "nvml")
T4 = Gpu(0, "GPU-7475aaaa-0000-0000-0000-000000000000", "Tesla T4", (7, 5), "nvml")
GH200 = Gpu(0, "GPU-9090aaaa-0000-0000-0000-000000000000", "NVIDIA GH200 480GB", (9, 0), "nvml")
H100 = Gpu(0, "GPU-h100aaaa-0000-0000-0000-000000000000", "NVIDIA H100 80GB HBM3", (9, 0), "cuda")

REAL_GPUS = probe._real_gpus  # kept before the autouse guard replaces it


@pytest.fixture(autouse=True)
def no_real_host_queries(monkeypatch):
    """A fake root must never ask NVML, libcuda or ldconfig about the machine running the tests."""
    def forbidden():
        raise AssertionError("real-host query made while probing a fake root")

    for name in ("_ldconfig_libcuda", "_nvml_driver", "_real_gpus"):
        monkeypatch.setattr(probe, name, forbidden)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


PROC = "NVRM version: NVIDIA UNIX {arch} Kernel Module  {v}  Thu Jul 10 05:43:48 UTC 2025\n"


def gpu_host(tmp_path: Path, driver: str, gpus, machine: str = "x86_64", env: dict | None = None,
             ndev: int | None = None) -> Host:
    """A fake root with the driver, libcuda and /dev/nvidiaN for each GPU; the GPU list injected."""
    root = tmp_path / f"host-{driver}-{machine}-{len(list(tmp_path.iterdir()))}"
    libdir = "usr/lib/aarch64-linux-gnu" if machine == "aarch64" else "usr/lib/x86_64-linux-gnu"
    (root / libdir).mkdir(parents=True)
    (root / libdir / "libcuda.so.1").write_bytes(b"\x7fELF")
    (root / "proc/driver/nvidia").mkdir(parents=True)
    (root / "proc/driver/nvidia/version").write_text(PROC.format(arch=machine, v=driver))
    (root / "dev").mkdir()
    for i in range(len(gpus) if ndev is None else ndev):
        (root / "dev" / f"nvidia{i}").touch()
    (root / "dev/nvidiactl").touch()
    return probe.probe(root, machine=machine, gpus=lambda: list(gpus), env=env or {})


# --- the host kinds the issue names --------------------------------------------------

def test_blackwell_on_a_570_driver_gets_cpu(tmp_path):
    c = select(manifest(), gpu_host(tmp_path, "570.172.08", [RTX_5090]))
    assert (c.backend, c.image) == ("cpu", CPU_IMAGE)
    assert c.reasons == ("cuda13: skipped, driver 570.172.08 < 580.65.06",
                         "cuda: skipped, GPU 0 (NVIDIA GeForce RTX 5090) is sm_120, this build has sm_50..sm_90",
                         "cpu: next in the fallback list")


def test_blackwell_on_a_580_driver_gets_cuda13(tmp_path):
    c = select(manifest(), gpu_host(tmp_path, "580.82.07", [RTX_5090]))
    assert (c.backend, c.image) == ("cuda13", CUDA13_IMAGE)
    assert c.reasons == ("cuda13: default, requirements met "
                         "(driver 580.82.07 >= 580.65.06; GPU 0 sm_120 in sm_75..sm_120)",)


def test_v100_on_a_580_driver_gets_the_12_4_line(tmp_path):
    c = select(manifest(), gpu_host(tmp_path, "580.82.07", [V100]))
    assert (c.backend, c.image) == ("cuda", CUDA_IMAGE)
    assert c.reasons == ("cuda13: skipped, GPU 0 (Tesla V100-SXM2-32GB) is sm_70, this build has sm_75..sm_120",
                         "cuda: next in the fallback list, requirements met "
                         "(driver 580.82.07 >= 525.60.13; GPU 0 sm_70 in sm_50..sm_90)")


def test_turing_on_a_535_driver_gets_the_12_4_line(tmp_path):
    c = select(manifest(), gpu_host(tmp_path, "535.247.01", [T4]))
    assert (c.backend, c.image) == ("cuda", CUDA_IMAGE)
    assert c.reasons == ("cuda13: skipped, driver 535.247.01 < 580.65.06",
                         "cuda: next in the fallback list, requirements met "
                         "(driver 535.247.01 >= 525.60.13; GPU 0 sm_75 in sm_50..sm_90)")


def test_gh200_arm64_on_a_580_driver_gets_cuda13_for_arm64(tmp_path):
    host = gpu_host(tmp_path, "580.82.07", [GH200], machine="aarch64")
    assert host.libcuda == "/usr/lib/aarch64-linux-gnu/libcuda.so.1"
    c = select(manifest(), host)
    assert (c.platform, c.backend, c.image) == ("linux/arm64", "cuda13", ARM_CUDA13_IMAGE)
    assert c.reasons == ("cuda13: default, requirements met "
                         "(driver 580.82.07 >= 580.65.06; GPU 0 sm_90 in sm_75..sm_120)",)


def test_h100_on_a_580_driver_gets_cuda13(tmp_path):
    c = select(manifest(), gpu_host(tmp_path, "580.95.05", [H100]))
    assert c.backend == "cuda13"
    assert c.reasons == ("cuda13: default, requirements met "
                         "(driver 580.95.05 >= 580.65.06; GPU 0 sm_90 in sm_75..sm_120)",)


# --- a mixed two-GPU host, and the visibility variables ---------------------------

def test_mixed_v100_and_a100_gets_the_line_that_runs_on_both(tmp_path):
    c = select(manifest(), gpu_host(tmp_path, "580.82.07", [V100, A100]))
    assert c.backend == "cuda"
    assert c.reasons == ("cuda13: skipped, GPU 0 (Tesla V100-SXM2-32GB) is sm_70, this build has sm_75..sm_120",
                         "cuda: next in the fallback list, requirements met "
                         "(driver 580.82.07 >= 525.60.13; GPU 0 sm_70, GPU 1 sm_80 in sm_50..sm_90)")


@pytest.mark.parametrize("env, scope", [
    ({"CUDA_VISIBLE_DEVICES": "1"}, "CUDA_VISIBLE_DEVICES=1"),
    ({"CUDA_VISIBLE_DEVICES": UUID_A100}, f"CUDA_VISIBLE_DEVICES={UUID_A100}"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-a100c0de"}, "CUDA_VISIBLE_DEVICES=GPU-a100c0de"),  # CUDA takes a UUID prefix
    ({"NVIDIA_VISIBLE_DEVICES": "1"}, "NVIDIA_VISIBLE_DEVICES=1"),
    ({"NVIDIA_VISIBLE_DEVICES": UUID_A100}, f"NVIDIA_VISIBLE_DEVICES={UUID_A100}"),
    # The container sees only the A100, as its device 0.
    ({"NVIDIA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "0"},
     "NVIDIA_VISIBLE_DEVICES=1 CUDA_VISIBLE_DEVICES=0"),
    ({"CUDA_VISIBLE_DEVICES": "1,7,0"}, "CUDA_VISIBLE_DEVICES=1,7,0"),  # CUDA stops at the first bad entry
])
def test_mixed_host_with_only_the_a100_visible_gets_cuda13(tmp_path, env, scope):
    host = gpu_host(tmp_path, "580.82.07", [V100, A100], env=env)
    assert visible_gpus(host).gpus == (A100,)
    c = select(manifest(), host)
    assert (c.backend, c.image) == ("cuda13", CUDA13_IMAGE)
    assert c.reasons == ("cuda13: default, requirements met "
                         f"(driver 580.82.07 >= 580.65.06; GPU 1 sm_80 in sm_75..sm_120; {scope})",)


@pytest.mark.parametrize("env", [
    {"NVIDIA_VISIBLE_DEVICES": "all"}, {"NVIDIA_VISIBLE_DEVICES": ""}, {"NVIDIA_VISIBLE_DEVICES": "0,1"},
    {"CUDA_VISIBLE_DEVICES": "0,1"}, {"NVIDIA_VISIBLE_DEVICES": f"{UUID_V100},{UUID_A100}"},
    {"NVIDIA_VISIBLE_DEVICES": "0:1,1"},  # a MIG slice names its GPU
    {"NVIDIA_VISIBLE_DEVICES": "MIG-5c89852c-d268-c3f3-1b07-005d5ae1dc3f"},  # its GPU unknown: check all
])
def test_mixed_host_with_the_v100_visible_keeps_the_12_4_line(tmp_path, env):
    c = select(manifest(), gpu_host(tmp_path, "580.82.07", [V100, A100], env=env))
    assert c.backend == "cuda"
    assert c.reasons[0].startswith("cuda13: skipped, GPU 0 (Tesla V100-SXM2-32GB) is sm_70")


def test_blackwell_next_to_a_v100_has_no_common_line(tmp_path):
    v100 = Gpu(1, UUID_V100, "Tesla V100-SXM2-32GB", (7, 0), "nvml")
    c = select(manifest(), gpu_host(tmp_path, "580.82.07", [RTX_5090, v100]))
    assert c.backend == "cpu"
    assert c.reasons == ("cuda13: skipped, GPU 1 (Tesla V100-SXM2-32GB) is sm_70, this build has sm_75..sm_120",
                         "cuda: skipped, GPU 0 (NVIDIA GeForce RTX 5090) is sm_120, this build has sm_50..sm_90",
                         "cpu: next in the fallback list")
    only_5090 = select(manifest(), gpu_host(tmp_path, "580.82.07", [RTX_5090, v100],
                                            env={"CUDA_VISIBLE_DEVICES": "0"}))
    assert only_5090.backend == "cuda13"


@pytest.mark.parametrize("env, why", [
    ({"NVIDIA_VISIBLE_DEVICES": "none"}, "NVIDIA_VISIBLE_DEVICES=none: no GPU visible"),
    ({"NVIDIA_VISIBLE_DEVICES": "void"}, "NVIDIA_VISIBLE_DEVICES=void: no GPU visible"),
    ({"CUDA_VISIBLE_DEVICES": ""}, "CUDA_VISIBLE_DEVICES='': no GPU visible"),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, "CUDA_VISIBLE_DEVICES='-1': no GPU visible (this host has 2)"),
    ({"CUDA_VISIBLE_DEVICES": "5"}, "CUDA_VISIBLE_DEVICES='5': no GPU visible (this host has 2)"),
    ({"NVIDIA_VISIBLE_DEVICES": "5"},
     f"NVIDIA_VISIBLE_DEVICES=5 names '5', which is not a GPU of this host (it has 0 {UUID_V100}, 1 {UUID_A100})"),
])
def test_no_visible_gpu_skips_every_cuda_line_and_says_why(tmp_path, env, why):
    c = select(manifest(), gpu_host(tmp_path, "580.82.07", [V100, A100], env=env))
    assert c.backend == "cpu"
    assert c.reasons == (f"cuda13: skipped, {why}", f"cuda: skipped, {why}", "cpu: next in the fallback list")


def test_visibility_without_a_gpu_list_still_sees_none_and_void(tmp_path):
    host = gpu_host(tmp_path, "580.82.07", [], ndev=1, env={"NVIDIA_VISIBLE_DEVICES": "void"})
    assert visible_gpus(host).problem == "NVIDIA_VISIBLE_DEVICES=void: no GPU visible"
    # An index cannot be checked without the list: the image's own probe decides.
    host = gpu_host(tmp_path, "580.82.07", [], ndev=1, env={"CUDA_VISIBLE_DEVICES": "3"})
    assert visible_gpus(host) == probe.Visible((), False, None, "CUDA_VISIBLE_DEVICES=3")
    assert select(manifest(), host).backend == "cuda13"


def test_probe_reads_the_visibility_variables_from_env(tmp_path, monkeypatch):
    host = gpu_host(tmp_path, "580.82.07", [V100, A100], env={"NVIDIA_VISIBLE_DEVICES": "1",
                                                               "CUDA_VISIBLE_DEVICES": "0"})
    assert (host.nvidia_visible, host.cuda_visible) == ("1", "0")
    assert host.visible == "NVIDIA_VISIBLE_DEVICES=1 CUDA_VISIBLE_DEVICES=0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the default env is os.environ
    assert probe.probe(tmp_path, machine="x86_64").cuda_visible == "1"
    assert Host("linux/amd64").visible is None


# --- compute capability unknown ------------------------------------------------------

def test_unknown_compute_capability_is_not_a_skip_but_is_said(tmp_path):
    host = gpu_host(tmp_path, "580.82.07", [], ndev=1)  # NVML and libcuda gave no list
    assert "no GPU list (NVML and libcuda did not answer)" in host.notes[0]
    c = select(manifest(), host)
    assert c.backend == "cuda13"
    assert c.reasons == ("cuda13: default, requirements met "
                         "(driver 580.82.07 >= 580.65.06; compute capability unknown, not checked)",)


def test_one_gpu_of_unknown_capability_is_noted_the_others_checked(tmp_path):
    lost = Gpu(1, None, None, None, None)  # NVML lists it but cannot ask it (GPU lost, no permission)
    c = select(manifest(), gpu_host(tmp_path, "580.82.07", [GH200, lost]))
    assert c.backend == "cuda13"
    assert c.reasons == ("cuda13: default, requirements met (driver 580.82.07 >= 580.65.06; "
                         "GPU 0 sm_90 in sm_75..sm_120; GPU 1 compute capability unknown, not checked)",)


def test_a_line_without_archs_checks_only_the_driver(tmp_path):
    m = manifest()
    del m["platforms"]["linux/amd64"]["backends"]["cuda13"]["requires"]["archs"]  # a torch-less image
    c = select(m, gpu_host(tmp_path, "580.82.07", [V100]))
    assert c.backend == "cuda13"
    assert c.reasons == ("cuda13: default, requirements met (driver 580.82.07 >= 580.65.06)",)


def test_a_bad_arch_in_the_manifest_is_a_user_error(tmp_path):
    m = manifest()
    m["platforms"]["linux/amd64"]["backends"]["cuda13"]["requires"]["archs"] = ["sm90"]
    with pytest.raises(UserError) as e:
        select(m, gpu_host(tmp_path, "580.82.07", [V100]))
    assert "cuda13.requires.archs" in e.value.message and "'sm90'" in e.value.message
    assert e.value.exit_code == 2 and "re-publish" in e.value.hint


def test_override_reports_the_gpu_check_and_refuses_an_unsupported_gpu(tmp_path):
    host = gpu_host(tmp_path, "580.82.07", [V100])
    c = select(manifest(), host, override="cuda")
    assert c.reasons == ("cuda: asked for (override), requirements met "
                         "(driver 580.82.07 >= 525.60.13; GPU 0 sm_70 in sm_50..sm_90)",)
    with pytest.raises(UserError, match=r"'cuda13' was asked for, but this host cannot run it: GPU 0 "
                                        r"\(Tesla V100-SXM2-32GB\) is sm_70, this build has sm_75..sm_120"):
        select(manifest(), host, override="cuda13")


def test_choice_as_json_carries_reasons_and_the_host_with_its_gpus(tmp_path):
    host = gpu_host(tmp_path, "580.82.07", [V100, A100], env={"CUDA_VISIBLE_DEVICES": "1"})
    j = select(manifest(), host).as_json()
    assert j["backend"] == "cuda13" and j["reasons"][0].startswith("cuda13: default, requirements met")
    assert j["host"]["gpus"] == [
        {"index": 0, "uuid": UUID_V100, "name": "Tesla V100-SXM2-32GB", "cc": "7.0", "sm": "sm_70", "source": "nvml"},
        {"index": 1, "uuid": UUID_A100, "name": "NVIDIA A100-SXM4-80GB", "cc": "8.0", "sm": "sm_80", "source": "nvml"},
    ]
    assert j["host"]["visible"] == {"NVIDIA_VISIBLE_DEVICES": None, "CUDA_VISIBLE_DEVICES": "1"}
    json.dumps(j)  # all of it is JSON


# --- the arch-support rule ------------------------------------------------------------

@pytest.mark.parametrize("name, cc, ok", [
    ("sm_86", (8, 6), True),
    ("sm_86", (8, 9), True),  # a cubin runs on later minors of its major
    ("sm_80", (8, 6), True),
    ("sm_86", (8, 0), False),  # ... not on earlier ones
    ("sm_90", (10, 0), False),  # ... nor on another major
    ("sm_90", (12, 0), False),
    ("sm_90a", (9, 0), True),  # arch-specific: that cc only
    ("sm_90a", (9, 1), False),
    ("sm_100a", (10, 3), False),
    ("sm_100f", (10, 3), True),  # family-specific: later minors of the major
    ("sm_100f", (12, 0), False),
    ("compute_90", (10, 0), True),  # PTX is JIT-compiled for any later cc
    ("compute_90", (12, 0), True),
    ("compute_90", (8, 9), False),
    ("compute_90a", (10, 0), False),
    ("sm_120", (12, 0), True),
    ("sm_120", (12, 1), True),
    ("sm_75", (7, 0), False),
])
def test_arch_support_rule(name, cc, ok):
    assert supports([name], cc) is ok


@pytest.mark.parametrize("name, cc, ptx, suffix", [
    ("sm_120", (12, 0), False, ""), ("sm_86", (8, 6), False, ""), ("sm_100", (10, 0), False, ""),
    ("sm_50", (5, 0), False, ""), ("sm_90a", (9, 0), False, "a"), ("compute_90", (9, 0), True, ""),
    ("sm_103f", (10, 3), False, "f"),
])
def test_parse_arch(name, cc, ptx, suffix):
    a = parse_arch(name)
    assert (a.cc, a.ptx, a.suffix, a.name) == (cc, ptx, suffix, name)


@pytest.mark.parametrize("name", ["sm90", "sm_9", "cuda_90", "sm_90ab", "", "SM_90", None])
def test_parse_arch_refuses_what_is_not_an_arch(name):
    with pytest.raises(ValueError):
        parse_arch(name)


def test_arch_range_names_the_ends_and_any_ptx():
    assert arch_range(["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]) == "sm_50..sm_90"
    assert arch_range(["sm_120", "sm_75", "sm_100", "sm_90"]) == "sm_75..sm_120"  # by cc, not by text
    assert arch_range(["sm_90"]) == "sm_90"
    assert arch_range(["sm_80", "sm_90", "compute_90"]) == "sm_80..sm_90 + PTX compute_90"
    assert arch_range(["compute_80"]) == "PTX compute_80"


def test_the_12_4_and_13_0_lines_cover_what_the_issue_says():
    archs13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    archs124 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    for cc in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]:  # Turing .. Blackwell
        assert supports(archs13, cc), cc
    for cc in [(5, 0), (6, 1), (7, 0)]:  # Maxwell, Pascal, Volta: dropped by CUDA 13
        assert not supports(archs13, cc) and supports(archs124, cc), cc
    for cc in [(10, 0), (12, 0)]:  # Blackwell: no 12.4 kernels
        assert not supports(archs124, cc), cc


# --- schema version ------------------------------------------------------------------

def test_a_v1_manifest_is_refused_naming_the_schema_version(tmp_path):
    old = manifest()
    old["schemaVersion"] = 1
    with pytest.raises(UserError) as e:
        select(old, gpu_host(tmp_path, "580.82.07", [H100]), source="m.json")
    assert e.value.message == ("m.json: backend manifest schemaVersion 1 is the old shape (one CUDA line, "
                               "no compute capabilities); this orchestrator reads schemaVersion 2")
    assert "invoke publish" in e.value.hint and "--manifest" in e.value.hint
    assert e.value.exit_code == 2


@pytest.mark.parametrize("version, fragment", [
    ("~", "has no schemaVersion; this orchestrator reads schemaVersion 2"),
    ("2", "schemaVersion '2' is not an integer"),
    (True, "schemaVersion True is not an integer"),
    (2.0, "schemaVersion 2.0 is not an integer"),
    (3, "schemaVersion 3 is newer than this orchestrator reads (2)"),
    (0, "schemaVersion 0 is not a known version"),
])
def test_other_schema_versions_are_refused(version, fragment):
    m = manifest()
    if version == "~":
        del m["schemaVersion"]
    else:
        m["schemaVersion"] = version
    with pytest.raises(UserError) as e:
        check_schema_version(m, "registry answer")
    assert e.value.message.startswith("registry answer: backend manifest ")
    assert fragment in e.value.message and e.value.hint


def test_check_schema_version_passes_v2_and_leaves_non_objects_to_the_schema():
    check_schema_version(manifest(), "x")
    check_schema_version([1, 2], "x")  # the schema check reports "(top level)"


def test_v2_manifest_matches_the_schema_and_v1_does_not():
    v = jsonschema.Draft202012Validator(SCHEMA)
    assert not list(v.iter_errors(manifest()))
    old = manifest()
    old["schemaVersion"] = 1
    assert [e.json_path for e in v.iter_errors(old)] == ["$.schemaVersion"]
    assert SCHEMA["$id"].endswith("backend-manifest-2.json")
    assert (ROOT / "manifests/backend-manifest.schema.json").resolve() == \
        (ROOT / "orchestrator/data/backend-manifest.schema.json").resolve()


@pytest.mark.parametrize("archs", [[], ["sm90"], ["sm_90", "sm_90"], ["compute_90a", "sm_9O"], "sm_90"])
def test_schema_refuses_bad_arch_lists(archs):
    m = manifest()
    m["platforms"]["linux/amd64"]["backends"]["cuda13"]["requires"]["archs"] = archs
    assert list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(m))


def test_schema_accepts_arch_specific_and_ptx_entries_and_no_archs():
    m = manifest()
    m["platforms"]["linux/amd64"]["backends"]["cuda13"]["requires"]["archs"] = ["sm_90a", "sm_100f", "compute_120"]
    del m["platforms"]["linux/amd64"]["backends"]["cuda"]["requires"]["archs"]
    assert not list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(m))


# --- the GPU list on the real root ---------------------------------------------------

def test_real_root_lists_gpus_through_runtime_gpus(monkeypatch):
    report = {"driver": "580.95.05", "source": "nvml", "notes": ["GPU 1: nvmlDeviceGetCudaComputeCapability: NVML error 15"],
              "gpus": [{"index": 0, "uuid": "GPU-x", "name": "NVIDIA H100 80GB HBM3", "cc": "9.0", "sm": "sm_90"},
                       {"index": 1, "uuid": None, "name": None, "cc": None, "sm": None}]}
    monkeypatch.setattr(gpus_mod, "probe_gpus", lambda: report)
    monkeypatch.setattr(probe, "_real_gpus", REAL_GPUS)  # undo the guard: the report above stands in
    monkeypatch.setattr(probe, "_ldconfig_libcuda", lambda: "/usr/lib/x86_64-linux-gnu/libcuda.so.1")
    monkeypatch.setattr(probe, "_nvml_driver", lambda: "580.95.05")
    host = probe.probe("/", machine="x86_64", env={})
    assert host.gpus == (Gpu(0, "GPU-x", "NVIDIA H100 80GB HBM3", (9, 0), "nvml"), Gpu(1))
    assert report["notes"][0] in host.notes
    assert (host.driver_version, host.driver_source) == ("580.95.05", "nvml")


def test_gpu_from_report():
    assert Gpu.from_report({"index": 2, "uuid": "GPU-y", "name": "B200", "cc": "10.0"}, "cuda") == \
        Gpu(2, "GPU-y", "B200", (10, 0), "cuda")
    assert Gpu.from_report({"index": 0, "cc": None}, "nvml") == Gpu(0)
    assert Gpu(0, name="Tesla T4", cc=(7, 5)).label == "GPU 0 (Tesla T4)"
    assert Gpu(3).label == "GPU 3" and Gpu(3).sm is None


# --- runtime/gpus.py against fake NVML and libcuda ------------------------------------

class FakeFn:
    """A ctypes function stand-in: takes argtypes, calls a Python function."""

    def __init__(self, fn):
        self.fn, self.argtypes = fn, None

    def __call__(self, *args):
        return self.fn(*args)


class FakeLib:
    def __init__(self, **fns):
        for name, fn in fns.items():
            setattr(self, name, FakeFn(fn))


def _out(ref, value):
    ref._obj.value = value  # what byref(x) points at
    return 0


def fake_nvml(gpus, driver="580.95.05", cc_error_on=()):
    calls = []

    def cc(handle, major, minor):
        i = handle.value - 1
        if i in cc_error_on:
            return 3  # NVML_ERROR_NOT_SUPPORTED
        _out(major, gpus[i][2][0])
        return _out(minor, gpus[i][2][1])

    def setbuf(buf, text):
        buf.value = text.encode()
        return 0

    return calls, FakeLib(
        nvmlInit_v2=lambda: calls.append("init") or 0,
        nvmlShutdown=lambda: calls.append("shutdown") or 0,
        nvmlSystemGetDriverVersion=lambda buf, n: setbuf(buf, driver),
        nvmlDeviceGetCount_v2=lambda ref: _out(ref, len(gpus)),
        nvmlDeviceGetHandleByIndex_v2=lambda i, ref: _out(ref, i + 1),
        nvmlDeviceGetName=lambda h, buf, n: setbuf(buf, gpus[h.value - 1][1]),
        nvmlDeviceGetUUID=lambda h, buf, n: setbuf(buf, gpus[h.value - 1][0]),
        nvmlDeviceGetCudaComputeCapability=cc,
    )


def test_gpus_py_reads_nvml(monkeypatch):
    calls, nvml = fake_nvml([("GPU-a", "NVIDIA A100-SXM4-80GB", (8, 0)), ("GPU-b", "NVIDIA B200", (10, 0))],
                            cc_error_on=(1,))
    monkeypatch.setattr(gpus_mod, "_load", lambda name: nvml if name == "libnvidia-ml.so.1" else None)
    r = gpus_mod.probe_gpus()
    assert (r["driver"], r["source"]) == ("580.95.05", "nvml")
    assert r["gpus"] == [{"index": 0, "uuid": "GPU-a", "name": "NVIDIA A100-SXM4-80GB", "cc": "8.0", "sm": "sm_80"},
                         {"index": 1, "uuid": "GPU-b", "name": "NVIDIA B200", "cc": None, "sm": None}]
    assert r["notes"] == ["GPU 1: nvmlDeviceGetCudaComputeCapability: NVML error 3"]
    assert calls == ["init", "shutdown"]
    assert nvml.nvmlDeviceGetHandleByIndex_v2.argtypes[1] is not None  # the handle is a pointer, not an int
    assert gpus_mod.nvml_driver_version() == "580.95.05"


def test_gpus_py_falls_back_to_libcuda_for_every_gpu_in_bus_order(monkeypatch):
    seen = {}
    cards = [("NVIDIA H100 80GB HBM3", (9, 0), bytes(range(16))), ("Tesla V100-SXM2-32GB", (7, 0), bytes(16))]

    def cu_init(flags):
        seen.update({k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")})
        return 0

    def attr(ref, which, dev):
        return _out(ref, cards[dev.value][1][which - gpus_mod.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR])

    def name(buf, n, dev):
        buf.value = cards[dev.value][0].encode()
        return 0

    def uuid(raw, dev):
        raw.raw = cards[dev.value][2]
        return 0

    cuda = FakeLib(cuInit=cu_init, cuDriverGetVersion=lambda ref: _out(ref, 13000),
                   cuDeviceGetCount=lambda ref: _out(ref, 2), cuDeviceGet=lambda ref, i: _out(ref, i),
                   cuDeviceGetAttribute=attr, cuDeviceGetName=name, cuDeviceGetUuid_v2=uuid)
    monkeypatch.setattr(gpus_mod, "_load", lambda lib: cuda if lib == "libcuda.so.1" else None)
    monkeypatch.setattr(gpus_mod, "proc_driver_version", lambda path=None: "580.95.05")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    r = gpus_mod.probe_gpus()
    # libcuda saw every GPU, numbered as nvidia-smi numbers them; the variables are back after.
    assert seen == {"CUDA_VISIBLE_DEVICES": None, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and "CUDA_DEVICE_ORDER" not in os.environ
    assert (r["source"], r["driver"], r["cuda_driver_api"]) == ("cuda", "580.95.05", 13000)
    assert r["gpus"] == [
        {"index": 0, "uuid": "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f", "name": "NVIDIA H100 80GB HBM3",
         "cc": "9.0", "sm": "sm_90"},
        {"index": 1, "uuid": "GPU-00000000-0000-0000-0000-000000000000", "name": "Tesla V100-SXM2-32GB",
         "cc": "7.0", "sm": "sm_70"},
    ]


def test_gpus_py_without_any_driver_library(monkeypatch, tmp_path):
    monkeypatch.setattr(gpus_mod, "_load", lambda name: None)
    monkeypatch.setattr(gpus_mod, "proc_driver_version", lambda path=None: None)
    assert gpus_mod.probe_gpus() == {"driver": None, "cuda_driver_api": None, "source": None, "gpus": [],
                                     "notes": ["neither libnvidia-ml.so.1 nor libcuda.so.1 loads: no NVIDIA driver"]}


@pytest.mark.parametrize("text, version", [
    ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.82.07  Wed Jul 23 2025\n", "580.82.07"),
    ("NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  580.95.05  Release Build  (dvs)\n", "580.95.05"),
    ("GCC version: gcc version 12.2.0\n", None),
])
def test_gpus_py_reads_the_proc_driver_version(tmp_path, text, version):
    f = tmp_path / "version"
    f.write_text(text)
    assert gpus_mod.proc_driver_version(str(f)) == version
    assert probe.parse_driver_version(text) == version  # the host probe agrees


@pytest.mark.parametrize("where", ["in place", "copied alone"])
def test_gpus_py_runs_standalone_on_this_gpu_less_machine(tmp_path, where):
    # `python3 orchestrator/host/runtime/gpus.py`, and the file alone (as next to the entrypoint or carried
    # to a GPU host, -I: nothing of the checkout importable): it needs nothing of the orchestrator.
    script = ROOT / "orchestrator/host/runtime/gpus.py"
    if where == "copied alone":
        script = tmp_path / "gpus.py"
        script.write_text((ROOT / "orchestrator/host/runtime/gpus.py").read_text())
    proc = subprocess.run([sys.executable, "-I", str(script)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path if where == "copied alone" else ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) >= {"driver", "gpus", "source"}
    if not (ctypes.util.find_library("nvidia-ml") or ctypes.util.find_library("cuda")):
        assert (report["gpus"], report["source"], report["driver"]) == ([], None, None)


def test_gpus_py_goes_on_to_libcuda_when_nvml_is_broken(monkeypatch):
    def broken():
        raise OSError("libnvidia-ml.so.1: undefined symbol")

    monkeypatch.setattr(gpus_mod, "nvml_gpus", broken)
    monkeypatch.setattr(gpus_mod, "cuda_gpus", lambda env: {"driver": None, "cuda_driver_api": 13000,
                                                            "source": "cuda", "gpus": [], "notes": []})
    monkeypatch.setattr(gpus_mod, "proc_driver_version", lambda path=None: "580.95.05")
    r = gpus_mod.probe_gpus()
    assert (r["source"], r["driver"]) == ("cuda", "580.95.05")
    assert r["notes"] == ["NVML: libnvidia-ml.so.1: undefined symbol"]
