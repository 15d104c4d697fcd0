"""A Debian base made from nothing: mmdebstrap with SOURCE_DATE_EPOCH in a fixed environment.

Its rootfs becomes one normalized layer (orchestrator.oci.layers) under a
config the tool writes (orchestrator.oci.image): no engine, no build time in
it, so the same Debian package versions give the same digest on any machine.
Also here: whether a bootstrap now would install exactly the pinned versions
(the archive "moved" or not), read from the archive's Packages indexes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.common.files import atomic_write
from orchestrator.common.hostinfo import host_arch
from orchestrator.debian import archive
from orchestrator.oci import image as image_mod
from orchestrator.oci import layers as layers_mod
from orchestrator.project.spec import Project

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def pin_moved(packages: tuple[str, ...], platform: str, suite: str) -> str | None:
    """None when a bootstrap now would install exactly these pinned package versions (name=version) (so, bootstraps being
    reproducible, give the pinned digest); else what moved. Reads the archive's Packages indexes."""
    try:
        index, _ = archive.fetch_index(archive.default_sources(suite), platform)
    except (EnvironmentProblem, UserError) as e:
        return f"the Debian archive could not be read ({e.message})"
    return packages_moved(packages, index)


def packages_moved(pinned: tuple[str, ...], index) -> str | None:
    """What a minbase bootstrap from index would install differently from the pinned name=version list:
    a pinned package whose newest version changed, or a new Essential or required package. None if nothing."""
    if not pinned:
        return "the pin lists no packages"
    want = dict(p.split("=", 1) for p in pinned)
    changes = []
    for name, version in sorted(want.items()):
        offered = index.versions(name)
        if not offered or offered[0].version != version:
            changes.append(f"{name} {version} -> {offered[0].version if offered else 'gone'}")
    for name in sorted(index.names()):
        newest = index.versions(name)[0]
        if name not in want and (newest.essential or newest.priority == "required"):
            changes.append(f"{name} - -> {newest.version} (required)")
    if not changes:
        return None
    return "the Debian archive moved: " + ", ".join(changes[:5]) + (
        f" and {len(changes) - 5} more" if len(changes) > 5 else "")


def _diff_packages(old: tuple[str, ...], new: tuple[str, ...]) -> str:
    o = dict(p.split("=", 1) for p in old)
    n = dict(p.split("=", 1) for p in new)
    changes = [f"{k} {o.get(k, '-')} -> {n.get(k, '-')}" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
    return ", ".join(changes[:5]) + (f" and {len(changes) - 5} more" if len(changes) > 5 else "") or "same packages"


def archive_state(suite: str, platform: str) -> str | None:
    """What a bootstrap of suite for platform installs from: the Packages indexes' sha256 in each source's
    InRelease (they change when a package does, not when the archive re-signs). None when unreadable."""
    dl = archive.Downloader(retries=2, timeout=20, backoff=1.0)
    arch = archive.debian_arch(platform)
    h = hashlib.sha256()
    try:
        for src in archive.default_sources(suite):
            rel = archive.parse_release(archive._clearsigned_body(
                dl.get(f"{src.url.rstrip('/')}/dists/{src.suite}/InRelease").decode("utf-8", "replace")))
            h.update(f"{src} {archive._packages_entry(rel, 'main', arch)[1]}\n".encode())
    except (EnvironmentProblem, UserError):
        return None
    return h.hexdigest()


# What would otherwise come from the machine mmdebstrap runs on. It copies the
# host's /etc/hostname and /etc/resolv.conf (content and mode) into the chroot
# for debootstrap compatibility; an engine mounts its own over both at run
# time, so the base has neither. And it hands its environment to every
# maintainer script: with PYTHONDONTWRITEBYTECODE unset, python3 imports done
# by py3compile itself (debpython, _distutils_hack) leave timestamp .pyc files
# that py3compile then keeps, where with it set py3compile writes them all
# hash-checked (SOURCE_DATE_EPOCH); locale and TZ can change what scripts sort
# or print. So the environment is fixed here, and the umask too.
BOOTSTRAP_HOOKS = ('rm -f "$1/etc/hostname" "$1/etc/resolv.conf"',)


_BOOTSTRAP_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C.UTF-8", "TZ": "UTC"}


def _bootstrap_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "LC_")) and k not in ("LANG", "LANGUAGE", "TZ")}
    return dict(env, SOURCE_DATE_EPOCH=str(layers_mod.SOURCE_DATE_EPOCH), **_BOOTSTRAP_ENV)


def bootstrap(project: Project, platform: str, cache: layers_mod.BlobCache, log=print) -> tuple[image_mod.Image, tuple[str, ...]]:
    """mmdebstrap a rootfs and make it a one-layer image; returns (image, package versions)."""
    if not shutil.which("mmdebstrap"):
        raise EnvironmentProblem("mmdebstrap is not installed", "apt-get install mmdebstrap arch-test (or run ci/setup.sh)")
    arch = platform.split("/")[1]
    b = project.base
    c = layers_mod.codec(project.compression)
    env = _bootstrap_env()
    with tempfile.TemporaryDirectory(prefix="orch-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        log(f"[base] bootstrapping {b.suite} for {platform} with mmdebstrap "
            f"({'about 30 s' if arch == host_arch() else 'minutes: maintainer scripts run under QEMU'})")
        started = time.monotonic()
        cmd = ["mmdebstrap", "--quiet", "--variant=minbase", f"--arch={arch}", f"--include={','.join(b.include)}",
               *(f"--customize-hook={h}" for h in BOOTSTRAP_HOOKS), b.suite, str(rootfs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, umask=0o022)
        if proc.returncode != 0:
            raise EnvironmentProblem(f"mmdebstrap failed for {platform}:\n" + proc.stderr[-2000:],
                                     "foreign architectures need arch-test and qemu-user-static (ci/setup.sh)")
        log(f"[base] {platform}: mmdebstrap took {time.monotonic() - started:.0f} s")
        packages = _packages(rootfs)
        layer = layers_mod.write_layer_from_file(rootfs, cache, c)
    settings = image_mod.Settings(env=(("PATH", BASE_PATH),), cmd=("python3",),
                                  labels=(("org.opencontainers.image.title", f"Debian {b.suite} base"),))
    recipe = (f"mmdebstrap --variant=minbase --include={','.join(sorted(b.include))} "
              + "".join(f"--customize-hook='{h}' " for h in BOOTSTRAP_HOOKS) + b.suite)
    cfg = image_mod.config(None, platform, (layer,), settings, (recipe,))
    atomic_write(cache.blob_path(image_mod.digest_of(cfg)), cfg)  # a reader never sees half a config
    return image_mod.Image(platform, (layer,), cfg), packages


def _packages(rootfs: Path) -> tuple[str, ...]:
    with tarfile.open(rootfs) as tf:
        for m in tf:
            if m.name.lstrip("./") == "var/lib/dpkg/status":
                text = tf.extractfile(m).read().decode()
                break
        else:
            return ()
    out = []
    for para in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in para.splitlines() if ": " in line and not line.startswith(" "))
        if "Package" in fields and "installed" in fields.get("Status", ""):
            out.append(f"{fields['Package']}={fields['Version']}")
    return tuple(sorted(out))


