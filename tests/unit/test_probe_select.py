"""Host probe over fake host roots, and backend selection from a manifest.

Each fake root is a directory laid out like `/` on some machine: a driver
version file, libcuda.so.1 somewhere a distribution puts it, /dev/nvidia*.
The GPU list (NVML or libcuda on a real host) and the visibility variables
are injected. Selection by compute capability is in test_select_lines.py.
"""

from __future__ import annotations

import pytest

from orchestrator.host import probe
from orchestrator.common.errors import UserError
from orchestrator.host.probe import Host
from orchestrator.host.select import select, walk_order

PROPRIETARY = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  {v}  Thu Feb 22 01:44:30 UTC 2024\n"
               "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
OPEN = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {v}  Release Build  "
        "(dvs-builder@U16-I3-B03-4-3)  Thu Aug 24 21:09:50 UTC 2023\n"
        "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")

REPO = "127.0.0.1:5000/morgan/tts@sha256:"
CUDA13_IMAGE = REPO + "e" * 64
CUDA_IMAGE = REPO + "a" * 64
CPU_IMAGE = REPO + "b" * 64
ARM_CUDA13_IMAGE = REPO + "f" * 64
ARM_IMAGE = REPO + "c" * 64
ARCHS_13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.13.0+cu130
ARCHS_124 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # torch 2.5.1+cu124
# The driver range each line needs; the reasons name its minimum.
MIN_13, MIN_124 = "580.65.06", "525.60.13"


def cuda13(image: str) -> dict:
    return {"image": image, "size": 1, "torch": "2.13.0",
            "requires": {"cuda": "13.0", "driver": ">=" + MIN_13, "archs": list(ARCHS_13)},
            "cuda_libs": {"tag": "cu130-v1", "digest": "sha256:" + "9" * 64}}


def manifest(fallback=("cuda13", "cuda", "cpu"), default="cuda13") -> dict:
    """schemaVersion 2 as the publisher writes it: newest CUDA line first, then older, then cpu."""
    return {
        "schemaVersion": 2, "service": "tts", "version": "0.1.0",
        "platforms": {
            "linux/amd64": {
                "default": default, "fallback": list(fallback),
                "backends": {
                    "cuda13": cuda13(CUDA13_IMAGE),
                    "cuda": {"image": CUDA_IMAGE, "size": 1, "torch": "2.5.1",
                             "requires": {"cuda": "12.4", "driver": ">=" + MIN_124, "archs": list(ARCHS_124)},
                             "cuda_libs": {"tag": "cu124-v1", "digest": "sha256:" + "d" * 64}},
                    "cpu": {"image": CPU_IMAGE, "size": 1, "torch": "2.13.0+cpu"},
                },
            },
            "linux/arm64": {"default": "cuda13", "fallback": ["cuda13", "cpu"],
                            "backends": {"cuda13": cuda13(ARM_CUDA13_IMAGE),
                                         "cpu": {"image": ARM_IMAGE, "size": 1, "torch": "2.9.1"}}},
        },
    }


# What selection says when the fake root gives no GPU list (nothing stands in for NVML/libcuda).
UNCHECKED = "compute capability unknown, not checked"


@pytest.fixture
def make_root(tmp_path):
    """Build a fake host root: make_root(driver="550.54.14", libdir=..., devices=True)."""
    counter = iter(range(1000))

    def build(driver: str | None = None, libdir: str | None = "usr/lib/x86_64-linux-gnu",
              devices: bool = True, template: str = PROPRIETARY):
        root = tmp_path / f"host{next(counter)}"
        root.mkdir()
        if driver:
            f = root / "proc/driver/nvidia/version"
            f.parent.mkdir(parents=True)
            f.write_text(template.format(v=driver))
        if driver and libdir:
            lib = root / libdir / "libcuda.so.1"
            lib.parent.mkdir(parents=True)
            lib.write_bytes(b"\x7fELF")
        if driver and devices:
            (root / "dev").mkdir()
            for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):
                (root / "dev" / name).touch()
        return root

    return build


