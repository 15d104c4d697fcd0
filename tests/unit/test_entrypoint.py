"""The in-image entrypoint (runtime/entrypoint.py): arch rules, the decision
from a probe, and main() under strict and fallback, with fake probe results.
Also the /info fields it feeds (contract.py) and smoke's checks of what the
image carries (torch arch list, CUDA-libs layer)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from orchestrator.release import smoke
from orchestrator.host.runtime import contract
from orchestrator.host.runtime import entrypoint as ep

# torch.cuda.get_arch_list() of the builds in compat.yaml.
ARCHS_124 = "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90"
ARCHS_130 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"
RUNTIME_124 = {"loaded": True, "path": "/opt/site/cuda-libs/nvidia/cuda_runtime/lib/libcudart.so.12", "version": 12040}
RUNTIME_130 = {"loaded": True, "path": "/opt/site/cuda-libs/nvidia/cu13/lib/libcudart.so.13", "version": 13000}
NO_LIBCUDA = {"present": False, "reason": "no NVIDIA driver in the container (libcuda.so.1 not found; "
                                          "run with --gpus all on a host with the NVIDIA Container Toolkit)"}


def gpu(index, name, cc):
    major, minor = cc
    return {"index": index, "name": name, "cc": f"{major}.{minor}", "arch": f"sm_{major}{minor}"}


def driver(version, api, *gpus):
    return {"present": True, "cuda_driver_api": api, "device_count": len(gpus), "driver_version": version,
            "devices": list(gpus)}


RTX5090 = gpu(0, "NVIDIA GeForce RTX 5090", (12, 0))
H100 = gpu(0, "NVIDIA H100 80GB HBM3", (9, 0))


def env_124(**extra):
    return {"SERVICE_BACKEND": "cuda", "SERVICE_BACKEND_KIND": "cuda", "CUDA_VERSION": "12.4",
            "CUDA_MIN_DRIVER": "525.60.13", "CUDA_ARCHS": ARCHS_124, **extra}


def env_130(**extra):
    return {"SERVICE_BACKEND": "cuda13", "SERVICE_BACKEND_KIND": "cuda", "CUDA_VERSION": "13.0",
            "CUDA_RUNTIME_LIB": "nvidia/cu13/lib/libcudart.so.13", "CUDA_MIN_DRIVER": "580.65.06",
            "CUDA_RUNTIME_VERSION": "13000", "CUDA_ARCHS": ARCHS_130, **extra}


# --- arch names and CUDA's compatibility rules ----------------------------------

@pytest.mark.parametrize("text,want", [
    ("sm_86", ("sm", 8, 6, "")), ("sm_120", ("sm", 12, 0, "")), ("sm_100", ("sm", 10, 0, "")),
    ("sm_50", ("sm", 5, 0, "")), ("sm_90a", ("sm", 9, 0, "a")), ("sm_100f", ("sm", 10, 0, "f")),
    ("compute_90", ("compute", 9, 0, "")), ("sm_9", None), ("gfx90a", None), ("", None),
])
def test_arch_names_parse_with_the_last_digit_as_the_minor(text, want):
    assert ep.parse_arch(text) == want


@pytest.mark.parametrize("archs,cc,ok", [
    (ARCHS_124, (12, 0), False),  # Blackwell consumer on the 12.4 build: no kernel image
    (ARCHS_124, (10, 0), False),  # B200
    (ARCHS_124, (9, 0), True),  # H100
    (ARCHS_124, (8, 9), True),  # Ada runs sm_86 cubins (same major, later minor)
    (ARCHS_124, (7, 0), True),  # V100
    (ARCHS_130, (9, 0), True),  # H100 on the 13.0 build
    (ARCHS_130, (12, 0), True),
    (ARCHS_130, (12, 1), True),  # DGX Spark (GB10) runs sm_120 cubins
    (ARCHS_130, (7, 0), False),  # CUDA 13 dropped Volta
    (ARCHS_130, (6, 1), False),
    ("sm_90a", (9, 0), True), ("sm_90a", (12, 0), False), ("sm_90a", (9, 1), False),  # arch-specific: exactly
    ("sm_80 compute_90", (12, 0), True),  # PTX JIT-compiles forward across majors
    ("sm_80 compute_90", (8, 9), True), ("compute_90", (8, 9), False),  # ... but never backward
    ("sm_100f", (10, 3), True), ("sm_100f", (12, 0), False),  # family: same major
    ("sm_86", (8, 0), False),  # a later minor's cubin does not run on an earlier one
    ("", (9, 0), False),
])
def test_a_gpu_is_supported_by_cubins_of_its_major_or_older_ptx(archs, cc, ok):
    assert ep.cc_supported(ep.parse_archs(archs), cc) is ok


def test_arch_lists_read_in_any_separator_and_are_named_as_a_range():
    assert ep.parse_archs("sm_50,sm_60; sm_90\n") == ["sm_50", "sm_60", "sm_90"]
    assert ep.parse_archs(None) == []
    assert ep.describe_archs(ep.parse_archs(ARCHS_124)) == "sm_50..sm_90"
    assert ep.describe_archs(["sm_120", "sm_75", "sm_100"]) == "sm_75..sm_120"  # numeric, not text, order
    assert ep.describe_archs(["sm_90", "compute_90"]) == "sm_90 + PTX compute_90"
    assert ep.describe_archs([]) == "no kernels"
    assert ep.cc_arch((12, 0)) == "sm_120"


# --- the decision from a probe (pure) --------------------------------------------

def test_blackwell_with_the_12_4_build_is_unusable_and_says_which_gpu_and_which_archs():
    r = ep.assess(RUNTIME_124, driver("570.86.10", 12080, RTX5090), env_124())
    assert not r["usable"]
    assert r["reason"] == "GPU 0 (NVIDIA GeForce RTX 5090) is sm_120, this torch build has sm_50..sm_90"
    assert r["archs"] == ARCHS_124.split()


def test_h100_with_the_13_0_build_on_580_is_usable():
    r = ep.assess(RUNTIME_130, driver("580.82.07", 13000, H100), env_130())
    assert r["usable"] and r["reason"] is None


def test_ptx_in_the_build_makes_a_newer_gpu_usable():
    r = ep.assess(RUNTIME_124, driver("570.86.10", 12080, RTX5090), env_124(CUDA_ARCHS=ARCHS_124 + " compute_90"))
    assert r["usable"], r["reason"]


def test_every_gpu_must_be_supported_and_each_unsupported_one_is_named():
    v100, b200 = gpu(0, "Tesla V100-SXM2-16GB", (7, 0)), gpu(1, "NVIDIA B200", (10, 0))
    r = ep.assess(RUNTIME_130, driver("580.82.07", 13000, v100, gpu(2, "NVIDIA H100", (9, 0)), b200), env_130())
    assert not r["usable"]
    assert r["reason"] == "GPU 0 (Tesla V100-SXM2-16GB) is sm_70, this torch build has sm_75..sm_120"
    r = ep.assess(RUNTIME_124, driver("580.82.07", 13000, H100, b200, gpu(2, "RTX 5090", (12, 0))), env_124())
    assert r["reason"].startswith("GPU 1 (NVIDIA B200) is sm_100, GPU 2 (RTX 5090) is sm_120, this torch build")


def test_an_image_without_torch_has_no_arch_list_and_no_arch_check():
    for archs in ({}, {"CUDA_ARCHS": ""}):
        env = {k: v for k, v in env_124().items() if k != "CUDA_ARCHS"} | archs
        assert ep.assess(RUNTIME_124, driver("570.86.10", 12080, RTX5090), env)["usable"]


def test_an_unknown_compute_capability_is_not_held_against_the_gpu():
    odd = {"index": 0, "name": None, "cc": None, "arch": None, "error": "cuDeviceGetAttribute: CUDA error 1"}
    assert ep.assess(RUNTIME_130, driver("580.82.07", 13000, odd), env_130())["usable"]


def test_missing_libcuda_is_the_reason():
    r = ep.assess(RUNTIME_130, NO_LIBCUDA, env_130())
    assert not r["usable"] and "libcuda.so.1 not found" in r["reason"]


def test_a_driver_of_an_older_cuda_major_or_below_the_minimum_is_the_reason():
    r = ep.assess(RUNTIME_130, driver("570.86.10", 12080, H100), env_130())
    assert r["reason"] == "driver 570.86.10 supports CUDA 12.8, this image needs CUDA 13.x (driver >= 580.65.06)"
    r = ep.assess(RUNTIME_130, driver("580.10.01", 13000, H100), env_130())
    assert r["reason"] == "driver 580.10.01 < 580.65.06"
    # The 12.4 runtime on a CUDA 13 driver: newer drivers run older runtimes.
    assert ep.assess(RUNTIME_124, driver("580.82.07", 13000, H100), env_124())["usable"]


def test_a_broken_cuda_libs_layer_and_a_driver_without_devices_are_reasons():
    broken = {"loaded": False, "path": "/x/libcudart.so.13", "error": "/x/libcudart.so.13: cannot open shared object"}
    assert ep.assess(broken, None, env_130())["reason"].startswith("the CUDA-libs layer is broken: /x/libcudart.so.13")
    no_gpu = ep.assess(RUNTIME_130, driver("580.82.07", 13000), env_130())
    assert no_gpu["reason"] == "the driver reports no CUDA device"
    no_init = {"present": True, "reason": "cuInit failed with CUDA error 100 (driver loaded but no usable device)"}
    assert ep.assess(RUNTIME_130, no_init, env_130())["reason"].startswith("cuInit failed")


def test_libcudart_path_comes_from_cuda_runtime_lib_and_defaults_to_the_12_layout():
    assert ep.runtime_lib_path(env_130()) == "/opt/site/cuda-libs/nvidia/cu13/lib/libcudart.so.13"
    assert ep.runtime_lib_path({}) == "/opt/site/cuda-libs/nvidia/cuda_runtime/lib/libcudart.so.12"
    assert ep.runtime_lib_path({"CUDA_LIBS_DIR": "/l", "CUDA_RUNTIME_LIB": "/abs/libcudart.so.13"}) == \
        "/abs/libcudart.so.13"


def test_the_kind_decides_whether_to_probe_and_old_images_named_cuda_are_cuda():
    assert ep.backend_kind({"SERVICE_BACKEND": "cuda13", "SERVICE_BACKEND_KIND": "cuda"}) == "cuda"
    assert ep.backend_kind({"SERVICE_BACKEND": "gpu-fast", "SERVICE_BACKEND_KIND": "cuda"}) == "cuda"
    assert ep.backend_kind({"SERVICE_BACKEND": "cuda"}) == "cuda"  # built before SERVICE_BACKEND_KIND
    assert ep.backend_kind({"SERVICE_BACKEND": "cuda13"}) == "cpu"  # a new name always comes with its kind
    assert ep.backend_kind({"SERVICE_BACKEND": "cuda", "SERVICE_BACKEND_KIND": "cpu"}) == "cpu"
    assert ep.backend_kind({}) == "cpu"


def test_decide_strict_exits_78_with_one_line_and_fallback_serves_on_cpu():
    bad = ep.assess(RUNTIME_124, driver("570.86.10", 12080, RTX5090), env_124())
    code, effective, line = ep.decide(env_124(SERVICE_BACKEND="cuda", BACKEND_POLICY="strict"), bad)
    assert code == 78 and effective is None
    assert line == ("entrypoint: cuda backend unusable here: GPU 0 (NVIDIA GeForce RTX 5090) is sm_120, "
                    "this torch build has sm_50..sm_90 (BACKEND_POLICY=strict)")
    code, effective, line = ep.decide(env_124(BACKEND_POLICY="fallback"), bad)
    assert (code, effective) == (None, "cpu") and "serving on CPU" in line and "sm_120" in line
    good = ep.assess(RUNTIME_130, driver("580.82.07", 13000, H100), env_130())
    assert ep.decide(env_130(BACKEND_POLICY="strict"), good) == (None, "cuda", None)
    assert ep.decide({"SERVICE_BACKEND": "cpu", "SERVICE_BACKEND_KIND": "cpu", "BACKEND_POLICY": "strict"},
                     None) == (None, "cpu", None)


def test_decide_refuses_an_unknown_policy_or_kind():
    code, _, line = ep.decide(env_130(BACKEND_POLICY="maybe"), None)
    assert code == 78 and "BACKEND_POLICY='maybe'" in line
    code, _, line = ep.decide(env_130(SERVICE_BACKEND_KIND="rocm"), None)
    assert code == 78 and "SERVICE_BACKEND_KIND='rocm'" in line


# --- main() with a faked probe and exec ------------------------------------------

class Exec(Exception):
    pass


@pytest.fixture
def fake(monkeypatch):
    """Stand-ins for the ctypes probes and exec; returns what exec received."""
    seen = {}

    def execvpe(file, argv, env):
        seen.update(file=file, argv=argv, env=dict(env))
        raise Exec()

    def set_probe(runtime, drv):
        monkeypatch.setattr(ep, "probe_runtime", lambda path: dict(runtime, path=path))
        monkeypatch.setattr(ep, "probe_driver", lambda: drv)

    monkeypatch.setattr(ep.os, "execvpe", execvpe)
    seen["set_probe"] = set_probe
    return seen


def test_main_strict_on_a_gpu_the_build_cannot_run_exits_78_with_one_stderr_line(fake, capsys):
    fake["set_probe"](RUNTIME_130, driver("580.82.07", 13000, gpu(0, "Tesla V100-SXM2-16GB", (7, 0))))
    env = env_130(BACKEND_POLICY="strict")
    assert ep.main(["python3", "app.py"], env) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == ("entrypoint: cuda13 backend unusable here: GPU 0 (Tesla V100-SXM2-16GB) is sm_70, this torch "
                   "build has sm_75..sm_120 (BACKEND_POLICY=strict)\n")
    assert "file" not in fake  # nothing was started


def test_main_strict_without_libcuda_exits_78(fake, capsys):
    fake["set_probe"](RUNTIME_124, NO_LIBCUDA)
    assert ep.main(["python3", "app.py"], env_124(BACKEND_POLICY="strict")) == 78
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "libcuda.so.1 not found" in err[0] and err[0].endswith("(BACKEND_POLICY=strict)")


def test_main_fallback_execs_on_cpu_with_the_reason(fake, capsys):
    fake["set_probe"](RUNTIME_124, driver("570.86.10", 12080, RTX5090))
    with pytest.raises(Exec):
        ep.main(["python3", "app.py"], env_124(BACKEND_POLICY="fallback"))
    env = fake["env"]
    assert fake["argv"] == ["python3", "app.py"]
    assert env["BACKEND_EFFECTIVE"] == "cpu"
    assert env["BACKEND_REASON"] == "GPU 0 (NVIDIA GeForce RTX 5090) is sm_120, this torch build has sm_50..sm_90"
    probe = json.loads(env["CUDA_PROBE"])
    assert probe["usable"] is False and probe["driver"]["devices"][0]["arch"] == "sm_120"
    assert probe["runtime"]["path"].endswith("nvidia/cuda_runtime/lib/libcudart.so.12")
    assert "serving on CPU" in capsys.readouterr().err


def test_main_usable_execs_on_cuda_without_a_reason(fake):
    fake["set_probe"](RUNTIME_130, driver("580.82.07", 13000, H100))
    with pytest.raises(Exec):
        ep.main(["python3", "app.py"], env_130(BACKEND_POLICY="strict", BACKEND_REASON="stale"))
    assert fake["env"]["BACKEND_EFFECTIVE"] == "cuda"
    assert "BACKEND_REASON" not in fake["env"]
    assert fake["env"]["CUDA_PROBE"] and json.loads(fake["env"]["CUDA_PROBE"])["usable"]
    assert json.loads(fake["env"]["CUDA_PROBE"])["runtime"]["path"].endswith("nvidia/cu13/lib/libcudart.so.13")


def test_main_never_probes_a_cpu_image(fake, monkeypatch):
    monkeypatch.setattr(ep, "probe", lambda env=None: pytest.fail("a cpu image must not probe CUDA"))
    with pytest.raises(Exec):
        ep.main(["python3", "app.py"], {"SERVICE_BACKEND": "cpu", "SERVICE_BACKEND_KIND": "cpu",
                                        "BACKEND_POLICY": "strict"})
    assert fake["env"]["BACKEND_EFFECTIVE"] == "cpu" and "CUDA_PROBE" not in fake["env"]


def test_main_probe_flag_prints_the_probe_json(fake, capsys):
    fake["set_probe"](RUNTIME_130, driver("580.82.07", 13000, H100))
    assert ep.main(["--probe"], env_130()) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["usable"] and out["runtime"]["version"] == 13000
    assert out["driver"]["devices"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "cc": "9.0", "arch": "sm_90"}]
    assert ep.main(["--probe"], {"SERVICE_BACKEND": "cpu"}) == 0
    assert json.loads(capsys.readouterr().out) == {"usable": False, "reason": "cpu image"}


def test_main_without_a_command_says_what_to_give(fake, capsys):
    assert ep.main([], {"SERVICE_BACKEND_KIND": "cpu"}) == 78
    assert "no command to run" in capsys.readouterr().err


def test_the_real_ctypes_probes_report_a_missing_library_without_raising(tmp_path):
    r = ep.probe_runtime(str(tmp_path / "libcudart.so.13"))
    assert r["loaded"] is False and "libcudart.so.13" in r["error"]
    d = ep.probe_driver()  # this host may or may not have a driver; either way a dict, never an exception
    assert isinstance(d["present"], bool)
    if d["present"] and not d.get("reason"):
        assert all({"index", "name", "cc", "arch"} <= set(g) for g in d["devices"])


# --- /info: why it runs on CPU ---------------------------------------------------

def test_info_says_why_a_cuda_image_serves_on_cpu(monkeypatch):
    probe = ep.assess(RUNTIME_124, driver("570.86.10", 12080, RTX5090), env_124())
    for k, v in {"SERVICE_BACKEND": "cuda", "SERVICE_BACKEND_KIND": "cuda", "BACKEND_EFFECTIVE": "cpu",
                 "CUDA_PROBE": json.dumps(probe)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("BACKEND_REASON", raising=False)
    info = contract.Contract("svc").info()
    assert info["backend_effective"] == "cpu" and info["backend_kind"] == "cuda"
    assert info["backend_reason"] == probe["reason"]
    assert info["cuda_probe"] == {"usable": False, "reason": probe["reason"], "runtime_version": 12040,
                                  "driver_version": "570.86.10", "cuda_driver_api": 12080,
                                  "gpus": [{"index": 0, "name": "NVIDIA GeForce RTX 5090", "cc": "12.0",
                                            "arch": "sm_120"}],
                                  "archs": ARCHS_124.split()}


def test_info_of_a_cpu_image_or_a_usable_gpu_has_no_reason(monkeypatch):
    for k in ("CUDA_PROBE", "BACKEND_REASON", "SERVICE_BACKEND_KIND"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SERVICE_BACKEND", "cpu")
    info = contract.Contract("svc").info()
    assert info["backend_reason"] is None and info["cuda_probe"] is None and info["backend_kind"] == "cpu"
    monkeypatch.setenv("CUDA_PROBE", json.dumps(ep.assess(RUNTIME_130, driver("580.82.07", 13000, H100), env_130())))
    monkeypatch.setenv("SERVICE_BACKEND_KIND", "cuda")
    info = contract.Contract("svc").info()
    assert info["backend_reason"] is None and info["cuda_probe"]["usable"] is True
    monkeypatch.setenv("CUDA_PROBE", "not json")
    assert contract.Contract("svc").info()["cuda_probe"] is None


# --- smoke: what the image carries ------------------------------------------------

def variant(**kw):
    base = dict(service="tts", backend="cuda13", platform="linux/amd64", image="x", port=8080, version="0.1.0",
                torch="2.13.0", cuda="13.0")
    return smoke.Variant(**{**base, **kw})


def test_variant_archs_default_to_empty_so_old_constructors_work():
    v = smoke.Variant("s", "cuda", "linux/amd64", "img", 8080, "0.1.0", "2.5.1", "12.4")
    assert v.archs == ()


def test_the_torch_arch_list_must_match_the_compat_data_and_the_image_env():
    found = ARCHS_130.split()
    ok = smoke.arch_list_check(variant(archs=tuple(found)), list(reversed(found)), {"CUDA_ARCHS": ARCHS_130})
    assert ok.ok and ok.name == "torch arch list" and "compat data and CUDA_ARCHS" in ok.detail
    assert smoke.arch_list_check(variant(), found, {"CUDA_ARCHS": ARCHS_130}).ok  # no compat list: the env
    bad = smoke.arch_list_check(variant(archs=tuple(ARCHS_124.split())), found, {"CUDA_ARCHS": ARCHS_130})
    assert not bad.ok and "compat data says sm_50" in bad.detail
    bad = smoke.arch_list_check(variant(archs=tuple(found)), found, {"CUDA_ARCHS": ARCHS_124})
    assert not bad.ok and "the image's CUDA_ARCHS says sm_50" in bad.detail
    bad = smoke.arch_list_check(variant(archs=tuple(found)), found, {})
    assert not bad.ok and "(unset)" in bad.detail
    bad = smoke.arch_list_check(variant(), [], {})
    assert not bad.ok and "CPU build of torch" in bad.detail


def test_the_cuda_libs_check_reads_the_probe_at_cuda_runtime_lib():
    ok = smoke.cuda_libs_check(variant(), json.dumps({"runtime": RUNTIME_130}))
    assert ok.ok and "nvidia/cu13/lib/libcudart.so.13" in ok.detail
    missing = {"loaded": False, "path": RUNTIME_130["path"], "error": f"{RUNTIME_130['path']}: cannot open"}
    bad = smoke.cuda_libs_check(variant(), json.dumps({"runtime": missing}))
    assert not bad.ok and "libcudart.so.13" in bad.detail and "13000" in bad.detail
    wrong = smoke.cuda_libs_check(variant(), json.dumps({"runtime": RUNTIME_124}))
    assert not wrong.ok
    assert not smoke.cuda_libs_check(variant(), "Traceback ...").ok


def test_info_carries_the_arch_list_torch_was_built_for_from_the_services_process(monkeypatch):
    def fake_torch(flags):
        c = SimpleNamespace(_cuda_getArchFlags=lambda: flags) if flags is not None else SimpleNamespace()
        return SimpleNamespace(__version__="2.5.1", version=SimpleNamespace(cuda="12.4" if flags else None), _C=c,
                               cuda=SimpleNamespace(is_available=lambda: False), get_num_threads=lambda: 2)

    monkeypatch.setitem(sys.modules, "torch", fake_torch("sm_50 sm_90"))
    assert contract.Contract("svc").info()["torch_archs"] == ["sm_50", "sm_90"]  # no GPU needed
    monkeypatch.setitem(sys.modules, "torch", fake_torch(None))  # a CPU build has no CUDA arch flags
    assert contract.Contract("svc").info()["torch_archs"] == []
