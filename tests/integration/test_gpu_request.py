"""The GPU request reaches the engine: containers created (not started: this
host need not have a GPU runtime) with gpu_request's arguments carry it in
HostConfig.DeviceRequests, as `docker run --gpus` / `--device nvidia.com/gpu=all`
would."""

from __future__ import annotations

import io
import tarfile
import uuid

import pytest

from orchestrator.machine import daemon
from orchestrator.host import launch
from orchestrator.host import gpu_request as gr

from ..conftest import unavailable

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def client():
    if not daemon.engine_running():
        unavailable("no Docker Engine (run `invoke engine.up`)")
    return daemon.docker_client()


@pytest.fixture(scope="module")
def empty_image(client):
    """An image made here from an empty root file system: no registry or network needed, and never run."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    repo, tag = "orch-gpu-request-test", uuid.uuid4().hex[:8]
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag)
    ref = f"{repo}:{tag}"
    yield ref
    client.images.remove(ref, force=True)


@pytest.fixture
def created(client, empty_image):
    """Create a container with the given GPU request; return its DeviceRequests and env as the engine stored them."""
    made = []

    def create(request: gr.GpuRequest):
        env = {"BACKEND_POLICY": "strict", **request.environment}
        c = client.containers.create(empty_image, command=["/nothing"], name=f"orch-gpu-{uuid.uuid4().hex[:8]}",
                                     environment=env, **request.kwargs())
        made.append(c)
        c.reload()
        return c.attrs["HostConfig"].get("DeviceRequests"), c.attrs["Config"].get("Env") or []

    yield create
    for c in made:
        c.remove(force=True)


def test_the_nvidia_runtime_request_is_in_the_host_config(created):
    request = gr.decide(gr.HostFacts(runtimes=("nvidia", "runc"), gpu_nodes=("/dev/nvidia0",)))
    reqs, _ = created(request)
    # What `docker run --gpus all` stores, with the driver named.
    assert [(r["Driver"], r["Count"], r["DeviceIDs"] or [], r["Capabilities"]) for r in reqs] == [
        ("nvidia", -1, [], [["gpu"]])]


def test_named_gpus_and_cdi_requests_are_in_the_host_config(created):
    request = gr.decide(gr.HostFacts(runtimes=("nvidia",), gpu_nodes=("/dev/nvidia0",),
                                     nvidia_visible_devices="0,1"))
    reqs, env = created(request)
    assert [(r["Driver"], r["DeviceIDs"], r["Capabilities"]) for r in reqs] == [("nvidia", ["0", "1"], [["gpu"]])]
    assert "NVIDIA_VISIBLE_DEVICES=0,1" in env
    request = gr.decide(gr.HostFacts(cdi_spec_dirs=("/etc/cdi",), cdi_nvidia_specs=("/etc/cdi/nvidia.yaml",),
                                     gpu_nodes=("/dev/nvidia0",)))
    reqs, _ = created(request)
    assert [(r["Driver"], r["DeviceIDs"]) for r in reqs] == [("cdi", ["nvidia.com/gpu=all"])]


def test_no_gpu_wanted_leaves_the_host_config_without_a_request(created):
    request = gr.decide(gr.HostFacts(runtimes=("nvidia",), gpu_nodes=("/dev/nvidia0",),
                                     nvidia_visible_devices="none"))
    reqs, env = created(request)
    assert not reqs and "NVIDIA_VISIBLE_DEVICES=void" in env


def test_this_hosts_own_request_matches_what_launch_would_ask(client, created):
    """Whatever this host is (GPU runtime or not), the engine stores exactly what launch passes."""
    request = gr.for_host(client)
    reqs, _ = created(request)
    if request.requested:
        assert reqs and reqs[0]["Driver"] == request.mechanism
    else:
        assert not reqs
    assert launch.is_cuda_backend({"requires": {"cuda": "13.0"}})