@pytest.fixture(autouse=True)
def no_real_host_queries(monkeypatch):
    """A fake root must never ask NVML or ldconfig about the machine running the tests."""
    def forbidden():
        raise AssertionError("real-host query made while probing a fake root")

    monkeypatch.setattr(probe, "_ldconfig_libcuda", forbidden)
    monkeypatch.setattr(probe, "_nvml_driver", forbidden)
    monkeypatch.setattr(probe, "_real_gpus", forbidden)
    # The machine running the tests must not narrow the fake hosts' GPUs.
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def choose(root, machine="x86_64", override=None, m=None):
    return select(m or manifest(), probe.probe(root, machine=machine), override=override)


def met_124(driver: str) -> str:
    """The reason for the 12.4 line chosen after cuda13 was skipped for the driver, without a GPU list."""
    return f"cuda: next in the fallback list, requirements met (driver {driver} >= {MIN_124}; {UNCHECKED})"


# --- probe ----------------------------------------------------------------

def test_empty_root_is_a_host_without_gpu(make_root):
    host = probe.probe(make_root(), machine="x86_64")
    assert host == Host("linux/amd64")
    assert host.arch == "amd64"
    assert host.as_json() == {"platform": "linux/amd64", "driver_version": None, "driver_source": None,
                              "libcuda": None, "devices": [], "wsl": False, "gpus": [],
                              "visible": {"NVIDIA_VISIBLE_DEVICES": None, "CUDA_VISIBLE_DEVICES": None},
                              "notes": []}


def test_gpu_host_reports_driver_libcuda_and_devices(make_root):
    host = probe.probe(make_root("550.54.14"), machine="x86_64")
    assert host.driver_version == "550.54.14"
    assert host.driver_source == "/proc/driver/nvidia/version"
    assert host.libcuda == "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
    assert host.devices == ("/dev/nvidia0",)  # nvidiactl and nvidia-uvm are not GPUs
    assert host.notes == ()


@pytest.mark.parametrize("libdir", [
    "usr/lib64",  # Fedora, RHEL
    "usr/lib",  # Arch
    "run/opengl-driver/lib",  # NixOS
    "usr/local/nvidia/lib64",  # GKE
])
def test_libcuda_is_found_in_each_distribution_layout(make_root, libdir):
    host = probe.probe(make_root("550.54.14", libdir=libdir), machine="x86_64")
    assert host.libcuda == f"/{libdir}/libcuda.so.1"
    assert choose(make_root("550.54.14", libdir=libdir)).backend == "cuda"
    assert choose(make_root("580.82.07", libdir=libdir)).backend == "cuda13"


def test_libcuda_without_driver_version_is_noted(make_root):
    root = make_root("550.54.14")
    (root / "proc/driver/nvidia/version").unlink()
    host = probe.probe(root, machine="x86_64")
    assert host.driver_version is None and host.driver_source is None
    assert "no driver version" in host.notes[0]


@pytest.mark.parametrize("machine, platform", [
    ("x86_64", "linux/amd64"), ("amd64", "linux/amd64"), ("aarch64", "linux/arm64"), ("arm64", "linux/arm64"),
])
def test_machine_names_map_to_platforms(make_root, machine, platform):
    assert probe.probe(make_root(), machine=machine).platform == platform


@pytest.mark.parametrize("template, version", [
    (PROPRIETARY, "550.54.14"),
    (OPEN, "535.104.05"),
    (OPEN.replace("x86_64", "aarch64"), "535.104.05"),
])
def test_parse_driver_version_reads_both_kernel_module_strings(template, version):
    assert probe.parse_driver_version(template.format(v=version)) == version


def test_parse_driver_version_of_garbage_is_none():
    assert probe.parse_driver_version("") is None
    assert probe.parse_driver_version("GCC version:  gcc version 12.2.0") is None


# --- selection from a probed host ------------------------------------------

def test_no_gpu_selects_cpu_because_libcuda_is_missing(make_root):
    c = choose(make_root())
    assert (c.backend, c.image, c.platform) == ("cpu", CPU_IMAGE, "linux/amd64")
    assert c.reasons[0].startswith("cuda13: skipped, ")
    assert c.reasons[1].startswith("cuda: skipped, ")
    assert "libcuda.so.1 not found" in c.reasons[0] and "libcuda.so.1 not found" in c.reasons[1]
    assert c.reasons[2] == "cpu: next in the fallback list"


