"""Pinned, hashed requirement layers: the Python locks.

For every (backend, platform) the layers are resolved bottom-up with
`uv pip compile --generate-hashes`, each layer constrained by the pins of
the layers below it so versions agree, and each lock holding only the
packages its layer adds. The CUDA-libs lock is the nvidia-* (and triton)
subset of the torch resolution.

Every lock starts with a header holding the hash of its inputs, so
`lock --check` can name stale locks without resolving anything. Debian
system packages are locked next to them by orchestrator.debian.locks;
`invoke lock` (orchestrator.flow) runs both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import atomic_write
from orchestrator.project import compat as compat_mod
from orchestrator.project import sdists as sdist_mod
from orchestrator.project.lockfile import (APT_DIR_PREFIX, LOCK_DIR, LOCK_FORMAT, Lock, Pin, Stale, lock_path,  # noqa: F401
                                          parse_pins, read_lock, read_pins)
from orchestrator.project.spec import Backend, Project
from orchestrator.project.uv import run as _run_reaped
from orchestrator.project.uv import uv_binary as _uv
from orchestrator.project.uv import uv_env  # noqa: F401 - part of this stage's face


@dataclass(frozen=True)
class LayerInput:
    """What one lock is resolved from (all of it goes into the inputs hash)."""

    backend: str
    platform: str
    layer: str  # cuda-libs | torch | shared | service-<name>
    requirements: tuple[str, ...]  # requirement lines, or the .in file text
    source_file: str | None  # relative .in path, for annotations

    @property
    def arch(self) -> str:
        return self.platform.split("/")[1]


# --- parsing ---------------------------------------------------------------



# --- planning what to lock (pure) ------------------------------------------

def layer_inputs(project: Project, backend: Backend, platform: str) -> list[LayerInput]:
    """The layers of one (backend, platform), bottom-up."""
    out: list[LayerInput] = []
    compat = compat_mod.load()
    torch = backend.torch_for(platform)
    if torch is not None:
        extra = ()
        if backend.is_cuda:
            pins = compat.cuda_pins(torch, backend.cuda) or {}
            extra = tuple(f"{k}=={v}" for k, v in sorted(pins.items()))
        # The torch resolution is split into cuda-libs and torch below; the
        # compat pins are part of its inputs so a data change re-locks.
        out.append(LayerInput(backend.name, platform, "torch", (f"torch=={torch}",) + extra, None))
    elif backend.is_cuda:
        # Bare names get the version the compatibility data pins for this CUDA.
        known = compat.cuda_release_pins(backend.cuda)
        reqs = tuple(r if re.search(r"[=<>!~]", r) else f"{r}=={known[canonicalize_name(r)]}"
                     for r in project.cuda_libs.packages_for(backend.cuda))
        out.append(LayerInput(backend.name, platform, "cuda-libs", reqs, None))
    for name, path in project.layers.items():
        out.append(LayerInput(backend.name, platform, name, (path.read_text(),), os.path.relpath(path, project.root)))
    for svc in project.services.values():
        if backend.name in svc.backends and svc.requirements is not None:
            out.append(LayerInput(backend.name, platform, f"service-{svc.name}", (svc.requirements.read_text(),),
                                  os.path.relpath(svc.requirements, project.root)))
    return out


def expected_layers(project: Project, backend: Backend, platform: str) -> list[str]:
    """Lock names on disk for a backend on a platform, in install order."""
    names = []
    if backend.is_cuda:
        names.append("cuda-libs")
    if backend.torch_for(platform) is not None:
        names.append("torch")
    names += list(project.layers)
    names += [f"service-{s.name}" for s in project.services.values()
              if backend.name in s.backends and s.requirements is not None]
    return names


def inputs_hash(project: Project, backend: Backend, inp: LayerInput, lower: list[Lock]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "format": LOCK_FORMAT,
        "python": project.python,
        "platform": inp.platform,
        "layer": inp.layer,
        "requirements": inp.requirements,
        # As written and as this machine expands them: ${VAR} in a source changes what uv sees.
        "sources": [backend.sources.index_url, list(backend.sources.extra_index_urls),
                    list(backend.sources.find_links)],
        "expanded": [backend.sources.expanded().index_url, list(backend.sources.expanded().extra_index_urls),
                     list(backend.sources.expanded().find_links)],
        "resolver": UV_FLAGS,
        "lower": [hashlib.sha256("".join(p.block for p in lk.pins).encode()).hexdigest() for lk in lower],
    }, sort_keys=True).encode())
    allowed = sdist_mod.policy(project.allow_sdist, inp.layer)
    if allowed is not None:  # only then: locks of projects that refuse sdists (the default) keep their hash
        h.update(json.dumps({"allow_sdist": allowed}).encode())
    return h.hexdigest()


# --- resolving (effects: runs uv) ------------------------------------------

# No uv.toml, pyproject [tool.uv] or UV_* from the machine: a lock depends only
# on what its header hash covers (see uv_env). Changing these re-locks.
UV_FLAGS = ("--no-config", "--generate-hashes")




def _compile(project: Project, backend: Backend, inp: LayerInput, constraints: dict[str, str],
             preferences: tuple[Pin, ...] = ()) -> tuple[tuple[Pin, ...], tuple[str, ...]]:
    """The layer's pins, and the packages among them that come from an sdist (allow_sdist)."""
    compat = compat_mod.load()
    work = project.root / ".build" / "lock" / f"{backend.name}-{inp.arch}"
    work.mkdir(parents=True, exist_ok=True)
    if inp.source_file:
        req_arg = inp.source_file
    else:
        req_file = work / f"{inp.layer}.in"
        req_file.write_text("\n".join(inp.requirements) + "\n")
        req_arg = os.path.relpath(req_file, project.root)
    # uv reads an existing output file as preferences: unchanged inputs keep
    # their pins, so a bump in one layer does not move the others.
    out_file = work / f"{inp.layer}.out.txt"
    out_file.write_text("".join(p.block for p in preferences))
    cmd = [_uv(), "pip", "compile", req_arg, *UV_FLAGS, "--no-header", "--quiet",
           "--python-version", project.python, "--python-platform", compat.python_platform(inp.platform),
           "--output-file", os.path.relpath(out_file, project.root)]
    if constraints:
        cfile = work / f"{inp.layer}.constraints.txt"
        cfile.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
        cmd += ["--constraint", os.path.relpath(cfile, project.root)]
    cmd += backend.sources.index_args()
    # Wheels only, so a source-only dependency fails here and not at build time; a package the
    # project allows (allow_sdist) may come from its sdist where it has no usable wheel.
    sdists: list[str] = []
    while True:
        flags = ["--only-binary", ":all:", *[a for name in sdists for a in ("--no-binary", name)]]
        proc = _run_reaped(cmd + flags, cwd=project.root, env=uv_env())
        if proc.returncode == 0:
            return parse_pins(out_file.read_text()), tuple(sdists)
        missing = sdist_mod.missing_wheel(proc.stderr)
        if missing is None:
            break
        if missing[0] in sdists or not sdist_mod.allows(project.allow_sdist, missing[0], inp.layer):
            raise sdist_mod.refusal(missing[0], missing[1], inp.layer, inp.platform, project.file.name)
        sdists.append(missing[0])
    raise UserError(
        f"could not resolve layer {inp.layer!r} for backend {backend.name} on {inp.platform}:\n"
        + "\n".join("  " + line for line in proc.stderr.strip().splitlines()[-12:]),
        "check the requirement versions and the backend's index_url/find_links in the project file",
    )


