"""Building real images with the real engine and registry (mini fixture).

Reads as the contract of `invoke build`: what lands in the registry, what is
shared, what is rebuilt, and what stays byte-identical.
"""

from __future__ import annotations

import json
import shutil
import uuid

import pytest

from orchestrator import flow
from orchestrator.build import bases
from orchestrator.debian import layer as apt_layer
from orchestrator.machine import daemon
from orchestrator.oci import layers as layers_mod
from orchestrator.oci.registry import Registry
from orchestrator.project import spec

pytestmark = pytest.mark.engine


from ..conftest import by_key, cleanup_namespace, ready_mini, release_kept


def layers(project, repo, ref, arch="amd64"):
    reg = Registry(project.registry)
    m = reg.get_manifest(f"{project.name}/{repo}", ref).json
    if "manifests" in m:  # an index: follow this architecture's entry
        digest = next(d["digest"] for d in m["manifests"] if d["platform"]["architecture"] == arch)
        m = reg.get_manifest(f"{project.name}/{repo}", digest).json
    return [layer["digest"] for layer in m["layers"]]


def test_build_pushes_by_content_tag_only_and_moves_no_human_tag(mini_project, first_build):
    reg = Registry(mini_project.registry)
    libs = first_build[("cuda-libs", "cuda")]
    assert libs.content_tag.startswith("cu124-")
    assert set(reg.tags(f"{mini_project.name}/cuda-libs")) >= {libs.content_tag}
    echo_tags = set(reg.tags(f"{mini_project.name}/echo"))
    assert {first_build[("echo", "cuda")].content_tag, first_build[("echo", "cpu")].content_tag} <= echo_tags
    # Human tags are promoted by `publish`, after smoke tests: a build alone never moves them.
    assert not {"0.1.0-cuda", "0.1.0-cpu"} & echo_tags and "cu124-v1" not in reg.tags(f"{mini_project.name}/cuda-libs")
    assert reg.get_manifest(f"{mini_project.name}/echo", first_build[("echo", "cuda")].content_tag).digest == \
        first_build[("echo", "cuda")].digest


def test_cuda_service_is_built_from_the_cuda_libs_image_and_shares_its_layer_blob(mini_project, first_build):
    libs = layers(mini_project, "cuda-libs", first_build[("cuda-libs", "cuda")].digest)
    echo = layers(mini_project, "echo", first_build[("echo", "cuda")].digest)
    assert echo[: len(libs)] == libs  # same blobs, same digests: pulled once
    cpu = layers(mini_project, "echo", first_build[("echo", "cpu")].digest)
    assert libs[-1] not in cpu  # the cpu image carries no CUDA libraries


def test_layers_are_multi_member_gzip_that_the_engine_pulls(mini_project, first_build):
    reg = Registry(mini_project.registry)
    m = reg.get_manifest(f"{mini_project.name}/echo", first_build[("echo", "cpu")].digest).json
    assert {lay["mediaType"] for lay in m["layers"]} == {"application/vnd.oci.image.layer.v1.tar+gzip"}
    client = daemon.docker_client()
    client.images.pull(first_build[("echo", "cpu")].ref)  # Docker 20.10 pulls what the tool assembled
    assert client.images.get(first_build[("echo", "cpu")].ref).attrs["RootFS"]["Layers"] == \
        json.loads(reg.get_blob(f"{mini_project.name}/echo", m["config"]["digest"]))["rootfs"]["diff_ids"]


def test_the_cuda_image_loads_cudart_from_its_cuda_libs_layer(mini_project, first_build):
    client = daemon.docker_client()
    ref = first_build[("echo", "cuda")].ref
    out = client.containers.run(ref, ["--probe"], remove=True).decode()
    assert '"version": 12040' in out  # cudaRuntimeGetVersion of CUDA 12.4
    assert "libcuda.so.1 not found" in out or '"usable": true' in out