@pytest.mark.parametrize("template", [PROPRIETARY, OPEN])
def test_old_driver_selects_cpu_and_says_which_driver(make_root, template):
    c = choose(make_root("515.65.01", template=template))
    assert c.backend == "cpu"
    assert c.reasons == ("cuda13: skipped, driver 515.65.01 < 580.65.06",
                         "cuda: skipped, driver 515.65.01 < 525.60.13",
                         "cpu: next in the fallback list")


@pytest.mark.parametrize("template, driver", [(PROPRIETARY, "550.54.14"), (OPEN, "535.104.05")])
def test_a_12x_driver_selects_the_12_4_line_by_digest(make_root, template, driver):
    c = choose(make_root(driver, template=template))
    assert (c.backend, c.image) == ("cuda", CUDA_IMAGE)
    assert "@sha256:" in c.image
    assert c.reasons == (f"cuda13: skipped, driver {driver} < 580.65.06", met_124(driver))
    assert c.candidates == ("cuda13", "cuda", "cpu")


@pytest.mark.parametrize("template", [PROPRIETARY, OPEN])
def test_a_580_driver_selects_the_13_0_line(make_root, template):
    c = choose(make_root("580.82.07", template=template))
    assert (c.backend, c.image) == ("cuda13", CUDA13_IMAGE)
    assert c.reasons == (f"cuda13: default, requirements met (driver 580.82.07 >= 580.65.06; {UNCHECKED})",)


def test_fedora_layout_selects_cuda_and_reports_usr_lib64(make_root):
    root = make_root("550.54.14", libdir="usr/lib64")
    assert probe.probe(root, machine="x86_64").libcuda == "/usr/lib64/libcuda.so.1"
    c = choose(root)
    assert (c.backend, c.image) == ("cuda", CUDA_IMAGE)


def test_arm64_host_without_gpu_selects_the_arm64_cpu_image(make_root):
    c = choose(make_root(), machine="aarch64")
    assert (c.platform, c.backend, c.image) == ("linux/arm64", "cpu", ARM_IMAGE)
    assert c.reasons[0].startswith("cuda13: skipped, no NVIDIA driver")
    assert c.reasons[1] == "cpu: next in the fallback list"


def test_a_manifest_with_only_cpu_on_arm64_says_default(make_root):
    m = manifest()
    m["platforms"]["linux/arm64"] = {"default": "cpu", "fallback": ["cpu"],
                                     "backends": {"cpu": {"image": ARM_IMAGE, "size": 1, "torch": "2.9.1"}}}
    c = choose(make_root("580.82.07", libdir="usr/lib/aarch64-linux-gnu"), machine="aarch64", m=m)
    assert (c.backend, c.reasons) == ("cpu", ("cpu: default",))


def test_libcuda_without_device_nodes_selects_cpu(make_root):
    c = choose(make_root("550.54.14", devices=False))
    assert c.backend == "cpu"
    assert c.reasons[:2] == ("cuda13: skipped, no /dev/nvidia* device", "cuda: skipped, no /dev/nvidia* device")


def test_unknown_driver_version_skips_cuda(make_root):
    root = make_root("550.54.14")
    (root / "proc/driver/nvidia/version").unlink()
    c = choose(root)
    assert c.backend == "cpu"
    assert "driver version unknown" in c.reasons[0] and "driver version unknown" in c.reasons[1]


# --- overrides ---------------------------------------------------------------

def test_cpu_override_on_a_gpu_host_is_honoured(make_root):
    c = choose(make_root("550.54.14"), override="cpu")
    assert (c.backend, c.image) == ("cpu", CPU_IMAGE)
    assert c.reasons == ("cpu: asked for (override)",)


def test_cuda_override_on_a_host_that_can_run_it_says_what_was_met(make_root):
    c = choose(make_root("550.54.14"), override="cuda")
    assert (c.backend, c.candidates) == ("cuda", ("cuda",))
    assert c.reasons == (f"cuda: asked for (override), requirements met (driver 550.54.14 >= 525.60.13; {UNCHECKED})",)


@pytest.mark.parametrize("backend, kw, why", [
    ("cuda", {}, "libcuda.so.1 not found"),
    ("cuda", {"driver": "515.65.01"}, "driver 515.65.01 < 525.60.13"),
    ("cuda", {"driver": "550.54.14", "devices": False}, "no /dev/nvidia* device"),
    ("cuda13", {"driver": "550.54.14"}, "driver 550.54.14 < 580.65.06"),
])
def test_cuda_override_on_a_host_that_cannot_run_it_is_a_user_error(make_root, backend, kw, why):
    with pytest.raises(UserError) as e:
        choose(make_root(**kw), override=backend)
    assert e.value.exit_code == 2
    assert f"'{backend}' was asked for" in e.value.message and why in e.value.message
    assert e.value.hint


