"""The build context of one image: the files a Dockerfile of dockerfiles/ builds from.

Its locks (the tool installs each into its layers, orchestrator.build.pydeps),
the wheels the locks pin from a local find-links directory or built from an
sdist (the wheelhouse, uv's --find-links), the service's code and the
runtime contract (host/runtime/). The digest of everything but the
wheelhouse goes into the image's content tag.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from orchestrator.build.plan import ImagePlan, tree_digest
from orchestrator.project.spec import Project


def _local_wheels(project: Project, image: ImagePlan) -> list[Path]:
    """Wheels from the backend's local find-links that the image's locks pin."""
    wanted = {(p.name, p.version) for s in image.layers for p in s.lock.pins}
    found = []
    for d in image.backend.sources.expanded().find_links:
        path = Path(d.removeprefix("file://"))
        if not path.is_dir():
            continue
        for whl in sorted(path.glob("*.whl")):
            try:
                name, version, _, _ = parse_wheel_filename(whl.name)
            except Exception:  # noqa: BLE001 - a stray file is not our business
                continue
            if (canonicalize_name(name), str(version)) in wanted:
                found.append(whl)
    return found


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_context(project: Project, image: ImagePlan, dockerfile: str, wheels=()) -> tuple[Path, str]:
    """Write the build context for one image; return (dir, digest of its inputs).

    wheels: built from sdists by `invoke lock` (orchestrator.build.sdist.built_wheels), staged with the
    find-links ones. The directory is private to this process, so two builds in one checkout do not
    delete each other's context; `build` removes it when done.
    """
    ctx = project.root / ".build" / "ctx" / f"{image.key}-{image.backend.name}-{image.arch}-{os.getpid()}"
    if ctx.exists():
        shutil.rmtree(ctx)
    try:
        return _fill_context(project, image, dockerfile, ctx, wheels)
    except BaseException:  # Ctrl-C halfway through a copy leaves no context behind
        shutil.rmtree(ctx, ignore_errors=True)
        raise


def _fill_context(project: Project, image: ImagePlan, dockerfile: str, ctx: Path, wheels) -> tuple[Path, str]:
    (ctx / "locks").mkdir(parents=True)
    (ctx / "wheelhouse").mkdir()
    for stage in image.layers:
        (ctx / stage.context_lock).write_text(stage.lock.text())
    for system in image.system:  # not used by the Dockerfile: they put the pins into the content tag
        (ctx / system.context_lock).write_text(system.context_text())
    for whl in _local_wheels(project, image):
        _link_or_copy(whl, ctx / "wheelhouse" / whl.name)
    # Wheels `invoke lock` built from allowed sdists: pinned by their sha256 like any other.
    for whl in wheels:
        _link_or_copy(whl, ctx / "wheelhouse" / whl.name)
    if image.service is not None:
        shutil.copytree(image.service.path, ctx / "app", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        runtime = ctx / "runtime"
        runtime.mkdir()
        for f in resources.files("orchestrator").joinpath("host/runtime").iterdir():
            if f.name.endswith(".py"):
                (runtime / f.name).write_bytes(f.read_bytes())
    digest = tree_digest(ctx, skip=("wheelhouse",))
    (ctx / "Dockerfile").write_text(dockerfile)
    (ctx / ".dockerignore").write_text("Dockerfile\n.dockerignore\n")
    return ctx, digest

