"""Locks: parsing, headers, and stale detection without resolving anything."""

from __future__ import annotations

import shutil

import pytest

from orchestrator.debian import locks as apt_locks
from orchestrator.project import lock
from orchestrator.project import spec
from orchestrator.build.plan import content_tag, make_plan
from orchestrator.flow import load_all_locks

from ..conftest import FIXTURES, ROOT

UV_OUTPUT = """\
filelock==3.16.1 \\
    --hash=sha256:aaa \\
    --hash=sha256:bbb
    # via torch
torch==2.5.1 \\
    --hash=sha256:ccc
    # via -r torch.in
"""


def test_uv_output_splits_into_one_block_per_package():
    pins = lock.parse_pins(UV_OUTPUT)
    assert [(p.name, p.version) for p in pins] == [("filelock", "3.16.1"), ("torch", "2.5.1")]
    assert pins[0].block.count("--hash") == 2 and pins[0].block.endswith("# via torch\n")


def test_a_lock_round_trips_through_its_text_with_its_inputs_hash(tmp_path):
    lk = lock.Lock("cuda", "linux/amd64", "torch", "a" * 64, lock.parse_pins(UV_OUTPUT))
    path = tmp_path / "torch.txt"
    path.write_text(lk.text())
    assert lock.read_lock(path) == lk


@pytest.mark.parametrize("path", [ROOT / "project.yaml", FIXTURES / "mini" / "project.yaml"], ids=["example", "mini"])
def test_committed_locks_are_current(path):
    assert lock.check(spec.load(path)) == []


def test_the_cuda_libs_lock_is_the_nvidia_and_triton_subset_of_torch():
    project = spec.load(ROOT / "project.yaml")
    libs = lock.read_lock(lock.lock_path(project.root, "cuda", "linux/amd64", "cuda-libs"))
    torch = lock.read_lock(lock.lock_path(project.root, "cuda", "linux/amd64", "torch"))
    assert {p.name for p in libs.pins} == {
        "nvidia-cublas-cu12", "nvidia-cuda-cupti-cu12", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12",
        "nvidia-cudnn-cu12", "nvidia-cufft-cu12", "nvidia-curand-cu12", "nvidia-cusolver-cu12",
        "nvidia-cusparse-cu12", "nvidia-nccl-cu12", "nvidia-nvjitlink-cu12", "nvidia-nvtx-cu12", "triton"}
    assert "torch" in torch.names() and not (torch.names() & libs.names())
    assert all(p.block.count("--hash=sha256:") >= 1 for p in libs.pins + torch.pins)


def test_layers_are_disjoint_within_a_backend():
    project = spec.load(ROOT / "project.yaml")
    for backend, platform in lock.targets(project):
        seen: set[str] = set()
        for lk in lock.load_locks(project, backend, platform):
            if lk.layer.startswith("service-"):
                assert not (lk.names() & seen - set()), lk.layer
            else:
                assert not (lk.names() & seen), lk.layer
                seen |= lk.names()


@pytest.fixture
def mini_copy(tmp_path):
    shutil.copytree(FIXTURES / "mini", tmp_path / "mini")
    return tmp_path / "mini"


def test_editing_a_layer_input_makes_that_lock_stale_for_every_backend(mini_copy):
    (mini_copy / "requirements" / "shared.in").write_text("idna==3.9\n")
    stale = {str(s.path) for s in lock.check(spec.load(mini_copy / "project.yaml"))}
    # Layers above hash the pins below them, so `invoke lock` re-resolves them too.
    assert stale == {"locks/cuda-amd64/shared.txt", "locks/cuda13-amd64/shared.txt", "locks/cuda13-arm64/shared.txt",
                     "locks/cpu-amd64/shared.txt", "locks/cpu-arm64/shared.txt"}


def test_a_hand_edited_lock_is_named_and_so_are_the_locks_above_it(mini_copy):
    path = mini_copy / "locks" / "cpu-amd64" / "shared.txt"
    path.write_text(path.read_text().replace("idna==3.10", "idna==3.9"))
    stale = {str(s.path): s.reason for s in lock.check(spec.load(mini_copy / "project.yaml"))}
    assert set(stale) == {"locks/cpu-amd64/shared.txt", "locks/cpu-amd64/service-echo.txt"}
    assert "edited by hand" in stale["locks/cpu-amd64/shared.txt"]


def test_service_layers_are_locked_independently_of_each_other():
    # Each service image carries only its own layer, so a package two services
    # need must be in both service locks, not only in the first one's.
    project = spec.load(ROOT / "project.yaml")
    for backend, platform in lock.targets(project):
        locks = {lk.layer: lk for lk in lock.load_locks(project, backend, platform)}
        base = set().union(*(lk.names() for name, lk in locks.items() if not name.startswith("service-")))
        for name, lk in locks.items():
            if name.startswith("service-"):
                assert not (lk.names() & base), (backend.name, platform, name)


def test_a_missing_lock_and_an_orphaned_lock_are_both_named(mini_copy):
    (mini_copy / "locks" / "cpu-amd64" / "shared.txt").unlink()
    (mini_copy / "locks" / "cpu-amd64" / "service-gone.txt").write_text("")
    stale = {str(s.path): s.reason for s in lock.check(spec.load(mini_copy / "project.yaml"))}
    assert stale["locks/cpu-amd64/shared.txt"] == "missing"
    assert stale["locks/cpu-amd64/service-gone.txt"] == "no longer used by the project file"


def test_plan_builds_cuda_libs_first_and_tags_each_image_by_content():
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    plan = make_plan(project, load_all_locks(project), system=apt_locks.load_apt_locks(project))
    assert [(i.key, i.backend.name, i.arch) for i in plan.images] == [
        ("cuda-libs", "cuda13", "amd64"), ("echo", "cuda13", "amd64"), ("cuda-libs", "cuda13", "arm64"),
        ("echo", "cuda13", "arm64"),
        ("cuda-libs", "cuda", "amd64"), ("echo", "cuda", "amd64"), ("echo", "cpu", "amd64"), ("echo", "cpu", "arm64")]
    libs13 = plan.images[0]
    assert libs13.human_tags == ("cu130-v1",) and dict(libs13.env)["CUDA_RUNTIME_LIB"] == "nvidia/cu13/lib/libcudart.so.13"
    libs, echo_cuda, echo_cpu, _ = plan.images[4:]
    assert libs.human_tags == ("cu124-v1",) and libs.repository.endswith("/orch-mini/cuda-libs")
    assert echo_cuda.from_image == "cuda-libs" and echo_cpu.from_image == "base"
    assert echo_cuda.human_tags == ("0.1.0-cuda",)
    a = content_tag(libs, "FROM x", "ctx1", "sha256:base")
    assert a.startswith("cu124-") and len(a) == len("cu124-") + 12
    assert a == content_tag(libs, "FROM x", "ctx1", "sha256:base")
    assert a != content_tag(libs, "FROM y", "ctx1", "sha256:base")
    assert a != content_tag(libs, "FROM x", "ctx2", "sha256:base")
    assert a != content_tag(libs, "FROM x", "ctx1", "sha256:other")