def test_override_of_an_unpublished_backend_is_a_user_error(make_root):
    with pytest.raises(UserError) as e:
        choose(make_root("550.54.14"), override="rocm")
    assert e.value.exit_code == 2
    assert "'rocm' is not published for linux/amd64" in e.value.message
    assert "['cpu', 'cuda', 'cuda13']" in e.value.message
    with pytest.raises(UserError, match="'cuda' is not published for linux/arm64"):
        choose(make_root("550.54.14"), machine="aarch64", override="cuda")


# --- manifest shape ----------------------------------------------------------

def test_manifest_without_the_host_platform_is_a_user_error(make_root):
    m = manifest()
    del m["platforms"]["linux/arm64"]
    with pytest.raises(UserError) as e:
        choose(make_root(), machine="aarch64", m=m)
    assert e.value.exit_code == 2
    assert "linux/arm64" in e.value.message and "['linux/amd64']" in e.value.message


def test_no_runnable_backend_is_a_user_error(make_root):
    m = manifest(fallback=["cuda13", "cuda"])
    with pytest.raises(UserError, match="no backend .* can run on this host: cuda13: skipped, driver 515.65.01 "
                                        "< 580.65.06; cuda: skipped, driver 515.65.01 < 525.60.13") as e:
        choose(make_root("515.65.01"), m=m)
    assert e.value.hint


@pytest.mark.parametrize("fallback, default, order", [
    (["cuda", "cpu"], "cuda", ["cuda", "cpu"]),
    (["cpu", "cuda"], "cuda", ["cuda", "cpu"]),  # default in the middle: rotate to start there
    (["a", "cuda", "cpu"], "cuda", ["cuda", "cpu", "a"]),
    (["cpu"], "cuda", ["cuda", "cpu"]),  # default missing from the list goes first
    (["cuda", "cpu", "gone"], None, ["cuda", "cpu"]),  # unpublished names are dropped
])
def test_walk_order_starts_at_the_default(fallback, default, order):
    backends = {"cuda": {}, "cpu": {}, "a": {}}
    assert walk_order({"default": default, "fallback": fallback, "backends": backends}) == order


def test_rotated_order_is_what_selection_walks(make_root):
    c = choose(make_root(), m=manifest(fallback=["cpu", "cuda13", "cuda"], default="cuda13"))
    assert c.candidates == ("cuda13", "cuda", "cpu")
    assert c.backend == "cpu" and c.reasons[0].startswith("cuda13: skipped")


def test_a_default_that_is_not_the_newest_line_is_walked_first(make_root):
    c = choose(make_root("580.82.07"), m=manifest(default="cuda"))
    assert c.candidates == ("cuda", "cpu", "cuda13")
    assert c.reasons == (f"cuda: default, requirements met (driver 580.82.07 >= 525.60.13; {UNCHECKED})",)


def test_choice_as_json(make_root):
    j = choose(make_root("550.54.14")).as_json()
    assert j["backend"] == "cuda"
    assert "@sha256:" in j["image"]
    assert j["platform"] == "linux/amd64"
    assert j["reasons"] == ["cuda13: skipped, driver 550.54.14 < 580.65.06", met_124("550.54.14")]
    assert j["candidates"] == ["cuda13", "cuda", "cpu"]
    assert j["host"]["driver_version"] == "550.54.14" and j["host"]["gpus"] == []


def test_fake_root_never_queries_nvml_or_ldconfig(make_root):
    # The autouse fixture makes both real-host queries raise; the probe still works.
    host = probe.probe(make_root("550.54.14", libdir="usr/lib64"), machine="x86_64")
    assert (host.driver_version, host.libcuda) == ("550.54.14", "/usr/lib64/libcuda.so.1")
    with pytest.raises(AssertionError):
        probe._nvml_driver()
    with pytest.raises(AssertionError):
        probe._real_gpus()
    assert host.gpus == ()


# --- every host kind the README names, as a fake root -------------------------

