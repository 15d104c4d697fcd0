"""Python dependency layers, written by the tool: uv installs a lock for the target platform, then each
layer is written straight from that directory. No BuildKit stage, no tar export.

For one lock (a LayerStage), on this machine, whatever the target platform
(nothing runs for the target, so arm64 needs no emulation):

    uv pip install --no-config --target <dir> --python-platform <arch>-manylinux_2_28 --python-version <py>
        --no-deps --require-hashes --only-binary :all: <the backend's index_url/extra_index_urls/find_links>
        [--find-links <wheels built from allowed sdists>] -r <the lock>

uv downloads each wheel once into its cache (`<cache>/uv`) and checks it
against the lock's sha256. The installed tree is cut into groups by the
`layer_split` policy (build/layer_split.py: `owners` reads every RECORD,
`plan_groups` gives a package of `own_mb` or more installed its own layer,
at most `max_layers`, the rest share one), and each group is written as one
normalized layer (oci/layers.py) under /opt/site/<layer>: sorted entries,
times SOURCE_DATE_EPOCH, uid/gid 0, directories and executables 0755,
other files 0644, no hard links.

What the installer leaves that depends on this machine is fixed before it
reaches a layer: uv's own `.lock` file in the target is left out, and a
console script whose first line names the interpreter uv ran with starts
with `#!/usr/bin/python3` (the image's python3) instead, its RECORD row
carrying the new hash and size. The rest is uv's: INSTALLER holds "uv",
REQUESTED is empty, RECORD lists what uv installed. So the layer is a
function of the pins, the target platform and Python, uv's version, the
split policy and these rules (`layer_key`), and two cold builds with
separate caches give identical digests.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import stat
import sys
import tarfile
import tempfile
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

from orchestrator.build import layer_split
from orchestrator.build.plan import LayerStage
from orchestrator.common import meter
from orchestrator.common.errors import EnvironmentProblem
from orchestrator.common.places import cache_root
from orchestrator.oci import layers as layers_mod
from orchestrator.project import compat as compat_mod
from orchestrator.project import uv as uv_mod
from orchestrator.project.spec import Sources

INSTALL_FORMAT = 1  # bump when the rules above change: it is part of every layer key
PYTHON = b"#!/usr/bin/python3"  # the base image's interpreter
UV_LOCK_FILE = ".lock"


@lru_cache(maxsize=1)
def uv_version() -> str:
    out = uv_mod.run([uv_mod.uv_binary(), "--version"], env=uv_mod.uv_env())
    return out.stdout.strip() or "uv (unknown)"


def identity() -> str:
    """What every Python layer depends on besides its lock: part of each image's content tag."""
    return (f"pydeps {INSTALL_FORMAT} {uv_version()} layer_split "
            f"{hashlib.sha256(split_script()).hexdigest()[:16]} epoch {layers_mod.SOURCE_DATE_EPOCH}")


def _pins_text(stage: LayerStage) -> str:
    """The lock's requirement lines without comments: the pins and hashes alone."""
    return "".join(line for pin in stage.lock.pins for line in pin.block.splitlines(keepends=True)
                   if not line.strip().startswith("#"))


def layer_key(stage: LayerStage, platform: str, python: str, c: layers_mod.Codec) -> str:
    """Everything the stage's layers depend on. Not the backend, the sources or the build base: the same
    pins give the same bytes wherever they were downloaded from (the hashes pin them)."""
    h = hashlib.sha256()
    for part in ("pydeps", str(INSTALL_FORMAT), uv_version(), stage.site_dir,
                 compat_mod.load().python_platform(platform), python, _pins_text(stage),
                 f"{stage.split.own_mb:g} {stage.split.max_layers}",
                 hashlib.sha256(split_script()).hexdigest(), str(layers_mod.SOURCE_DATE_EPOCH), c.key):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def split_script() -> bytes:
    """build/layer_split.py, whose policy cuts the layers (its hash is part of every layer key)."""
    return resources.files("orchestrator").joinpath("build/layer_split.py").read_bytes()


