"""Shared fixtures. Engine-dependent tests skip on a laptop without Docker,
but fail in CI (CI=true): a missing engine must never pass silently."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator import flow
from orchestrator.build import bases
from orchestrator.common.errors import EnvironmentProblem
from orchestrator.machine import daemon
from orchestrator.oci import signing
from orchestrator.oci.registry import Registry
from orchestrator.project import spec
from orchestrator.project.spec import DEFAULT_REGISTRY

# The Ryuk reaper image cannot be pulled offline; tests remove what they start.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
IN_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: engine-dependent tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def engine_ready():
    """A Docker Engine with a BuildKit client and the registry answering."""
    if not daemon.engine_running():
        unavailable("no Docker Engine (run `invoke engine.up`)")
    try:
        daemon.build_client()
    except EnvironmentProblem as e:
        unavailable(str(e))
    registry = os.environ.get("ORCH_REGISTRY", DEFAULT_REGISTRY)
    if not Registry(registry, retries=0, timeout=5).ping():
        unavailable(f"registry {registry} is not answering (run `invoke engine.up`)")
    return registry


def copy_fixture(name: str, dest: Path, project_name: str | None = None) -> Path:
    """Copy a fixture project; give it a unique registry namespace if asked."""
    target = dest / name
    shutil.copytree(FIXTURES / name, target)
    if project_name:
        pf = target / "project.yaml"
        text = pf.read_text()
        first = next(line for line in text.splitlines() if line.startswith("project:"))
        pf.write_text(text.replace(first, f"project: {project_name}"))
    return target / "project.yaml"


def ready_mini(dest: Path, prefix: str = "orch-test", edit=None):
    """A copy of the mini fixture under a unique namespace, its bases pinned and its locks fresh.

    edit: called with the copy's directory before it is loaded and locked.
    """
    pf = copy_fixture("mini", dest, f"{prefix}-{uuid.uuid4().hex[:8]}")
    if edit is not None:
        edit(pf.parent)
    project = spec.load(pf)
    for platform in daemon.base_platforms(project):
        bases.ensure(project, platform, log=lambda *_: None)
    flow.lock(project, log=lambda *_: None)
    return project


@pytest.fixture(scope="session")
def release_key(tmp_path_factory):
    """A release key pair made for this session: the public key file, the private one, and the env CI would set."""
    d = tmp_path_factory.mktemp("release-key")
    signing.write_key_pair(d / "release.key", d / "release.pub")
    return SimpleNamespace(private=d / "release.key", public=d / "release.pub",
                           env={signing.ENV_KEY_FILE: str(d / "release.key")})


def trusting(public: Path):
    """An edit for ready_mini: the project commits this public key and lists it under trust.keys."""
    def edit(directory: Path) -> None:
        (directory / "keys").mkdir(exist_ok=True)
        shutil.copy(public, directory / "keys" / "release.pub")
        pf = directory / "project.yaml"
        pf.write_text(pf.read_text() + "trust:\n  keys: [keys/release.pub]\n")
    return edit


@pytest.fixture(scope="session")
def mini_project(engine_ready, tmp_path_factory, release_key):
    """The mini fixture under a unique namespace, locked, with a pinned base, trusting the session's release key.

    Everything it pushes or builds is deleted afterwards.
    """
    project = ready_mini(tmp_path_factory.mktemp("proj"), edit=trusting(release_key.public))
    yield project
    cleanup_namespace(project)


def by_key(results, platform: str = "linux/amd64"):
    return {(r.image.key, r.image.backend.name): r for r in results if r.image.platform == platform}


@pytest.fixture(scope="session")
def first_build(mini_project):
    """The mini fixture built and pushed once for the session."""
    return by_key(flow.build(mini_project, log=lambda *_: None))


@pytest.fixture(scope="session")
def published(mini_project, first_build, release_key):
    """The mini fixture published once for the session, with the smoke gate and signed, as CI runs it."""
    return flow.publish(mini_project, log=lambda *_: None, signer=signing.signer_from_environ(release_key.env))


@pytest.fixture(scope="session")
def local_images(mini_project, published):
    """Every variant the session published, pulled into the engine once and kept there until the
    namespace is cleaned up. A smoke pulls and then removes what was not local, so without these each
    run of images built on them (a changed app layer) would pull and unpack the shared layers again."""
    client = daemon.docker_client()
    for r in published.smoke:
        try:
            client.images.get(r.variant.image)
        except Exception:  # noqa: BLE001 - not local yet
            client.images.pull(r.variant.image, platform=r.variant.platform)
    return {(r.variant.service, r.variant.backend, r.variant.platform): r.variant.image for r in published.smoke}


@contextlib.contextmanager
def release_kept(project):
    """Put the project's registry tags and manifests/ files back as they were before the block.

    What a test's publish or build moved is restored by re-pushing the old manifests (their
    blobs are still in the registry) and old files, not by publishing again; tags the block
    added (content tags of images it built) are deleted unless a kept tag names the same digest.
    """
    reg = Registry(project.registry)
    repos = [f"{project.name}/{r}" for r in ("cuda-libs", *project.services)]
    saved = {name: {t: reg.get_manifest(name, t) for t in reg.tags(name)} for name in repos}
    files = project.root / "manifests"
    saved_files = {p: p.read_bytes() for p in files.glob("*")} if files.is_dir() else {}
    try:
        yield
    finally:
        for name, tags in saved.items():
            kept = {m.digest for m in tags.values()}
            for tag in reg.tags(name):
                now = reg.get_manifest(name, tag)
                old = tags.get(tag)
                if old is None and now is not None and now.digest not in kept:
                    reg.delete_manifest(name, now.digest)
            for tag, old in tags.items():
                now = reg.get_manifest(name, tag)
                if now is None or now.digest != old.digest:
                    reg.put_manifest(name, tag, old.body, old.media_type)
        if files.is_dir():
            for p in files.glob("*"):
                if p not in saved_files:
                    p.unlink()
        for p, data in saved_files.items():
            if not p.exists() or p.read_bytes() != data:
                p.write_bytes(data)


def cleanup_namespace(project) -> None:
    """Delete the project's tags from the registry and its local images."""
    reg = Registry(project.registry)
    client = daemon.docker_client()
    for repo in ["cuda-libs", *project.services]:  # the shared base stays: every test project pins the same one
        name = f"{project.name}/{repo}"
        digests = set()
        for tag in reg.tags(name):
            m = reg.get_manifest(name, tag)
            if m:
                digests.add(m.digest)
                if tag.startswith("sha256-"):  # a referrers index: its SBOM artifacts have no tag of their own
                    digests |= {c["digest"] for c in m.json.get("manifests") or []}
        for d in digests:
            reg.delete_manifest(name, d)
        for img in client.images.list(name=f"{project.registry}/{name}"):
            try:
                client.images.remove(img.id, force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