def lay_out(root, files=(), dirs=(), driver=None, template=PROPRIETARY):
    """Create files (touched) and dirs under root; a driver writes /proc/driver/nvidia/version."""
    root.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"\x7fELF" if f.endswith(".so.1") else b"")
    if driver:
        v = root / "proc/driver/nvidia/version"
        v.parent.mkdir(parents=True, exist_ok=True)
        v.write_text(template.format(v=driver))
    return root


NV_DEVS = ("dev/nvidia0", "dev/nvidiactl", "dev/nvidia-uvm")
WSL_FILES = ("dev/dxg", "usr/lib/wsl/lib/libcuda.so.1", "usr/lib/wsl/lib/libnvidia-ml.so.1")

NEXT = "next in the fallback list, requirements met"
# id: (machine, files, driver in /proc, nvml answer, libcuda, devices, wsl, backend chosen, reason fragment)
HOST_KINDS = {
    "debian-multiarch": ("x86_64", ("usr/lib/x86_64-linux-gnu/libcuda.so.1", *NV_DEVS), "550.54.14", None,
                         "/usr/lib/x86_64-linux-gnu/libcuda.so.1", ("/dev/nvidia0",), False, "cuda", NEXT),
    "debian-580": ("x86_64", ("usr/lib/x86_64-linux-gnu/libcuda.so.1", *NV_DEVS), "580.82.07", None,
                   "/usr/lib/x86_64-linux-gnu/libcuda.so.1", ("/dev/nvidia0",), False, "cuda13",
                   "cuda13: default, requirements met"),
    "fedora-usr-lib64": ("x86_64", ("usr/lib64/libcuda.so.1", *NV_DEVS), "550.54.14", None,
                         "/usr/lib64/libcuda.so.1", ("/dev/nvidia0",), False, "cuda", NEXT),
    "arch-usr-lib": ("x86_64", ("usr/lib/libcuda.so.1", *NV_DEVS, "dev/nvidia1"), "550.54.14", None,
                     "/usr/lib/libcuda.so.1", ("/dev/nvidia0", "/dev/nvidia1"), False, "cuda", NEXT),
    "gke-usr-local-nvidia": ("x86_64", ("usr/local/nvidia/lib64/libcuda.so.1", *NV_DEVS), "535.104.05", None,
                             "/usr/local/nvidia/lib64/libcuda.so.1", ("/dev/nvidia0",), False, "cuda", NEXT),
    "nixos-opengl-driver": ("x86_64", ("run/opengl-driver/lib/libcuda.so.1", *NV_DEVS), "550.54.14", None,
                            "/run/opengl-driver/lib/libcuda.so.1", ("/dev/nvidia0",), False, "cuda", NEXT),
    "wsl2-nvml": ("x86_64", WSL_FILES, None, "551.61", "/usr/lib/wsl/lib/libcuda.so.1", ("/dev/dxg",), True,
                  "cuda", "cuda13: skipped, driver 551.61 < 580.65.06"),
    "wsl2-nvml-580": ("x86_64", WSL_FILES, None, "581.15", "/usr/lib/wsl/lib/libcuda.so.1", ("/dev/dxg",), True,
                      "cuda13", "cuda13: default, requirements met (driver 581.15 >= 580.65.06"),
    "wsl2-old-windows-driver": ("x86_64", WSL_FILES, None, "512.15", "/usr/lib/wsl/lib/libcuda.so.1",
                                ("/dev/dxg",), True, "cpu", "cuda: skipped, driver 512.15 < 525.60.13"),
    "wsl2-nvml-silent": ("x86_64", WSL_FILES, None, None, "/usr/lib/wsl/lib/libcuda.so.1", ("/dev/dxg",), True,
                         "cpu", "driver version unknown (NVML did not answer"),
    "wsl2-without-dxg": ("x86_64", WSL_FILES[1:], None, "551.61", "/usr/lib/wsl/lib/libcuda.so.1", (), True,
                         "cpu", "no /dev/dxg device"),
    "wsl2-no-gpu-driver": ("x86_64", ("usr/lib/wsl/lib/libd3d12.so",), None, None, None, (), True, "cpu",
                           "libcuda.so.1 not found"),
    "no-gpu": ("x86_64", ("usr/lib/x86_64-linux-gnu/libc.so.6",), None, None, None, (), False, "cpu",
               "libcuda.so.1 not found"),
    "arm64-with-gpu-old-driver": ("aarch64", ("usr/lib/aarch64-linux-gnu/libcuda.so.1", *NV_DEVS), "550.54.14",
                                  None, "/usr/lib/aarch64-linux-gnu/libcuda.so.1", ("/dev/nvidia0",), False, "cpu",
                                  "cuda13: skipped, driver 550.54.14 < 580.65.06"),
    "arm64-with-gpu-580": ("aarch64", ("usr/lib/aarch64-linux-gnu/libcuda.so.1", *NV_DEVS), "580.82.07", None,
                           "/usr/lib/aarch64-linux-gnu/libcuda.so.1", ("/dev/nvidia0",), False, "cuda13",
                           "cuda13: default, requirements met"),
    "arm64-no-gpu": ("aarch64", (), None, None, None, (), False, "cpu", "cpu: next in the fallback list"),
}