def install_command(stage: LayerStage, platform: str, python: str, sources: Sources, target: Path,
                    requirements: Path, wheelhouse: Path | None, no_cache: bool) -> list[str]:
    cmd = [uv_mod.uv_binary(), "pip", "install", "--no-config", "--quiet", "--target", str(target),
           "--python", sys.executable, "--python-platform", compat_mod.load().python_platform(platform),
           "--python-version", python, "--no-deps", "--require-hashes", "--only-binary", ":all:",
           *(["--no-cache"] if no_cache else ["--cache-dir", str(cache_root("uv"))]),
           *sources.index_args()]
    if wheelhouse is not None:
        cmd += ["--find-links", str(wheelhouse)]
    return cmd + ["-r", str(requirements)]


def write_stage(stage: LayerStage, platform: str, python: str, sources: Sources, cache: layers_mod.BlobCache,
                c: layers_mod.Codec, label: str, log=print, wheelhouse: Path | None = None, reuse: bool = True,
                no_cache: bool = False, on_layer=None) -> tuple[list[tuple[str, layers_mod.Layer]], bool]:
    """The stage's layers, one per layer_split group, in order; and whether they came from the cache.

    on_layer(layer) is called as each new layer is written, so its upload overlaps the next one's
    compression (cached layers are the caller's to send).
    """
    key = layer_key(stage, platform, python, c)
    if reuse:
        found = cache.recall_groups(key, c)
        if found is not None:
            return found, True
    work = cache_root("tmp")  # next to uv's cache: its files are hard-linked, not copied
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pydeps-", dir=work) as tmp:
        target, requirements = Path(tmp) / "site", Path(tmp) / "lock.txt"
        requirements.write_text(stage.lock.body())
        started = time.monotonic()
        cmd = install_command(stage, platform, python, sources, target, requirements, wheelhouse, no_cache)
        with meter.timed("build"):
            proc = uv_mod.run(cmd, env=uv_mod.uv_env())
        if proc.returncode != 0:
            tail = "\n".join("    " + line for line in proc.stderr.strip().splitlines()[-15:])
            raise EnvironmentProblem(f"{label}: uv could not install {stage.lock.backend}/{stage.lock.layer} "
                                     f"for {platform}:\n{tail}",
                                     "check the network or proxy (SSL_CERT_FILE for a private CA) and the "
                                     "backend's index_url/find_links; a hash mismatch means the index serves "
                                     "other files than `invoke lock` saw")
        installed = time.monotonic() - started
        rate = layers_mod.Rate(f"{label}: writing and compressing", log)
        started = time.monotonic()
        groups = write_groups(target, stage, cache, c, progress=rate, on_layer=on_layer)
    cache.remember_groups(key, groups)
    size, blob = sum(lay.size for _, lay in groups), sum(lay.blob_size for _, lay in groups)
    took = time.monotonic() - started
    log(f"  {label}: uv installed {len(stage.lock.pins)} package(s) in {installed:.1f} s; "
        f"{len(groups)} layer{'s' if len(groups) > 1 else ''} {size / 1e6:,.1f} MB -> {blob / 1e6:,.1f} MB {c.name} "
        f"in {took:.1f} s ({size / 1e6 / max(took, 1e-6):,.0f} MB/s)")
    if len(groups) > 1:
        log(f"    {'; '.join(f'{g}: {lay.blob_size / 1e6:,.1f} MB' for g, lay in groups)}")
    return groups, False


# --- the installed tree as layers ---------------------------------------------

