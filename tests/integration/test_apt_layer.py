"""System packages against the real Debian archive (needs deb.debian.org; not the engine, though the arm64
sysroot takes the pinned base from the registry where the local blob cache lacks it).

ffmpeg is resolved for bookworm amd64 and arm64 on top of the pinned base
(locks/base.json), the amd64 layer is built twice from cold caches and must
give the same digest, and the binaries in it run: ffmpeg on this amd64 host
with the fragment's libraries, and the arm64 one under qemu-aarch64 in a
sysroot of the pinned arm64 base (as `invoke engine.up` left it) with the
layer unpacked over it. Indexes and the arm64 .debs are cached in
the usual cache (ORCH_CACHE_DIR or ~/.cache/orchestrator/apt) between runs;
the two amd64 builds download everything into their own empty caches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.debian import aptlock

from orchestrator.debian import archive as debian_archive
from orchestrator.debian import layer as apt_layer
from orchestrator.oci import layers

from ..conftest import ROOT, unavailable

SUITE = "bookworm"
PLATFORMS = ("linux/amd64", "linux/arm64")
TRIPLET = {"linux/amd64": "x86_64-linux-gnu", "linux/arm64": "aarch64-linux-gnu"}
ELF_MACHINE = {"linux/amd64": 62, "linux/arm64": 183}  # EM_X86_64, EM_AARCH64


def log(msg: str) -> None:
    print(msg)  # shown with -s: the sizes and times the report quotes


@pytest.fixture(scope="module")
def archive():
    import requests

    url = f"{debian_archive.DEFAULT_MIRROR}/dists/{SUITE}/InRelease"
    try:
        requests.head(url, timeout=15, verify=debian_archive.ca_verify()).raise_for_status()
    except requests.RequestException as e:
        unavailable(f"the Debian archive is not reachable ({url}: {type(e).__name__})")


@pytest.fixture(scope="module")
def base_packages():
    pins = json.loads((ROOT / "locks" / "base.json").read_text())["platforms"]
    return {p: aptlock.installed_from_base(pins[p]["packages"]) for p in PLATFORMS}


@pytest.fixture(scope="module")
def ffmpeg_locks(archive, base_packages):
    out = {}
    for platform in PLATFORMS:
        started = time.monotonic()
        lk, res = aptlock.make_lock(["ffmpeg"], platform, base_packages[platform], suite=SUITE, log=log)
        log(f"[test] {platform}: ffmpeg resolves to {len(lk.pins)} packages, "
            f"{sum(p.size for p in lk.pins) / 1e6:.1f} MB of .debs, in {time.monotonic() - started:.1f} s")
        out[platform] = (lk, res)
    return out


def test_ffmpeg_resolves_on_top_of_the_base_for_both_platforms(ffmpeg_locks, base_packages):
    for platform, (lk, res) in ffmpeg_locks.items():
        arch = platform.split("/")[1]
        names = lk.names()
        assert {"ffmpeg", "libavcodec59", "libavformat59", "libswresample4"} <= names
        assert {p.architecture for p in lk.pins} <= {arch, "all"}
        # Nothing the base already has at a good version is pinned again.
        assert all(any(n in note for note in res.notes) for n in names & set(base_packages[platform]))
        assert all(p.url.startswith(("http://deb.debian.org/debian/pool/",
                                     "http://deb.debian.org/debian-security/pool/")) for p in lk.pins)
        assert [s.source.suite for s in lk.snapshots] == [SUITE, f"{SUITE}-updates", f"{SUITE}-security"]
        if shutil.which("gpgv") and Path(debian_archive.DEFAULT_KEYRING).is_file():
            assert all(s.signature.startswith("gpgv ") for s in lk.snapshots), lk.snapshots
        assert aptlock.parse_apt_lock(lk.text()) == lk
        assert aptlock.stale_reason(lk, ["ffmpeg"], debian_archive.default_sources(SUITE), platform,
                                base_packages[platform]) is None


def test_an_unknown_package_fails_at_lock_time_naming_suite_and_platform(archive, base_packages):
    from orchestrator.common.errors import UserError

    with pytest.raises(UserError, match=r"'no-such-package-xyz' is not available in Debian bookworm for linux/arm64"):
        aptlock.make_lock(["ffmpeg", "no-such-package-xyz"], "linux/arm64", base_packages["linux/arm64"], suite=SUITE)


def scratch_dir(fallback: Path, prefix: str) -> Path:
    """A directory for about a gigabyte of unpacked packages, deleted by the caller. In memory where the machine
    has a tmpfs at /dev/shm (Debian's default) with room: writing and deleting it is then no disk work."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 << 30:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _build(lk: aptlock.AptLock, root: Path, apt_cache: Path | None = None) -> apt_layer.AptLayer:
    cache = layers.BlobCache(root / "blobs")
    return apt_layer.build_layer(lk, cache, layers.codec("gzip"), apt_cache=apt_cache or root / "apt", log=log)


def _extract(layer: layers.Layer | Path, dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(layer.path if isinstance(layer, layers.Layer) else layer, "r:gz") as tf:
        names = tf.getnames()
        # Absolute symlinks stay as they are: they are the image's paths. (Python < 3.11.4, Debian 12's
        # 3.11.2, has no extraction filters and extracts that way by default.)
        tf.extractall(dest, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    return names


def pinned_base_blobs(platform: str, scratch: Path) -> list[Path]:
    """The layer blobs (gzip) of the base locks/base.json pins, from what `invoke engine.up` left on this
    machine: the local blob cache, else the registry. The same places orchestrator/build/bases.py's
    ensure() looks before it would bootstrap; nothing is bootstrapped here."""
    from orchestrator.build import bases
    from orchestrator.debian.basepin import read_pins, repository
    from orchestrator.oci.registry import Registry, split_ref
    from orchestrator.project import spec

    project = spec.load(ROOT / "project.yaml")
    pin = read_pins(project).get(platform)
    if pin is None:
        unavailable(f"locks/base.json pins no base for {platform} (run `invoke engine.up`)")
    gz = layers.codec("gzip")
    img = bases._from_cache(pin, layers.default_cache(), gz)
    if img is not None:
        return [layer.path for layer in img.layers]
    reg = Registry(project.registry)
    _, name, _ = split_ref(repository(project) + ":x")
    img = reg.ping() and bases._from_registry(reg, name, pin, gz)
    if not img:
        unavailable(f"the pinned {platform} base is neither in the blob cache nor in {project.registry} "
                    "(run `invoke engine.up`)")
    scratch.mkdir(parents=True, exist_ok=True)
    blobs = []
    for layer in img.layers:
        blobs.append(scratch / layer.digest.split(":")[1])
        blobs[-1].write_bytes(reg.get_blob(name, layer.digest))
    return blobs


def _lib_dirs(root: Path) -> list[str]:
    return sorted({str(p.parent) for p in root.rglob("*.so*") if "/usr/lib/" in str(p)})


@pytest.fixture(scope="module")
def amd64(ffmpeg_locks, tmp_path_factory):
    """The amd64 layer built from cold caches, unpacked, and a short Ogg Vorbis file its ffmpeg made."""
    lk, _ = ffmpeg_locks["linux/amd64"]
    tmp = scratch_dir(tmp_path_factory.mktemp("apt-amd64"), "orch-apt-amd64-")
    started = time.monotonic()
    built = _build(lk, tmp / "one")
    log(f"[test] linux/amd64: cold build {time.monotonic() - started:.1f} s (download included); "
        f"layer {built.layer.digest}, {built.layer.blob_size / 1e6:.1f} MB gzip, {built.layer.size / 1e6:.1f} MB tar; "
        f"maintainer scripts that matter: {built.fragment.maintainer_scripts_that_matter()}")
    frag = tmp / "frag"
    names = _extract(built.layer, frag)
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(_lib_dirs(frag)))
    ogg = tmp / "tone.ogg"
    proc = subprocess.run([str(frag / "usr/bin/ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi",
                           "-i", "sine=frequency=440:duration=1", "-c:a", "libvorbis", str(ogg)],
                          env=env, capture_output=True, text=True)
    yield lk, built, frag, names, env, ogg if proc.returncode == 0 else proc.stderr
    shutil.rmtree(tmp, ignore_errors=True)  # about 1 GB: unpacked, plus the .debs and the blob


def test_two_cold_amd64_builds_give_the_same_layer(amd64, tmp_path):
    lk, one, *_ = amd64
    tmp = scratch_dir(tmp_path, "orch-apt-amd64-two-")
    try:
        two = _build(lk, tmp / "two")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert one.fragment is not None and two.fragment is not None  # both built, neither recalled
    assert one.fragment.downloaded_bytes == two.fragment.downloaded_bytes == sum(p.size for p in lk.pins)
    assert (one.layer.diff_id, one.layer.digest, one.layer.blob_size) == \
        (two.layer.diff_id, two.layer.digest, two.layer.blob_size)
    assert one.fragment.notes == ()  # no file shipped twice, no foreign owners, no ld.so.conf.d entries


def test_the_amd64_fragment_holds_ffmpeg_and_it_runs_here_with_the_base_libraries(amd64, base_packages, tmp_path):
    lk, built, frag, names, env, ogg = amd64
    assert "usr/bin/ffmpeg" in names
    assert not {"lib", "bin", "sbin", "lib64"} & {n.split("/")[0] for n in names}
    assert not [n for n in names if n.startswith(("usr/share/man/", "usr/share/locale/", "var/lib/apt/",
                                                  "var/cache/", "var/log/", "etc/ld.so.conf.d/"))]
    assert "var/lib/dpkg/status.d/ffmpeg" in names and "usr/share/doc/ffmpeg/copyright" in names

    ffmpeg = str(frag / "usr/bin/ffmpeg")
    version = subprocess.run([ffmpeg, "-hide_banner", "-version"], env=env, capture_output=True, text=True)
    assert version.returncode == 0, version.stderr
    version_of_lock = next(p.version for p in lk.pins if p.name == "ffmpeg").split(":")[-1]
    assert f"ffmpeg version {version_of_lock}" in version.stdout
    # A real round trip through the codecs the stt service needs: Vorbis in Ogg, decoded to 16 kHz WAV.
    assert isinstance(ogg, Path), ogg
    wav = tmp_path / "tone.wav"
    proc = subprocess.run([ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-i", str(ogg), "-ar", "16000",
                           "-ac", "1", str(wav)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert wav.stat().st_size > 16000  # 1 s of 16 kHz 16-bit mono

    # Every library ffmpeg loads from outside the fragment comes from a package the base image has.
    if shutil.which("ldd") and shutil.which("dpkg-query"):
        ldd = subprocess.run(["ldd", ffmpeg], env=env, capture_output=True, text=True, check=True).stdout
        assert "not found" not in ldd
        outside = sorted({line.split("=>")[1].split()[0] for line in ldd.splitlines()
                          if "=>" in line and str(frag) not in line})
        owners = set()
        for lib in outside:
            q = subprocess.run(["dpkg-query", "-S", os.path.realpath(lib)], capture_output=True, text=True)
            if q.returncode != 0:
                q = subprocess.run(["dpkg-query", "-S", lib], capture_output=True, text=True)
            owners.add(q.stdout.split(":")[0] if q.returncode == 0 else f"?{lib}")
        assert owners <= set(base_packages["linux/amd64"]), owners - set(base_packages["linux/amd64"])


def _binfmt_fixes_binary(name: str) -> bool:
    try:
        status = Path(f"/proc/sys/fs/binfmt_misc/{name}").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1] for line in status.splitlines() if line.startswith("flags:")), "")
    return status.startswith("enabled") and "F" in flags


@pytest.fixture
def scratch(tmp_path):
    d = scratch_dir(tmp_path, "orch-sysroot-")
    yield d
    shutil.rmtree(d, ignore_errors=True)  # a root file system: do not keep it for pytest's history


def test_the_arm64_layer_unpacks_on_this_host_and_its_ffmpeg_decodes_ogg_under_qemu(ffmpeg_locks, amd64, scratch):
    tmp_path = scratch
    lk, _ = ffmpeg_locks["linux/arm64"]
    started = time.monotonic()
    # Built as images get it: in the machine's blob cache, so a later run recalls it (the cold builds are amd64's).
    built = apt_layer.build_layer(lk, layers.default_cache(), layers.codec("gzip"),
                                  apt_cache=debian_archive.cache_root(), log=log)
    how = (f"built ({built.fragment.downloaded_bytes / 1e6:.1f} MB downloaded)" if built.fragment is not None
           else "recalled from the blob cache")
    log(f"[test] linux/arm64: {how} in {time.monotonic() - started:.1f} s; layer {built.layer.digest}, "
        f"{built.layer.blob_size / 1e6:.1f} MB gzip, {built.layer.size / 1e6:.1f} MB tar")
    # The pinned arm64 base, then the layer over it, as the image stacks them: a root file system.
    root = tmp_path / "sysroot"
    for blob in pinned_base_blobs("linux/arm64", tmp_path / "base-blobs"):
        _extract(blob, root)
    names = _extract(built.layer, root)
    assert "usr/bin/ffmpeg" in names and not {"lib", "bin"} & {n.split("/")[0] for n in names}
    with open(root / "usr/bin/ffmpeg", "rb") as fh:
        head = fh.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == ELF_MACHINE["linux/arm64"]
    assert os.readlink(root / "usr/lib/aarch64-linux-gnu/libblas.so.3") == \
        "/etc/alternatives/libblas.so.3-aarch64-linux-gnu"  # update-alternatives, done declaratively

    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if not qemu:
        unavailable("qemu-user-static is not installed (ci/setup.sh installs it)")
    for link, target in apt_layer.MERGED_USR.items():
        if "/" not in link and (root / target).is_dir() and not (root / link).exists():
            (root / link).symlink_to(target)
    if os.geteuid() == 0 and shutil.which("chroot") and _binfmt_fixes_binary("qemu-aarch64"):
        # As the image runs: no ld.so.cache, no LD_LIBRARY_PATH, the alternatives' absolute links.
        ogg = amd64[5]
        assert isinstance(ogg, Path), ogg
        shutil.copy(ogg, root / "tmp" / "in.ogg")
        ffmpeg = ["chroot", str(root), "/usr/bin/ffmpeg", "-hide_banner"]
        proc = subprocess.run([*ffmpeg, "-loglevel", "error", "-i", "/tmp/in.ogg", "-ar", "16000", "-ac", "1",
                               "/tmp/out.wav"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (root / "tmp" / "out.wav").stat().st_size > 16000
        log("[test] linux/arm64: ffmpeg decoded Ogg Vorbis in a chroot of base + layer (binfmt qemu-aarch64)")
    else:  # qemu's own prefix: the alternatives' absolute links would point at the host, so name the dirs
        guest_libs = ":".join("/" + str(Path(d).relative_to(root)) for d in _lib_dirs(root))
        ffmpeg = [qemu, "-L", str(root), "-E", f"LD_LIBRARY_PATH={guest_libs}", str(root / "usr/bin/ffmpeg"),
                  "-hide_banner"]
    proc = subprocess.run([*ffmpeg, "-version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ffmpeg version" in proc.stdout and "--arch=arm64" in proc.stdout
