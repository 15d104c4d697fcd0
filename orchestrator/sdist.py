"""Source-only Python packages (`allow_sdist:`): refused by default, or built once into a wheel.

Every layer is resolved with `--only-binary :all:`, so a dependency
published only as a source distribution fails at `invoke lock`, not at
build time. The project may allow it (`allow_sdist: [name]` or `true`);
then uv may take that one package's sdist (`--no-binary name`, only where
no usable wheel exists), and `invoke lock`:

* downloads the sdist (pip, checked against the hash uv locked),
* builds it into a wheel in a container of the target platform's pinned
  base (arm64 under QEMU), with no network and no build isolation: the
  build backend is the base's own Debian setuptools and wheel, whose
  versions locks/base.json pins, and SOURCE_DATE_EPOCH fixes the zip times,
* caches the wheel under `<cache>/sdist-wheels/` by what made it (the
  sdist's sha256, the platform and the base), and
* writes the wheel's sha256 into the lock in place of the sdist's, with a
  comment naming the sdist, so builds install only that wheel
  (`--require-hashes --only-binary=:all:`, from the build context's
  wheelhouse). A machine without the cached wheel builds it again the same
  way and must get the same sha256.

The torch and CUDA-libs layers are never given this exception. Build-time
Debian packages (compilers, -dev headers) are not supported yet: an sdist
that needs more than the base's Python and setuptools fails to build, and
the error says so.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EnvironmentProblem, UserError
from .files import sha256_file

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
    from packaging.utils import canonicalize_name

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


# --- the lock record -------------------------------------------------------------

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


# --- building (effects: pip download, a container) ---------------------------------------

def cache_dir() -> Path:
    root = os.environ.get("ORCH_CACHE_DIR") or Path.home() / ".cache" / "orchestrator"
    return Path(root) / "sdist-wheels"


def _key(sdist_sha256: str, platform: str, base_config: str) -> str:
    return hashlib.sha256(f"sdist-wheel v1 {sdist_sha256} {platform} {base_config}".encode()).hexdigest()


def download(name: str, version: str, sdist_sha256: str, sources, dest: Path) -> Path:
    """The sdist, by pip from the backend's sources, checked against its locked sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "sdist.txt"
    req.write_text(f"{name}=={version} --hash=sha256:{sdist_sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), "-r", str(req)]
    cmd += sources.index_args()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.iterdir() if p.name != "sdist.txt" and sha256_file(p) == sdist_sha256]
    if proc.returncode != 0 or not found:
        raise EnvironmentProblem(f"cannot download the sdist of {name} {version} (sha256 {sdist_sha256[:12]}):\n"
                                 + proc.stderr.strip()[-1500:], "check the network and the backend's index")
    return found[0]


def build_wheel(sdist: Path, platform: str, base_ref: str, out: Path, log=print) -> Path:
    """Build sdist into a wheel in a container of the pinned base for platform (no network)."""
    from . import engine
    from .layers import SOURCE_DATE_EPOCH

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="orch-sdist-"))
    try:
        shutil.copy(sdist, work / sdist.name)
        client = engine.docker_client()
        try:
            client.images.get(base_ref)
        except Exception:  # noqa: BLE001 - not local yet
            client.images.pull(base_ref, platform=platform)
        script = ("python3 -m pip wheel --no-deps --no-build-isolation --no-binary :all: --no-index --no-cache-dir "
                  f"--disable-pip-version-check -q -w /work/out /work/{sdist.name}")
        log(f"[sdist] {platform}: building {sdist.name} into a wheel (the base's setuptools, "
            f"SOURCE_DATE_EPOCH={SOURCE_DATE_EPOCH}, no network)")
        container = client.containers.run(base_ref, ["sh", "-c", script], platform=platform, detach=True,
                                          network_disabled=True, volumes={str(work): {"bind": "/work", "mode": "rw"}},
                                          environment={"SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
                                                       "PYTHONHASHSEED": "0", "HOME": "/tmp"})
        try:
            code = container.wait(timeout=1800)["StatusCode"]
            logs = container.logs().decode(errors="replace")
        finally:
            container.remove(force=True)
        wheels = sorted((work / "out").glob("*.whl")) if (work / "out").is_dir() else []
        if code != 0 or len(wheels) != 1:
            raise EnvironmentProblem(
                f"building {sdist.name} into a wheel for {platform} failed (exit {code}):\n" + logs.strip()[-1500:],
                "the build uses only the base's python3, setuptools and wheel, without network: an sdist that "
                "needs a compiler, -dev headers or another build backend cannot be built yet; pin a version "
                "with wheels instead")
        target = out / wheels[0].name
        shutil.copy(wheels[0], target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_wheel(name: str, version: str, sdist_sha256: str, platform: str, base_ref: str, base_config: str,
                 sources, log=print, expect: str | None = None) -> tuple[Path, str]:
    """(the wheel, its sha256): from the cache, or built from the sdist; expect: the sha256 the lock records."""
    entry = cache_dir() / _key(sdist_sha256, platform, base_config)
    found = sorted(entry.glob("*.whl")) if entry.is_dir() else []
    if len(found) == 1:
        sha = sha256_file(found[0])
        if expect is None or sha == expect:
            return found[0], sha
    with tempfile.TemporaryDirectory(prefix="orch-sdist-dl-") as tmp:
        sdist = download(name, version, sdist_sha256, sources, Path(tmp))
        fresh = build_wheel(sdist, platform, base_ref, Path(tmp) / "wheel", log)
        sha = sha256_file(fresh)
        if expect is not None and sha != expect:
            raise EnvironmentProblem(f"the wheel built from the sdist of {name} {version} for {platform} has sha256 "
                                     f"{sha}, not the {expect} the lock records: the build is not reproducible "
                                     "here (another base, or a build that embeds the time or the machine)",
                                     "compare the two wheels; `invoke lock --upgrade` records this machine's build")
        if entry.exists():
            shutil.rmtree(entry)
        entry.mkdir(parents=True)
        shutil.copy(fresh, entry / fresh.name)
        log(f"[sdist] {platform}: {fresh.name} sha256 {sha[:12]} (cached)")
        return entry / fresh.name, sha
