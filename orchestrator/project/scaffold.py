"""`orchestrator init`: a starting project file for a directory of services.

One service per directory that has an `app.py` (or any directory, given a
command), the CPU backend and one CUDA line: the newest line the
compatibility data knows, with the newest torch built for it (or no torch:
then the line's CUDA runtime wheel alone). The result is an ordinary project
file: it loads, and after its first `orchestrator lock` it passes
`lock --check`. An existing project file is never overwritten.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

from orchestrator.common.errors import UserError
from orchestrator.common.files import atomic_write
from orchestrator.project import compat as compat_mod
from orchestrator.project import spec
from orchestrator.project.spec import DEFAULT_BASE_IMAGE, DEFAULT_BOOTSTRAP_INCLUDE, DEFAULT_REGISTRY, NAME_RE

PROJECT_FILE = "project.yaml"
APP_FILE = "app.py"
# A service's own requirements file, if it has one, seeds the .in file init writes.
SERVICE_REQUIREMENTS = ("requirements.in", "requirements.txt")


@dataclass(frozen=True)
class FoundService:
    name: str
    path: str  # relative to the project root, posix
    command: tuple[str, ...]
    requirements: Path | None  # the service's own requirements file, to seed the .in file from


@dataclass(frozen=True)
class Scaffold:
    """What init writes: relative path -> text, the project file first."""

    files: dict[str, str]
    services: tuple[FoundService, ...]


def name_from(text: str) -> str:
    """A directory name as a project or service name (lower-case letters, digits and . _ -)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    name = re.sub(r"[._-]{2,}", "-", name).strip("._-")
    return name


def _relative(path: Path, root: Path) -> str:
    """path as the project file writes it: relative to the project directory (../ where it lies outside)."""
    return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def find_services(root: Path, services_dir: str, command: tuple[str, ...] | None) -> list[FoundService]:
    """Each directory under services_dir with an app.py (or every directory, when a command is given)."""
    base = (root / services_dir).resolve()  # relative to the project directory
    if not base.is_dir():
        raise UserError(f"{services_dir}: no such directory (from {root})",
                        "pass --services DIR: the directory whose subdirectories are the services")
    if not base.is_relative_to(root.resolve()):
        raise UserError(f"{base} is outside the project directory {root.resolve()}: images are built from files "
                        "inside it", "run init in a directory above the services (--directory), or copy them in")
    found = []
    for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        has_app = (d / APP_FILE).is_file()
        if not has_app and not command:
            continue
        name = name_from(d.name)
        if not NAME_RE.match(name) or name in ("base", "cuda-libs"):
            raise UserError(f"{d}: {d.name!r} cannot be a service name (lower-case letters, digits and . _ -)",
                            "rename the directory")
        own = next((d / f for f in SERVICE_REQUIREMENTS if (d / f).is_file()), None)
        found.append(FoundService(name, _relative(d, root), command or ("python3", APP_FILE),
                                  own.resolve() if own else None))
    names = [s.name for s in found]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise UserError(f"{services_dir}: several directories become the service name(s) {dup}",
                        "rename the directories so their names differ")
    if not found:
        raise UserError(f"no service in {services_dir}: none of its directories has an {APP_FILE}",
                        f"add an {APP_FILE} to each service's directory, or pass --command 'python3 -m ...' "
                        "to take every directory as a service")
    return found


def default_cuda(compat) -> tuple[str, str | None]:
    """(the newest CUDA line, the newest torch built for it) from the compatibility data."""
    line = compat.cuda_versions()[-1]
    torches = [t for t in compat.torch_versions() if compat.cuda_pins(t, line)]
    return line, (max(torches, key=Version) if torches else None)


def runtime_wheel(compat, line: str) -> str:
    """The CUDA runtime wheel of a line (what a torch-less CUDA-libs image holds): nvidia-cuda-runtime[-cu12]."""
    names = sorted(n for n in compat.cuda_release_pins(line) if canonicalize_name(n).startswith("nvidia-cuda-runtime"))
    if not names:
        raise UserError(f"the compatibility data names no CUDA runtime wheel for CUDA {line}",
                        "pass --no-cuda, or add the line's pins to orchestrator/data/compat.yaml")
    return names[0]


def _yaml_list(items) -> str:
    return "[" + ", ".join(_scalar(i) for i in items) + "]"