def resolve_backend(project: Project, backend: Backend, platform: str,
                    previous: dict[str, tuple[Pin, ...]] | None = None, build_sdists=None) -> list[Lock]:
    """Resolve every layer of one (backend, platform), bottom-up.

    previous: the current pins by layer name, which uv prefers.
    build_sdists(backend, platform, pins, sdist names) -> pins: turns the sdists the project allows
    into built wheels (orchestrator.build.sdist, chained by orchestrator.flow); needed only when
    a layer resolves to one.
    Service layers are constrained by (and exclude) the base layers only,
    never by each other: each service image carries just its own layer.
    """
    compat = compat_mod.load()
    previous = previous or {}
    locks: list[Lock] = []
    base: list[Lock] = []  # cuda-libs, torch, shared: in every image of the backend
    pinned: dict[str, str] = {}
    for inp in layer_inputs(project, backend, platform):
        prefs = tuple(p for name in ((inp.layer, "cuda-libs") if inp.layer == "torch" else (inp.layer,))
                      for p in previous.get(name, ()))
        pins, sdists = _compile(project, backend, inp, pinned, prefs)
        if sdists:
            if build_sdists is None:
                raise EnvironmentProblem(f"{', '.join(sdists)} must be built from source for {platform}, and "
                                         "nothing was given to build it", "run `invoke lock`")
            pins = build_sdists(backend, platform, pins, sdists)
        if inp.layer == "torch":
            torch = backend.torch_for(platform)
            libs = tuple(p for p in pins if compat.is_cuda_libs_package(p.name)) if backend.is_cuda else ()
            rest = tuple(p for p in pins if p not in libs)
            if backend.is_cuda:
                missing = set(compat.cuda_pins(torch, backend.cuda) or {}) - {p.name for p in libs}
                if missing and platform == "linux/amd64":
                    raise UserError(f"torch {torch} resolved without {sorted(missing)} on {platform}",
                                    "the index served a torch build that does not match the compatibility data")
                base.append(Lock(backend.name, platform, "cuda-libs", inputs_hash(project, backend, inp, []), libs))
            base.append(Lock(backend.name, platform, "torch", inputs_hash(project, backend, inp, base), rest))
            locks += base[-2:] if backend.is_cuda else base[-1:]
        else:
            lk = Lock(backend.name, platform, inp.layer, inputs_hash(project, backend, inp, base),
                      tuple(p for p in pins if p.name not in pinned))
            locks.append(lk)
            if inp.layer.startswith("service-"):
                continue
            base.append(lk)
        pinned = {p.name: p.version for lk in base for p in lk.pins}
    return locks