def test_the_cuda13_image_loads_cudart_13_from_its_own_cuda_libs_line(mini_project, first_build):
    libs = first_build[("cuda-libs", "cuda13")]
    assert libs.content_tag.startswith("cu130-")
    out = daemon.docker_client().containers.run(first_build[("echo", "cuda13")].ref, ["--probe"], remove=True).decode()
    assert '"version": 13000' in out and "nvidia/cu13/lib/libcudart.so.13" in out
    cfg = daemon.docker_client().images.get(first_build[("echo", "cuda13")].ref).attrs["Config"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert (env["SERVICE_BACKEND"], env["SERVICE_BACKEND_KIND"], env["CUDA_VERSION"]) == ("cuda13", "cuda", "13.0")


def test_images_carry_the_runtime_contract_labels_env_and_a_non_root_user(mini_project, first_build):
    client = daemon.docker_client()
    image = client.images.pull(first_build[("echo", "cuda")].ref)
    cfg = image.attrs["Config"]
    env = dict(e.split("=", 1) for e in cfg["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == env["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert "nvidia/cuda_runtime/lib" in env["LD_LIBRARY_PATH"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Healthcheck"]["Test"][0] == "CMD"
    labels = cfg["Labels"]
    assert labels["io.orchestrator.backend"] == "cuda" and labels["io.orchestrator.cuda"] == "12.4"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    # The base by digest, named without a registry host: the same config digest in every registry.
    assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")
    assert labels["org.opencontainers.image.base.name"] == "orchestrator/base-bookworm"
    assert "ca-certificates.crt" not in str(image.history())  # the CA secret never lands in a layer
    assert image.attrs["Created"].startswith("1980-01-01")  # no build time in the config


def test_a_second_build_with_nothing_changed_rebuilds_nothing(mini_project, first_build):
    again = flow.build(mini_project, log=lambda *_: None)
    assert [r.built for r in again] == [False] * len(again)
    assert {k: r.digest for k, r in by_key(again).items()} == {k: r.digest for k, r in first_build.items()}


@pytest.fixture
def app_changed(mini_project):
    """The shared fixture's app.py with a line never pushed before; put back afterwards with the registry's
    tags, so later tests build (and find) the session's digests again."""
    app = mini_project.services["echo"].path / "app.py"
    original = app.read_bytes()
    with release_kept(mini_project):
        app.write_text(original.decode() + f"\n# release {uuid.uuid4()}\n")
        try:
            yield app
        finally:
            app.write_bytes(original)


def test_an_app_only_change_rebuilds_the_services_and_pushes_only_the_app_layer(mini_project, first_build,
                                                                                app_changed):
    results = by_key(flow.build(mini_project, log=lambda *_: None))
    assert results[("cuda-libs", "cuda")].built is False and results[("cuda-libs", "cuda13")].built is False
    cuda13, cuda, cpu = results[("echo", "cuda13")], results[("echo", "cuda")], results[("echo", "cpu")]
    assert cuda13.built and cuda.built and cpu.built
    # One new blob in all: the app layer is byte-identical in every variant.
    assert cuda13.pushed_layers + cuda.pushed_layers + cpu.pushed_layers == 1
    assert cuda13.uploaded_bytes + cuda.uploaded_bytes + cpu.uploaded_bytes < 300_000  # app layer, configs, manifests
    for r in (cuda13, cuda, cpu):
        before = layers(mini_project, "echo", first_build[("echo", r.image.backend.name)].digest)
        after = layers(mini_project, "echo", r.digest)
        changed = [i for i, (a, b) in enumerate(zip(after, before)) if a != b]
        assert len(after) == len(before) and len(changed) == 1  # only the app layer
    assert layers(mini_project, "echo", cuda.digest)[-1] == layers(mini_project, "echo", cpu.digest)[-1]


def delete_repositories(host: str, names: list[str]) -> None:
    reg = Registry(host)
    for name in names:
        for digest in {reg.get_manifest(name, t).digest for t in reg.tags(name)}:
            reg.delete_manifest(name, digest)


def debian_layers_built_once_per_run(monkeypatch) -> None:
    """--force rebuilds a platform's Debian layers (the tool's own work, not BuildKit's) for every image; in one
    run the second build of the same pins finds the first one's blob by its diffID, so it only repeats the
    unpacking. Here each lock is built once, and the other images recall that build (from the same cache)."""
    real = apt_layer.build_layer
    seen: set[str] = set()

    def once(lk, cache, c, **kwargs):
        key = f"{apt_layer.layer_key(lk)} {c.key}"
        if key in seen:
            kwargs["reuse"] = True
        seen.add(key)
        return real(lk, cache, c, **kwargs)

    monkeypatch.setattr(apt_layer, "build_layer", once)


def test_a_cold_rebuild_gives_identical_layer_config_and_image_digests(mini_project, first_build, tmp_path,
                                                                       monkeypatch):
    # The same inputs (the shared fixture's files and name, so the same labels) under a registry namespace of
    # its own, so nothing the session pushed is found or overwritten; an empty blob cache, so every layer is
    # compressed again rather than recalled by its diffID; --force skips content tags and the layer cache,
    # --no-cache BuildKit's cache. Equal digests then mean the layers, compression included, are reproducible.
    monkeypatch.delenv("ORCH_REGISTRY", raising=False)
    host = Registry(mini_project.registry).host
    ns = f"orch-cold-{uuid.uuid4().hex[:8]}"
    root = tmp_path / "mini"
    shutil.copytree(mini_project.root, root, ignore=shutil.ignore_patterns(".build", "manifests"))
    pf = root / "project.yaml"
    pf.write_text(pf.read_text().replace('python: "3.11"', f'python: "3.11"\nregistry: {host}/{ns}', 1))
    project = spec.load(pf)
    assert project.name == mini_project.name and project.registry == f"{host}/{ns}"
    try:
        base, _ = bases.ensure(project, "linux/amd64", log=lambda *_: None)  # copied within the registry
        cold = layers_mod.BlobCache(tmp_path / "blobs")
        monkeypatch.setattr(layers_mod, "default_cache", lambda: cold)
        debian_layers_built_once_per_run(monkeypatch)
        rebuilt = by_key(flow.build(project, backends=["cuda", "cpu"], services=["echo"], platforms=["linux/amd64"],
                                    force=True, no_cache=True, log=lambda *_: None))
    finally:
        delete_repositories(host, [f"{ns}/{project.name}/{r}" for r in ("cuda-libs", *project.services)]
                            + [f"{ns}/orchestrator/base-{project.base.suite}"])
    assert set(rebuilt) == {("cuda-libs", "cuda"), ("echo", "cuda"), ("echo", "cpu")}
    for key, r in rebuilt.items():
        assert r.built
        made = r.assembled.layers[len(base.image.layers):]  # all but the base's: compressed into the empty cache
        assert made and all(x.path is not None and x.path.is_relative_to(cold.root) for x in made), key
        assert [x.digest for x in r.assembled.layers] == [x.digest for x in first_build[key].assembled.layers], key
        assert r.assembled.config_digest == first_build[key].assembled.config_digest, key
        assert r.digest == first_build[key].digest, key


def test_a_second_project_sends_none_of_the_cuda_libs_layers_the_registry_already_holds(mini_project, first_build,
                                                                                          tmp_path):
    # Another project (another namespace) on the same CUDA lines: the registry holds every CUDA-libs layer
    # under the first project's repositories, which this machine has seen, so each is mounted, none sent.
    other = ready_mini(tmp_path, prefix="orch-test-second")
    try:
        libs = [r for r in flow.build(other, backends=["cuda", "cuda13"], log=lambda *_: None)
                if r.image.kind == "cuda-libs"]
        assert {(r.image.backend.name, r.image.platform) for r in libs} == {
            ("cuda", "linux/amd64"), ("cuda13", "linux/amd64"), ("cuda13", "linux/arm64")}
        for r in libs:
            assert r.built and r.pushed_layers == 0, (r.image.backend.name, r.image.platform)
            # What went up is the image's own config and manifest (it names another project): 0 B of layers.
            assert r.uploaded_bytes == len(r.assembled.config) + len(r.assembled.manifest())
            mine = first_build.get(("cuda-libs", r.image.backend.name)) if r.image.platform == "linux/amd64" else None
            if mine is not None:
                assert [x.digest for x in r.assembled.layers] == [x.digest for x in mine.assembled.layers]
    finally:
        cleanup_namespace(other)


def test_the_python_layers_are_byte_identical_from_two_cold_caches(mini_project, tmp_path, monkeypatch):
    # Each run: its own uv wheel cache (wheels downloaded again) and blob cache; amd64 and arm64.
    from orchestrator.build import pydeps
    from orchestrator.oci import layers as layers_mod

    plan = flow.plan(mini_project, backends=["cuda13"])
    made = []
    for run in ("one", "two"):
        monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / run))
        cache, c = layers_mod.default_cache(), layers_mod.codec(mini_project.compression)
        made.append({(image.key, image.platform, stage.name): [(g, lay.diff_id, lay.digest) for g, lay in pydeps.write_stage(
            stage, image.platform, mini_project.python, image.backend.sources, cache, c, stage.name,
            log=lambda *_: None, reuse=False)[0]] for image in plan.images for stage in image.layers})
    assert {p for _, p, _ in made[0]} == {"linux/amd64", "linux/arm64"}
    assert made[0] == made[1]
