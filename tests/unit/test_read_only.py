"""Service containers run with a read-only root: only the declared dirs take writes."""

from __future__ import annotations

from orchestrator.debian import locks as apt_locks
from orchestrator.host import launch
from orchestrator.build import plan as plan_mod
from orchestrator.release import smoke
from orchestrator.release.smoke import runner
from orchestrator.project import spec
from orchestrator.flow import load_all_locks

from ..conftest import ROOT
from .test_gpu_request import MANIFEST, NVIDIA_INFO, engine_with, variant  # noqa: F401 - engine_with is a fixture


def service_settings():
    example = spec.load(ROOT / "project.yaml")
    image = next(i for i in plan_mod.make_plan(example, load_all_locks(example),
                                               system=apt_locks.load_apt_locks(example)).images if i.kind == "service")
    return plan_mod.settings(image, "orchestrator/base-bookworm", "sha256:" + "0" * 64)


def test_the_image_declares_its_writable_dirs_and_points_temp_files_there():
    s = service_settings()
    assert dict(s.labels)["io.orchestrator.writable-dirs"] == "/tmp /home/app"
    env = dict(s.env)
    assert env["TMPDIR"] == "/tmp" and env["HOME"] == "/home/app"
    assert s.user == f"{plan_mod.APP_UID}:{plan_mod.APP_UID}"  # non-root


def test_run_options_mount_a_tmpfs_on_each_declared_dir_and_nothing_else_is_writable():
    opts = plan_mod.run_options()
    assert opts["read_only"] is True
    assert set(opts["tmpfs"]) == set(plan_mod.WRITABLE_DIRS)
    assert f"uid={plan_mod.APP_UID}" in opts["tmpfs"][plan_mod.HOME_DIR]  # the service user owns its home


def test_smoke_and_run_start_containers_the_same_read_only_way(engine_with):
    c = runner._container(variant(), {}, smoke.gpu_for(variant(), False))
    assert c._kwargs["read_only"] is True and c.tmpfs == plan_mod.run_options()["tmpfs"]
    client = engine_with(NVIDIA_INFO, [None])
    launch.launch(client, MANIFEST, "linux/amd64", 8080, "orch-t", override="cpu", log=lambda *_: None, environ={})
    (_, kw), = client.containers.runs
    assert kw["read_only"] is True and kw["tmpfs"] == plan_mod.run_options()["tmpfs"]