def _b64_sha256(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _interpreters() -> set[bytes]:
    """The ways a script's first line names the interpreter uv ran with."""
    names = {sys.executable, os.path.realpath(sys.executable), os.path.abspath(sys.executable)}
    return {b"#!" + n.encode() for n in names}


def fixups(target: Path) -> dict[str, bytes]:
    """Files (relative to target) whose bytes the layer gets instead of the installer's: console scripts
    pointing at this machine's interpreter, and the RECORD rows naming them."""
    out: dict[str, bytes] = {}
    bindir = target / "bin"
    if not bindir.is_dir():
        return out
    ours = _interpreters()
    for script in sorted(bindir.iterdir()):
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        first, nl, rest = data.partition(b"\n")
        if first.rstrip() in ours:
            out[f"bin/{script.name}"] = PYTHON + nl + rest
        elif first == b"#!/bin/sh" and rest.startswith(b"'''exec'") and any(i[2:] in rest.split(b"\n", 1)[0]
                                                                          for i in ours):
            # uv's form for an interpreter path with spaces: a sh line that execs it, then ' '''.
            body = rest.split(b"\n' '''\n", 1)
            out[f"bin/{script.name}"] = PYTHON + b"\n" + (body[1] if len(body) == 2 else rest)
    if not out:
        return out
    for record in sorted(target.glob("*.dist-info/RECORD")):
        text = record.read_text(encoding="utf-8")
        lines, changed = [], False
        for line in text.splitlines(keepends=True):
            row = next(csv.reader([line]), [])
            if row and row[0] in out:
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n" if line.endswith("\n") else "").writerow(
                    [row[0], _b64_sha256(out[row[0]]), str(len(out[row[0]]))])
                line, changed = buf.getvalue(), True
            lines.append(line)
        if changed:
            out[str(record.relative_to(target))] = "".join(lines).encode("utf-8")
    return out


def _sort_key(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))


def members(target: Path, site_dir: str, paths: list[str], fixed: dict[str, bytes]):
    """(TarInfo, data) of one group in sorted order: its paths under site_dir, with every parent directory."""
    site = site_dir.strip("/")
    names: dict[str, str | None] = {}  # layer path -> path relative to target (None: a parent directory)
    parts = site.split("/")
    for i in range(1, len(parts) + 1):
        names["/".join(parts[:i])] = None
    for rel in paths:
        full = f"{site}/{rel}"
        names[full] = rel
        head = full.rsplit("/", 1)[0]
        while head not in names:
            names[head] = None
            head = head.rsplit("/", 1)[0]
    for name in sorted(names, key=_sort_key):
        rel = names[name]
        info = tarfile.TarInfo(name)
        info.uid = info.gid = 0
        if rel is None:
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            yield info, None
            continue
        path = target / rel
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, os.readlink(path)
            yield info, None
        elif stat.S_ISDIR(st.st_mode):
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            yield info, None
        elif stat.S_ISREG(st.st_mode):
            info.type, info.mode = tarfile.REGTYPE, 0o755 if st.st_mode & 0o111 else 0o644
            if rel in fixed:
                info.size = len(fixed[rel])
                yield info, io.BytesIO(fixed[rel])
            else:
                info.size = st.st_size
                with open(path, "rb") as fh:
                    yield info, fh
        else:
            raise EnvironmentProblem(f"uv installed {rel}, neither a file, a directory nor a symlink",
                                     "a wheel cannot hold that; report it with the lock")


def write_groups(target: Path, stage: LayerStage, cache: layers_mod.BlobCache, c: layers_mod.Codec,
                 progress=None, on_layer=None) -> list[tuple[str, layers_mod.Layer]]:
    """Each group of the installed tree as one layer, in order (on_layer(layer) as each is done)."""
    fixed = fixups(target)
    out = []
    for group, _, paths in layer_split.place(str(target), ".", int(stage.split.own_mb * 1e6), stage.split.max_layers,
                                             skip=(UV_LOCK_FILE,)):
        started = time.monotonic()
        layer = layers_mod.write_members(members(target, stage.site_dir, paths, fixed), cache, c, progress=progress)
        meter.add("build", time.monotonic() - started, layer.size)  # walking and writing the tree (compressing counts apart)
        out.append((group, layer))
        if on_layer is not None:
            on_layer(layer)
    return out
