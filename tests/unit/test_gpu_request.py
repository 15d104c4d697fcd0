"""How CUDA containers ask for GPUs (gpu_request), and that `invoke run`
(launch) and smoke make that request for CUDA backends only, with fake
docker clients and fake hosts."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from orchestrator.common import hostinfo
from orchestrator.release.smoke import runner
from orchestrator.host import gpu_request as gr
from orchestrator.host import launch
from orchestrator.release import smoke

NVIDIA_INFO = {"Runtimes": {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}, "CDISpecDirs": []}
CDI_INFO = {"Runtimes": {"runc": {}}, "CDISpecDirs": ["/etc/cdi", "/var/run/cdi"]}
PLAIN_INFO = {"Runtimes": {"runc": {}, "io.containerd.runc.v2": {}}}
CDI_SPEC = """cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits: {deviceNodes: [{path: /dev/nvidia0}]}
- name: all
  containerEdits: {deviceNodes: [{path: /dev/nvidia0}]}
"""


def facts(**kw) -> gr.HostFacts:
    return gr.HostFacts(**{"gpu_nodes": ("/dev/nvidia0",), **kw})


def as_dicts(request: gr.GpuRequest) -> list[dict]:
    return [dict(r) for r in request.kwargs().get("device_requests", [])]


# --- the decision (pure) ----------------------------------------------------------

def test_nvidia_runtime_requests_all_gpus_like_gpus_all():
    r = gr.decide(facts(runtimes=("nvidia", "runc")))
    assert r.requested and r.mechanism == "nvidia" and r.device_ids is None
    assert r.description == "GPUs: all via nvidia runtime"
    assert as_dicts(r) == [{"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                            "Options": {}}]
    assert isinstance(r.kwargs()["device_requests"][0], docker.types.DeviceRequest)
    assert r.environment == {}


def test_the_toolkit_hook_alone_is_enough_for_the_nvidia_driver():
    r = gr.decide(facts(nvidia_hook=True))
    assert r.mechanism == "nvidia" and "nvidia-container-runtime-hook" in r.description


@pytest.mark.parametrize("env,ids", [
    ({"nvidia_visible_devices": "0,1"}, ["0", "1"]),
    ({"nvidia_visible_devices": "GPU-4f9a1c2e-0000-1111-2222-3333"}, ["GPU-4f9a1c2e-0000-1111-2222-3333"]),
    ({"cuda_visible_devices": "1"}, ["1"]),
    ({"nvidia_visible_devices": "2", "cuda_visible_devices": "0"}, ["2"]),  # the toolkit's variable wins
])
def test_visible_devices_pick_the_gpus(env, ids):
    r = gr.decide(facts(runtimes=("nvidia",), **env))
    assert as_dicts(r) == [{"Driver": "nvidia", "Count": 0, "DeviceIDs": ids, "Capabilities": [["gpu"]],
                            "Options": {}}]
    assert r.environment == {"NVIDIA_VISIBLE_DEVICES": ",".join(ids)}
    assert r.description.startswith(f"GPUs: {','.join(ids)} via nvidia runtime (")


@pytest.mark.parametrize("env", [{"nvidia_visible_devices": "none"}, {"nvidia_visible_devices": "void"},
                                 {"nvidia_visible_devices": ""}, {"cuda_visible_devices": "-1"},
                                 {"cuda_visible_devices": ""}])
def test_none_or_void_means_no_gpu_even_with_a_runtime(env):
    r = gr.decide(facts(runtimes=("nvidia",), cdi_spec_dirs=("/etc/cdi",), cdi_nvidia_specs=("/etc/cdi/n.yaml",),
                        **env))
    assert not r.requested and r.kwargs() == {}
    # A host whose default runtime is nvidia would otherwise inject GPUs by the image's NVIDIA_VISIBLE_DEVICES=all.
    assert r.environment == {"NVIDIA_VISIBLE_DEVICES": "void"}
    assert "asks for no GPU" in r.description and "fall back" in r.description


def test_all_means_every_gpu():
    r = gr.decide(facts(runtimes=("nvidia",), nvidia_visible_devices="all", cuda_visible_devices="1"))
    assert r.device_ids is None and as_dicts(r)[0]["Count"] == -1


def test_cdi_requests_nvidia_com_gpu_all():
    r = gr.decide(facts(cdi_spec_dirs=("/etc/cdi", "/var/run/cdi"), cdi_nvidia_specs=("/etc/cdi/nvidia.yaml",)))
    assert r.mechanism == "cdi"
    assert as_dicts(r) == [{"Driver": "cdi", "Count": 0, "DeviceIDs": ["nvidia.com/gpu=all"], "Capabilities": [],
                            "Options": {}}]
    assert r.description == "GPUs: all via CDI nvidia.com/gpu (/etc/cdi/nvidia.yaml)"
    r = gr.decide(facts(cdi_spec_dirs=("/etc/cdi",), cdi_nvidia_specs=("/etc/cdi/nvidia.yaml",),
                        nvidia_visible_devices="0,GPU-abc"))
    assert as_dicts(r)[0]["DeviceIDs"] == ["nvidia.com/gpu=0", "nvidia.com/gpu=GPU-abc"]


def test_the_nvidia_runtime_is_preferred_over_cdi_when_both_are_there():
    r = gr.decide(facts(runtimes=("nvidia",), cdi_spec_dirs=("/etc/cdi",), cdi_nvidia_specs=("/etc/cdi/n.yaml",)))
    assert r.mechanism == "nvidia"


def test_no_gpu_runtime_says_how_to_get_one():
    r = gr.decide(facts(runtimes=("runc",)))
    assert not r.requested and r.environment == {}
    assert r.description.startswith("no GPU runtime in the engine (install the NVIDIA Container Toolkit")
    assert r.description.endswith("cuda images will fall back")
    r = gr.decide(facts(cdi_spec_dirs=("/etc/cdi",)))
    assert not r.requested and "nvidia-ctk cdi generate" in r.description
    r = gr.decide(facts(cdi_nvidia_specs=("/etc/cdi/nvidia.yaml",)))  # a spec, but CDI off in the engine
    assert not r.requested and '"cdi": true' in r.description and "/etc/cdi/nvidia.yaml" in r.description


def test_no_gpu_device_on_the_host_means_no_request_even_with_a_runtime():
    r = gr.decide(gr.HostFacts(runtimes=("nvidia",), nvidia_hook=True))
    assert not r.requested and "no /dev/nvidia0" in r.description


def test_cpu_backends_never_get_a_request():
    for f in (facts(runtimes=("nvidia",)), None):
        r = gr.decide(f, cuda=False)
        assert not r.requested and r.kwargs() == {} and r.environment == {}


# --- reading the host -------------------------------------------------------------

def fake_root(tmp_path: Path, nodes=("nvidia0", "nvidiactl", "nvidia-uvm"), spec=True) -> Path:
    (tmp_path / "dev").mkdir()
    for n in nodes:
        (tmp_path / "dev" / n).touch()
    if spec:
        (tmp_path / "etc" / "cdi").mkdir(parents=True)
        (tmp_path / "etc" / "cdi" / "nvidia.yaml").write_text(CDI_SPEC)
        (tmp_path / "etc" / "cdi" / "other.json").write_text('{"cdiVersion": "0.6.0", "kind": "vendor.com/fpga"}')
    return tmp_path


def test_host_facts_read_docker_info_the_device_nodes_and_the_cdi_specs(tmp_path):
    root = fake_root(tmp_path, nodes=("nvidia1", "nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-modeset"))
    f = gr.host_facts(CDI_INFO, {"NVIDIA_VISIBLE_DEVICES": "1"}, root, which=lambda _: None)
    assert f.gpu_nodes == ("/dev/nvidia0", "/dev/nvidia1")  # GPUs only, in index order
    assert f.cdi_spec_dirs == ("/etc/cdi", "/var/run/cdi")
    assert f.cdi_nvidia_specs == ("/etc/cdi/nvidia.yaml",)
    assert f.nvidia_visible_devices == "1" and f.cuda_visible_devices is None
    assert not f.nvidia_hook
    r = gr.decide(f)
    assert r.mechanism == "cdi" and as_dicts(r)[0]["DeviceIDs"] == ["nvidia.com/gpu=1"]


def test_host_facts_without_cdi_still_find_a_spec_for_the_hint(tmp_path):
    f = gr.host_facts(PLAIN_INFO, {}, fake_root(tmp_path), which=lambda name: f"/usr/bin/{name}")
    assert f.cdi_spec_dirs == () and f.cdi_nvidia_specs == ("/etc/cdi/nvidia.yaml",)
    assert f.nvidia_hook and f.runtimes == ("io.containerd.runc.v2", "runc")


def test_wsl2_dxg_counts_as_a_gpu_node(tmp_path):
    assert gr.gpu_nodes(fake_root(tmp_path, nodes=("dxg",), spec=False)) == ("/dev/dxg",)


class FakeClient:
    def __init__(self, info):
        self._info = info
        self.containers = FakeContainers()

    def info(self):
        return self._info


def test_for_host_asks_the_engine_once_and_cpu_asks_nothing(monkeypatch):
    monkeypatch.setattr(gr, "gpu_nodes", lambda root=None: ("/dev/nvidia0",))
    r = gr.for_host(FakeClient(NVIDIA_INFO), environ={})
    assert r.mechanism == "nvidia"
    assert not gr.for_host(None, cuda=False).requested  # no engine asked


# --- invoke run: the request is made for CUDA backends only ----------------------

class FakeContainer:
    def __init__(self, name, exit_code=None):
        self.name = name
        self.exit_code = exit_code
        self.status = "exited" if exit_code is not None else "running"
        self.attrs = {"State": {"StartedAt": "2025-01-01T00:00:00.1Z",
                                "FinishedAt": "2025-01-01T00:00:01.2Z" if exit_code is not None else "0001-01-01"},
                      "NetworkSettings": {"Ports": {"8080/tcp": [{"HostPort": "49999"}]}}}
        self.removed = False

    def reload(self):
        pass

    def wait(self, timeout=None):
        return {"StatusCode": self.exit_code}

    def logs(self, stdout=True, stderr=True):
        return b"entrypoint: cuda13 backend unusable here: no NVIDIA driver (BACKEND_POLICY=strict)\n"

    def remove(self, force=False):
        self.removed = True


class FakeContainers:
    def __init__(self):
        self.runs = []  # (image, kwargs)
        self.script = []  # exit code (or None: serves) per run, or an exception to raise

    def run(self, image, **kwargs):
        self.runs.append((image, kwargs))
        step = self.script[len(self.runs) - 1]
        if isinstance(step, Exception):
            raise step
        return FakeContainer(kwargs.get("name"), step)

    def get(self, name):
        raise docker.errors.NotFound("no such container")


MANIFEST = {"platforms": {"linux/amd64": {
    "default": "cuda13", "fallback": ["cuda13", "cuda", "cpu"],
    "backends": {"cuda13": {"image": "reg/svc@sha256:13", "requires": {"cuda": "13.0", "driver": ">=580.65.06"}},
                 "cuda": {"image": "reg/svc@sha256:12", "requires": {"cuda": "12.4", "driver": ">=525.60.13"}},
                 "cpu": {"image": "reg/svc@sha256:cpu"}}}}}


@pytest.fixture
def engine_with(monkeypatch):
    """launch against a fake engine on a fake GPU host; returns the fake client."""
    def make(info, script):
        client = FakeClient(info)
        client.containers.script = script
        monkeypatch.setattr(gr, "gpu_nodes", lambda root=None: ("/dev/nvidia0",))
        monkeypatch.setattr(launch.requests, "get", lambda url, timeout=None: type("R", (), {"status_code": 200})())
        return client
    return make


def test_run_requests_gpus_for_each_cuda_attempt_and_none_for_cpu(engine_with):
    client = engine_with(NVIDIA_INFO, [78, 78, None])
    logged = []
    result = launch.launch(client, MANIFEST, "linux/amd64", 8080, "orch-t", log=logged.append, environ={})
    assert [(a.backend, a.outcome) for a in result.attempts] == [("cuda13", "exit 78"), ("cuda", "exit 78"),
                                                                 ("cpu", "serving")]
    (img13, kw13), (img12, kw12), (imgcpu, kwcpu) = client.containers.runs
    for kw in (kw13, kw12):
        assert [dict(r) for r in kw["device_requests"]] == [
            {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
        assert kw["environment"] == {"BACKEND_POLICY": "strict"}
    assert "device_requests" not in kwcpu
    assert logged[0] == "starting cuda13: reg/svc@sha256:13 (GPUs: all via nvidia runtime)"
    assert result.attempts[0].gpu == "GPUs: all via nvidia runtime" and result.attempts[2].gpu is None


def test_run_respects_nvidia_visible_devices_and_uses_cdi_where_configured(engine_with, monkeypatch):
    client = engine_with({"Runtimes": {"runc": {}}, "CDISpecDirs": ["/etc/cdi"]}, [None])
    monkeypatch.setattr(gr, "cdi_nvidia_specs", lambda dirs, root=None: ("/etc/cdi/nvidia.yaml",))
    launch.launch(client, MANIFEST, "linux/amd64", 8080, "orch-t", log=lambda *_: None,
                  environ={"NVIDIA_VISIBLE_DEVICES": "0"})
    (_, kw), = client.containers.runs
    assert [dict(r) for r in kw["device_requests"]] == [
        {"Driver": "cdi", "Count": 0, "DeviceIDs": ["nvidia.com/gpu=0"], "Capabilities": [], "Options": {}}]


def test_run_with_no_gpu_wanted_makes_no_request_and_hides_gpus(engine_with):
    client = engine_with(NVIDIA_INFO, [78, 78, None])
    launch.launch(client, MANIFEST, "linux/amd64", 8080, "orch-t", log=lambda *_: None,
                  environ={"NVIDIA_VISIBLE_DEVICES": "none"})
    for _, kw in client.containers.runs[:2]:
        assert "device_requests" not in kw
        assert kw["environment"] == {"BACKEND_POLICY": "strict", "NVIDIA_VISIBLE_DEVICES": "void"}


def test_run_goes_on_when_the_engine_cannot_attach_the_gpus(engine_with):
    refused = docker.errors.APIError("500", explanation='could not select device driver "nvidia" with '
                                                        'capabilities: [[gpu]]')
    client = engine_with(NVIDIA_INFO, [refused, refused, None])
    result = launch.launch(client, MANIFEST, "linux/amd64", 8080, "orch-t", log=lambda *_: None, environ={})
    assert [(a.backend, a.outcome) for a in result.attempts] == [("cuda13", "failed"), ("cuda", "failed"),
                                                                 ("cpu", "serving")]
    assert "could not attach GPUs (GPUs: all via nvidia runtime)" in result.attempts[0].detail
    assert len(client.containers.runs) == 3


def test_run_still_stops_on_an_engine_error_that_is_not_about_gpus(engine_with):
    from orchestrator.common.errors import EnvironmentProblem

    busy = docker.errors.APIError("500", explanation="Bind for 127.0.0.1:8080 failed: port is already allocated")
    client = engine_with(NVIDIA_INFO, [busy])
    with pytest.raises(EnvironmentProblem, match="port is already allocated"):
        launch.launch(client, MANIFEST, "linux/amd64", 8080, "orch-t", log=lambda *_: None, environ={})


def test_a_manifest_backend_is_cuda_by_its_requires_not_its_name():
    assert launch.is_cuda_backend({"requires": {"cuda": "13.0"}})
    assert not launch.is_cuda_backend({"image": "x"}) and not launch.is_cuda_backend({"requires": {}})


# --- smoke: the same module ------------------------------------------------------

def variant(**kw):
    base = dict(service="echo", backend="cuda13", platform="linux/amd64", image="img", port=8080, version="0.1.0",
                torch=None, cuda="13.0")
    return smoke.Variant(**{**base, **kw})


NVIDIA_ALL = gr.decide(facts(runtimes=("nvidia",)))


def test_smoke_gives_gpus_to_native_cuda_variants_only(monkeypatch):
    monkeypatch.setattr(hostinfo, "host_platform", lambda: "linux/amd64")
    assert smoke.gpu_for(variant(), NVIDIA_ALL) is NVIDIA_ALL
    assert smoke.gpu_for(variant(backend="gpu-x"), NVIDIA_ALL) is NVIDIA_ALL  # names are free-form
    assert not smoke.gpu_for(variant(), False).requested
    assert not smoke.gpu_for(variant(backend="cpu", cuda=None), NVIDIA_ALL).requested
    # QEMU-emulated arm64 cannot use the amd64 host's driver.
    assert not smoke.gpu_for(variant(platform="linux/arm64"), NVIDIA_ALL).requested
    monkeypatch.setattr(gr, "gpu_nodes", lambda root=None: ("/dev/nvidia0",))
    assert smoke.host_has_gpu(FakeClient(NVIDIA_INFO)) is True


def test_smoke_container_carries_the_device_request(monkeypatch):
    monkeypatch.setattr(hostinfo, "host_platform", lambda: "linux/amd64")
    c = runner._container(variant(), {"BACKEND_POLICY": "fallback"}, NVIDIA_ALL)
    assert [dict(r) for r in c._kwargs["device_requests"]] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    c = runner._container(variant(platform="linux/arm64"), {}, smoke.gpu_for(variant(platform="linux/arm64"), NVIDIA_ALL))
    assert c._kwargs == {"platform": "linux/arm64", "read_only": True}  # no GPU for an emulated platform


def test_smoke_strict_check_uses_the_same_request(monkeypatch):
    client = FakeClient(NVIDIA_INFO)
    client.containers.script = [78]
    monkeypatch.setattr(hostinfo, "host_platform", lambda: "linux/amd64")
    check = smoke.strict_exit_check(client, variant(), 5, NVIDIA_ALL)
    assert check.ok, check.detail
    (_, kw), = client.containers.runs
    assert kw["environment"] == {"BACKEND_POLICY": "strict"} and len(kw["device_requests"]) == 1
    client.containers.runs.clear()
    client.containers.script = [78]
    assert smoke.strict_exit_check(client, variant(), 5).ok
    assert "device_requests" not in client.containers.runs[0][1]


def info_with(*gpus, driver="580.82.07", archs=()):
    return {"cuda_probe": {"driver_version": driver, "archs": list(archs),
                           "gpus": [{"index": i, "name": n, "cc": cc, "arch": "sm_" + cc.replace(".", "")}
                                    for i, (n, cc) in enumerate(gpus)]}}


def test_smoke_expects_cuda_only_where_the_line_can_drive_the_gpu():
    archs_124 = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")
    v124 = variant(backend="cuda", cuda="12.4", torch="2.5.1", archs=archs_124)
    assert smoke.expected_cuda(v124, NVIDIA_ALL, info_with(("H100", "9.0"))) == (True, "")
    ok, why = smoke.expected_cuda(v124, NVIDIA_ALL, info_with(("RTX 5090", "12.0")))
    assert not ok and why == "GPU 0 (RTX 5090) is sm_120, not in sm_50..sm_90"
    ok, why = smoke.expected_cuda(variant(), NVIDIA_ALL, info_with(("H100", "9.0"), driver="570.86.10"))
    assert not ok and why.startswith("driver 570.86.10 < 580")
    # No torch arch list in the variant: the image's own (from the probe) decides.
    ok, _ = smoke.expected_cuda(variant(), NVIDIA_ALL, info_with(("V100", "7.0"), archs=("sm_75", "sm_90")))
    assert not ok
    assert smoke.expected_cuda(variant(), gr.decide(None, cuda=False), {}) == (False, "no GPU handed to the container")
    assert smoke.expected_cuda(variant(cuda=None, backend="cpu"), NVIDIA_ALL, {})[0] is False
