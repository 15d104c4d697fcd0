"""Finer dependency layers, on a real build: a package over the project's `layer_split.own_mb`
gets a layer of its own, the small ones share one, the layers stack into a working site,
and adding a small package re-sends only the shared layer."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest

from orchestrator.machine import daemon
from orchestrator import flow
from orchestrator.project import spec
from orchestrator.oci.registry import Registry, split_ref
from tests.conftest import cleanup_namespace, ready_mini

PICK = {"backends": ["cpu"], "services": ["echo"], "platforms": ["linux/amd64"]}


def _edit(root):
    pf = root / "project.yaml"
    pf.write_text(pf.read_text() + "layer_split:\n  own_mb: 0.2\n")
    # certifi (0.3 MB installed, its CA bundle) is "big" here; six is small.
    (root / "requirements" / "echo.in").write_text("six==1.16.0\ncertifi==2024.8.30\n")


@pytest.fixture(scope="module")
def split_project(engine_ready, tmp_path_factory):
    project = ready_mini(tmp_path_factory.mktemp("split"), "orch-split", edit=_edit)
    yield project
    cleanup_namespace(project)


def _echo(results):
    return next(r for r in results if r.image.key == "echo")


def _own_layers(result) -> dict[str, str]:
    """The image's service-echo layers by what made them ("certifi", "small") -> blob digest."""
    history = [h["created_by"] for h in json.loads(result.assembled.config)["history"]]
    assert len(history) == len(result.assembled.layers)
    prefix = "orchestrator: service-echo layer "
    return {h[len(prefix):].split(" (")[0]: layer.digest
            for h, layer in zip(history, result.assembled.layers) if h.startswith(prefix)}


def _names(layer) -> list[str]:
    data = layer.path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tf:
        return [m.name for m in tf.getmembers() if not m.isdir()]


@pytest.fixture(scope="module")
def first(split_project):
    return _echo(flow.build(split_project, log=lambda *_: None, **PICK))


def test_a_big_package_gets_a_layer_of_its_own_and_the_small_ones_share_one(first):
    own = _own_layers(first)
    assert list(own) == ["certifi", "small"]
    layer = {x.digest: x for x in first.assembled.layers}
    certifi = _names(layer[own["certifi"]])
    assert certifi and all(n.startswith("opt/site/service-echo/certifi") for n in certifi)
    assert any(n.endswith("cacert.pem") for n in certifi)
    assert any(n.startswith("opt/site/service-echo/six") for n in _names(layer[own["small"]]))


def test_the_split_layers_stack_into_one_site_the_service_imports_from(split_project, first):
    client = daemon.docker_client()
    client.images.pull(first.ref)
    out = client.containers.run(first.ref, entrypoint=["python3", "-c"],
                                command=["import certifi, six, os; print(os.path.exists(certifi.where()), six.PY3)"],
                                remove=True)
    assert out.decode().strip() == "True True"


def test_adding_a_small_package_re_sends_only_the_small_package_layer(split_project, first):
    (split_project.root / "requirements" / "echo.in").write_text(
        "six==1.16.0\ncertifi==2024.8.30\nsniffio==1.3.1\n")
    project = spec.load(split_project.file)
    flow.lock(project, log=lambda *_: None)
    stats: dict = {}
    second = _echo(flow.build(project, log=lambda *_: None, stats=stats, **PICK))
    before, after = _own_layers(first), _own_layers(second)
    assert after["certifi"] == before["certifi"]
    assert after["small"] != before["small"]
    changed = [x for x in second.assembled.layers if x.digest not in {y.digest for y in first.assembled.layers}]
    assert [x.digest for x in changed] == [after["small"]]
    # What the registry received: that layer, the config and the manifest.
    assert stats["uploaded_bytes"] < changed[0].blob_size + 20_000, stats
    reg = Registry(project.registry)
    _, name, _ = split_ref(second.ref)
    assert [lay["digest"] for lay in reg.get_manifest(name, second.digest).json["layers"]] == \
        [x.digest for x in second.assembled.layers]
