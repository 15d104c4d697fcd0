"""Wheels built from the source distributions a project allows (policy: orchestrator.project.sdists).

`invoke lock`:

* downloads the sdist (pip, checked against the hash uv locked),
* builds it into a wheel in a container of the target platform's pinned
  base (arm64 under QEMU), with no network and no build isolation: the
  build backend is the base's own Debian setuptools and wheel, whose
  versions locks/base.json pins, and SOURCE_DATE_EPOCH fixes the zip times,
* caches the wheel under `<cache>/sdist-wheels/` by what made it (the
  sdist's sha256, the platform and the base).

Builds install only that wheel (`--require-hashes --only-binary=:all:`,
from the build context's wheelhouse). A machine without the cached wheel
builds it again the same way and must get the same sha256. Build-time
Debian packages (compilers, -dev headers) are not supported yet: an sdist
that needs more than the base's Python and setuptools fails to build, and
the error says so.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from orchestrator.common import places
from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import sha256_file
from orchestrator.machine import daemon
from orchestrator.oci.layers import SOURCE_DATE_EPOCH
from orchestrator.project.lockfile import Lock, Pin
from orchestrator.project.sdists import HASH_RE, Built, record, recorded

# --- the lock record -------------------------------------------------------------


# --- building (effects: pip download, a container) ---------------------------------------

def cache_dir() -> Path:
    return places.cache_root("sdist-wheels")


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
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="orch-sdist-"))
    try:
        shutil.copy(sdist, work / sdist.name)
        client = daemon.docker_client()
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


# --- what `invoke lock` and `invoke build` ask of this module ------------------------

def pin_built_wheels(pins: tuple[Pin, ...], sdists: tuple[str, ...], platform: str, base, sources,
                     log=print) -> tuple[Pin, ...]:
    """pins, with each allowed sdist built into a wheel (once per sdist, platform and base) and that wheel pinned.

    base: the platform's base in the registry (orchestrator.build.bases.Base), the wheels' build environment.
    """
    out = []
    for pin in pins:
        if pin.name not in sdists:
            out.append(pin)
            continue
        hashes = HASH_RE.findall(pin.block)
        if len(hashes) != 1:
            raise UserError(f"{pin.name} {pin.version}: expected the one sdist hash uv locks for a source-only "
                            f"package, found {len(hashes)}", "report this: the sdist policy cannot pick the file")
        wheel, sha = ensure_wheel(pin.name, pin.version, hashes[0], platform, base.ref, base.image.config_digest,
                                  sources, log=log)
        out.append(Pin(pin.name, pin.version, record(pin.block, Built(hashes[0], wheel.name, sha))))
    return tuple(out)


def built_wheels(locks: list[Lock], platform: str, base, sources, log=print) -> list[Path]:
    """The wheels the locks pin that `invoke lock` built from sdists: from the cache, or built again
    the same way (on base, for platform) and checked against the lock's sha256."""
    pinned = [(p, recorded(p.block)) for lk in locks for p in lk.pins]
    return [ensure_wheel(p.name, p.version, b.sdist_sha256, platform, base.ref, base.image.config_digest,
                         sources, log=log, expect=b.wheel_sha256)[0] for p, b in pinned if b is not None]


def needs_wheels(locks: list[Lock]) -> bool:
    """Whether any of these locks pins a wheel `invoke lock` built from an sdist."""
    return any(recorded(p.block) is not None for lk in locks for p in lk.pins)
