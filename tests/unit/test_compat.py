"""The compatibility table's look-ups."""

import pytest

from orchestrator.project import compat as compat_mod


@pytest.fixture(scope="module")
def compat():
    return compat_mod.load()


def test_torch_251_cu124_pins_cudnn_and_triton(compat):
    pins = compat.cuda_pins("2.5.1", "12.4")
    assert pins["nvidia-cudnn-cu12"] == "9.1.0.70"
    assert pins["triton"] == "3.1.0"
    assert compat.cuda_pins("2.5.1+cu124", "12.4") == pins  # local version label ignored


def test_unknown_torch_cuda_pairs_have_no_pins(compat):
    assert compat.cuda_pins("2.13.0", "12.4") is None
    assert compat.cuda_pins("2.5.1", "13.0") is None
    assert compat.cuda_pins("not-a-version", "12.4") is None
    assert compat.torch_cuda_versions("2.5.1") == ["12.4"]
    assert compat.torch_cuda_versions("2.13.0") == ["13.0"]
    assert compat.torch_cuda_versions("2.9.1") == []


def test_cu124_release_facts(compat):
    rel = compat.cuda("12.4")
    assert (rel.tag, rel.min_driver, rel.runtime_version) == ("cu124", "525.60.13", 12040)
    assert compat.cuda("11.8") is None
    assert "12.4" in compat.cuda_versions()


def test_cuda_torch_251_is_buildable_on_amd64_only(compat):
    assert compat.platforms_for("cuda", "2.5.1", "12.4") == ["linux/amd64"]
    assert compat.platforms_for("cpu", "2.5.1", None) == ["linux/amd64", "linux/arm64"]
    # Without torch only the nvidia-* wheels matter, and they exist for both.
    assert compat.platforms_for("cuda", None, "12.4") == ["linux/amd64", "linux/arm64"]


def test_nvidia_lib_dir_mapping(compat):
    assert compat.nvidia_lib_dir("nvidia-cudnn-cu12") == "nvidia/cudnn/lib"
    assert compat.nvidia_lib_dir("NVIDIA_CUBLAS_CU12") == "nvidia/cublas/lib"  # names are canonicalized
    assert compat.nvidia_lib_dir("numpy") is None


def builds(compat):
    """Every (torch, CUDA line) the table knows."""
    return [(t, c) for t in compat.torch_versions() for c in compat.torch_cuda_versions(t)]


def test_every_pinned_nvidia_wheel_has_a_lib_dir(compat):
    for torch, cuda in builds(compat):
        pins = compat.cuda_pins(torch, cuda)
        assert [n for n in pins if n.startswith("nvidia-") and compat.nvidia_lib_dir(n) is None] == [], (torch, cuda)


def test_two_cuda_lines_side_by_side(compat):
    assert compat.cuda_versions() == ["12.4", "13.0"]  # oldest first, by version
    assert compat.platforms_for("cuda", "2.13.0", "13.0") == ["linux/amd64", "linux/arm64"]
    assert compat.cuda_pins("2.13.0", "13.0")["nvidia-cuda-runtime"] == "13.0.96"
    rel = compat.cuda("13.0")
    assert (rel.tag, rel.min_driver, rel.runtime_version) == ("cu130", "580.65.06", 13000)


def test_every_build_carries_pins_platforms_and_a_measured_arch_list(compat):
    import re

    for torch, cuda in builds(compat):
        assert compat.cuda_pins(torch, cuda), (torch, cuda)
        assert set(compat.platforms_for("cuda", torch, cuda)) <= set(compat.platforms()), (torch, cuda)
        for platform in compat.platforms_for("cuda", torch, cuda):
            archs = compat.archs(torch, cuda, platform)
            assert archs and all(re.fullmatch(r"(sm|compute)_\d+[a-z]?", a) for a in archs), (torch, cuda, platform)


def test_cuda13_drops_gpus_below_turing(compat):
    def cc(arch):
        digits = arch.split("_")[1].rstrip("abcdefghijklmnopqrstuvwxyz")
        return int(digits[:-1]), int(digits[-1])

    assert min(cc(a) for a in compat.archs("2.13.0", "13.0", "linux/amd64")) >= (7, 5)
    assert "sm_70" in compat.archs("2.5.1", "12.4", "linux/amd64")


def test_the_two_architectures_builds_of_one_torch_carry_different_arch_lists(compat):
    # Read from the built images: x86_64 keeps Turing, aarch64 (GH200, GB200, DGX Spark, Thor) adds sm_110.
    assert compat.archs("2.13.0", "13.0", "linux/amd64") == ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
    assert compat.archs("2.13.0", "13.0", "linux/arm64") == ("sm_80", "sm_90", "sm_100", "sm_110", "sm_120")


def test_newer_lines_need_newer_drivers_and_runtime_libs_are_pinned(compat):
    from packaging.version import Version

    lines = [compat.cuda(v) for v in compat.cuda_versions()]
    drivers = [Version(r.min_driver) for r in lines]
    assert drivers == sorted(drivers)
    for torch, cuda in builds(compat):
        lib_dir = compat.cuda(cuda).runtime_lib.rsplit("/", 1)[0]
        assert any(compat.nvidia_lib_dir(n) == lib_dir for n in compat.cuda_pins(torch, cuda)), (torch, cuda)


@pytest.mark.parametrize("name, expected", [
    ("nvidia-cublas-cu12", True), ("NVIDIA_CUDNN_CU12", True), ("triton", True),
    ("torch", False), ("numpy", False), ("nvidia", False),
])
def test_is_cuda_libs_package(compat, name, expected):
    assert compat.is_cuda_libs_package(name) is expected


def test_python_platforms(compat):
    assert compat.platforms() == ["linux/amd64", "linux/arm64"]
    assert compat.python_platform("linux/arm64") == "aarch64-manylinux_2_28"


def test_a_torch_that_crashes_under_qemu_is_named_for_that_platform_only(compat):
    assert "qemu" in compat.emulation_blocker("2.13.0", "linux/arm64")
    assert compat.emulation_blocker("2.13.0", "linux/amd64") is None
    assert compat.emulation_blocker("2.9.1", "linux/arm64") is None  # the arm64 CPU build runs under QEMU