@pytest.mark.parametrize("kind", list(HOST_KINDS))
def test_each_host_kind_is_probed_and_selected(tmp_path, kind):
    machine, files, driver, nvml_answer, libcuda, devices, wsl, backend, reason = HOST_KINDS[kind]
    root = lay_out(tmp_path / kind, files, driver=driver)
    calls = []

    def nvml():
        calls.append(1)
        return nvml_answer

    host = probe.probe(root, machine=machine, nvml=nvml)
    assert calls == [1]  # the injected NVML stands in for the real one
    assert host.libcuda == libcuda
    assert host.devices == devices
    assert host.wsl is wsl
    if nvml_answer:
        assert (host.driver_version, host.driver_source) == (nvml_answer, "nvml")
    elif driver:
        assert (host.driver_version, host.driver_source) == (driver, "/proc/driver/nvidia/version")
    else:
        assert host.driver_version is None
    c = select(manifest(), host)
    assert c.backend == backend, c.reasons
    assert reason in "; ".join(c.reasons)
    assert host.as_json()["wsl"] is wsl


def test_wsl2_is_not_skipped_for_missing_dev_nvidia(tmp_path):
    host = probe.probe(lay_out(tmp_path, WSL_FILES), machine="x86_64", nvml=lambda: "551.61")
    assert host.wsl and host.devices == ("/dev/dxg",)
    assert not any(d.startswith("/dev/nvidia") for d in host.devices)
    c = select(manifest(), host)
    assert (c.backend, c.image) == ("cuda", CUDA_IMAGE)
    assert c.reasons == ("cuda13: skipped, driver 551.61 < 580.65.06", met_124("551.61"))
    assert "no /dev/nvidia*" not in " ".join(c.reasons)


def test_wsl2_prefers_the_windows_driver_libcuda_over_a_distribution_stub(tmp_path):
    root = lay_out(tmp_path, (*WSL_FILES, "usr/lib/x86_64-linux-gnu/libcuda.so.1"))
    assert probe.probe(root, machine="x86_64", nvml=lambda: "551.61").libcuda == "/usr/lib/wsl/lib/libcuda.so.1"


def test_wsl2_without_nvml_answer_notes_where_the_driver_comes_from(tmp_path):
    host = probe.probe(lay_out(tmp_path, WSL_FILES), machine="x86_64", nvml=lambda: None)
    assert host.driver_version is None
    assert any("WSL2: NVML did not answer" in n for n in host.notes), host.notes


def test_injected_nvml_wins_over_the_proc_file(make_root):
    host = probe.probe(make_root("515.65.01"), machine="x86_64", nvml=lambda: "550.54.14")
    assert (host.driver_version, host.driver_source) == ("550.54.14", "nvml")


def test_without_an_injected_nvml_a_fake_root_has_no_nvml_driver(tmp_path):
    # The autouse fixture makes the real NVML raise: a fake root must not ask it.
    host = probe.probe(lay_out(tmp_path, WSL_FILES), machine="x86_64")
    assert host.driver_version is None and host.wsl


def test_wsl_cuda_override_without_dxg_says_so(tmp_path):
    host = probe.probe(lay_out(tmp_path, WSL_FILES[1:]), machine="x86_64", nvml=lambda: "551.61")
    with pytest.raises(UserError, match="no /dev/dxg device"):
        select(manifest(), host, override="cuda")
    with pytest.raises(UserError, match="no /dev/dxg device"):
        select(manifest(), host, override="cuda13")