def _scalar(value: str) -> str:
    # Plain when YAML reads it back as the same string; quoted otherwise ("8000", "-m", "a: b").
    if re.fullmatch(r"[A-Za-z_/][A-Za-z0-9_./:-]*", value) and not value.endswith(":") and value.lower() not in (
            "true", "false", "null", "yes", "no", "on", "off", "~"):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make(root: Path, services: list[FoundService], name: str, registry: str = DEFAULT_REGISTRY, port: int = 8000,
         cuda: bool = True, torch: bool = True) -> Scaffold:
    """The project file and requirement files for these services (pure: nothing is read but the compat data)."""
    compat = compat_mod.load()
    line, line_torch = default_cuda(compat)
    use_torch = torch and line_torch is not None
    lines = [
        "# Written by `orchestrator init`; edit freely. The keys are described in the",
        "# orchestrator README; `orchestrator lock` pins every requirement layer.",
        "schema: 1",
        f"project: {name}",
        'version: "0.1.0"',
        f"registry: {_scalar(registry)}",
        'python: "3.11"                   # the python3 of the Debian bookworm base below',
        "platforms: [linux/amd64]         # add linux/arm64 for arm64 hosts (see the compatibility data for torch)",
        "",
        "base:",
        f"  image: {DEFAULT_BASE_IMAGE}",
        "  bootstrap:",
        "    suite: bookworm",
        "    when: always                 # mmdebstrap makes the same base anywhere, Docker Hub or not",
        f"    include: {_yaml_list(DEFAULT_BOOTSTRAP_INCLUDE)}",
        "",
    ]
    if cuda and not use_torch:
        lines += ["cuda_libs:",
                  "  revision: 1",
                  "  packages:                      # without torch, the CUDA-libs image holds these wheels",
                  f'    "{line}": [{runtime_wheel(compat, line)}]',
                  ""]
    lines += ["backends:",
              "  # Hosts take the CUDA line when their driver and GPUs support it, else cpu."]
    if cuda:
        lines += ["  cuda:",
                  f'    cuda: "{line}"                 # the newest CUDA line in the compatibility data',
                  f'    torch: "{line_torch}"' if use_torch else "    torch: null"]
    lines += ["  cpu:"]
    if use_torch:
        # PyPI's x86_64 torch is a CUDA build; the CPU build is on the PyTorch CPU index.
        lines += [f'    torch: "{line_torch}+cpu"',
                  '    extra_index_urls: ["${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"]',
                  '    find_links: ["${PIP_FIND_LINKS:-}"]   # or a local wheelhouse']
    else:
        lines += ["    torch: null"]
    lines += ["", "services:"]
    files: dict[str, str] = {}
    for s in services:
        req = f"requirements/{s.name}.in"
        lines += [f"  {s.name}:",
                  f"    path: {_scalar(s.path)}",
                  f"    requirements: {req}",
                  f"    command: {_yaml_list(s.command)}",
                  f"    port: {port}                     # the image sets SERVICE_PORT to this"]
        seed = s.requirements.read_text() if s.requirements else ""
        files[req] = (f"# {s.name}'s Python requirements, one per line (name, name==version, name>=version);\n"
                      "# `orchestrator lock` pins them, with hashes, for every backend and platform.\n"
                      + (f"# From {_relative(s.requirements, root)}:\n{seed}" if seed.strip() else ""))
    return Scaffold({PROJECT_FILE: "\n".join(lines) + "\n", **files}, tuple(services))


def refuse_existing(root: Path) -> Path:
    """The project file init would write; a UserError (exit 2) when one is there already."""
    target = root / PROJECT_FILE
    if target.exists():
        raise UserError(f"{target} already exists; init never overwrites a project file",
                        "edit it, or move it away (or pass another directory) and run init again")
    return target


def write(root: Path, scaffold: Scaffold) -> list[Path]:
    """Write the scaffold under root and load it back; returns what was written.

    Refuses an existing project file (exit 2) and keeps existing requirement
    files (the project file names them as they are). The project file is
    written last and must load: if it does not (a seeded requirements file
    uses what a lock cannot take), everything written is removed again.
    """
    target = refuse_existing(root)
    written = []
    try:
        for rel, text in [*[(r, t) for r, t in scaffold.files.items() if r != PROJECT_FILE],
                          (PROJECT_FILE, scaffold.files[PROJECT_FILE])]:
            path = root / rel
            if rel != PROJECT_FILE and path.exists():
                continue
            atomic_write(path, text)
            written.append(path)
        spec.load(target)
    except BaseException:
        for path in reversed(written):
            path.unlink(missing_ok=True)
        raise
    return written
