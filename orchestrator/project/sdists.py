"""Source-only Python packages (`allow_sdist:`): the policy, and how a lock records a wheel built from one.

Every layer is resolved with `--only-binary :all:`, so a dependency
published only as a source distribution fails at `invoke lock`, not at
build time. The project may allow it (`allow_sdist: [name]` or `true`);
then uv may take that one package's sdist (`--no-binary name`, only where
no usable wheel exists), `invoke lock` builds it into a wheel once
(orchestrator.build.sdist) and the lock pins that wheel's sha256 in place of
the sdist's, with a comment naming the sdist. The torch and CUDA-libs layers
are never given this exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from packaging.utils import canonicalize_name

from orchestrator.common.errors import UserError

WHEEL_ONLY_LAYERS = ("torch", "cuda-libs")


# uv's words when a package has no wheel it may use (uv 0.4+; checked against 0.13).
_REQUIRED_RE = re.compile(r"Wheels are required for `([^`]+)`")


_NO_WHEELS_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) has no usable wheels")


MARKER_RE = re.compile(r"^    # sdist ([0-9a-f]{64}) built by `invoke lock` into (\S+\.whl)$", re.M)


HASH_RE = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def allows(allow_sdist, name: str, layer: str) -> bool:
    """May this package come from its sdist in this layer? (never in the torch and CUDA-libs layers)"""
    if layer in WHEEL_ONLY_LAYERS:
        return False
    return allow_sdist is True or (isinstance(allow_sdist, tuple) and name in allow_sdist)


def policy(allow_sdist, layer: str):
    """What the lock inputs hash records: None for the default (refuse), so default locks keep their hash."""
    if layer in WHEEL_ONLY_LAYERS or allow_sdist is False or allow_sdist == ():
        return None
    return True if allow_sdist is True else list(allow_sdist)


def missing_wheel(stderr: str) -> tuple[str, str | None] | None:
    """(package, version or None) when uv failed because a package has no usable wheel."""
    m = _REQUIRED_RE.search(stderr)
    if not m:
        return None
    name = canonicalize_name(m.group(1))
    version = next((v for n, v in _NO_WHEELS_RE.findall(stderr) if canonicalize_name(n) == name), None)
    return name, version


def refusal(name: str, version: str | None, layer: str, platform: str, project_file: str) -> UserError:
    what = f"{name} {version}" if version else f"every version of {name} that fits"
    if layer in WHEEL_ONLY_LAYERS:
        return UserError(f"{what} has no wheel for {platform}, and the {layer} layer installs wheels only",
                         f"pin versions that publish wheels for {platform} (allow_sdist does not apply to {layer})")
    return UserError(f"{what} is published only as a source distribution for {platform} (no wheel uv can use), "
                     f"and {project_file} builds from wheels only (layer {layer})",
                     f"add `allow_sdist: [{name}]` to {project_file} to build it into a wheel once at `invoke lock`, "
                     f"or require a version of {name} that publishes wheels")


@dataclass(frozen=True)
class Built:
    """A wheel made from an sdist, as the lock records it."""

    sdist_sha256: str
    wheel: str  # file name
    wheel_sha256: str


def record(block: str, built: Built) -> str:
    """A lock block that pins the built wheel (its only hash) and names the sdist it came from."""
    first, *rest = block.splitlines()
    comments = [line for line in rest if line.strip().startswith("#")]
    name_version = first.split()[0]
    return (f"{name_version} \\\n    --hash=sha256:{built.wheel_sha256}\n"
            f"    # sdist {built.sdist_sha256} built by `invoke lock` into {built.wheel}\n"
            + "".join(c + "\n" for c in comments))


def recorded(block: str) -> Built | None:
    """The built wheel a lock block pins, or None for a block of published files."""
    m = MARKER_RE.search(block)
    if not m:
        return None
    hashes = HASH_RE.findall(block.split("\n    #", 1)[0])
    return Built(m.group(1), m.group(2), hashes[0]) if len(hashes) == 1 else None