def write_locks(project: Project, locks: list[Lock]) -> list[Path]:
    """Write locks atomically; return the paths whose content changed."""
    changed = []
    for lk in locks:
        path = lock_path(project.root, lk.backend, lk.platform, lk.layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = lk.text()
        if path.exists() and path.read_text() == text:
            continue
        atomic_write(path, text)
        changed.append(path)
    return changed


# --- checking (pure but for reading files) ---------------------------------


def targets(project: Project) -> list[tuple[Backend, str]]:
    return [(b, p) for b in project.backends.values() for p in b.platforms]


def load_locks(project: Project, backend: Backend, platform: str) -> list[Lock]:
    """Locks of one (backend, platform) in install order; raises if any is missing."""
    out = []
    for layer in expected_layers(project, backend, platform):
        path = lock_path(project.root, backend.name, platform, layer)
        lk = read_lock(path)
        if lk is None:
            why = "missing" if not path.exists() else "unreadable or edited by hand (its lock-sha256 does not match)"
            raise UserError(f"lock {os.path.relpath(path, project.root)} is {why}", "run `invoke lock`")
        out.append(lk)
    return out


def check(project: Project) -> list[Stale]:
    """Every Python lock whose recorded inputs hash differs from the current inputs, is missing or edited,
    and every lock file no target uses any more (apt locks: orchestrator.debian.locks.check)."""
    stale: list[Stale] = []
    for backend, platform in targets(project):
        inputs = {i.layer: i for i in layer_inputs(project, backend, platform)}
        lower: list[Lock] = []
        for layer in expected_layers(project, backend, platform):
            path = lock_path(project.root, backend.name, platform, layer)
            lk = read_lock(path)
            rel = Path(os.path.relpath(path, project.root))
            if lk is None:
                stale.append(Stale(rel, "missing" if not path.exists() else
                                   "unreadable or edited by hand (its lock-sha256 does not match)"))
                continue
            if layer == "cuda-libs" and backend.torch_for(platform) is not None:
                want = inputs_hash(project, backend, inputs["torch"], [])
            elif layer == "torch":
                want = inputs_hash(project, backend, inputs["torch"], lower)
            else:
                want = inputs_hash(project, backend, inputs[layer], lower)
            if lk.inputs_hash != want:
                stale.append(Stale(rel, "inputs changed since it was locked"))
            if not layer.startswith("service-"):
                lower.append(lk)
    # Locks on disk that no longer belong to any target (locks/apt-<arch>/ are orchestrator.debian.locks').
    wanted = {lock_path(project.root, b.name, p, layer) for b, p in targets(project)
              for layer in expected_layers(project, b, p)}
    for path in sorted((project.root / LOCK_DIR).glob("*/*.txt")):
        if path not in wanted and not path.parent.name.startswith(APT_DIR_PREFIX):
            stale.append(Stale(Path(os.path.relpath(path, project.root)), "no longer used by the project file"))
    return stale

