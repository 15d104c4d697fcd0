"""Take what bench/gpu_check.py needs on a GPU host out of the registry: a bundle of a few MB.

For every service of the project, its promoted backend manifest (fetched
and checked against its digests, as `invoke select` reads it); for every
CUDA backend and platform it names, the libcudart of its published CUDA-libs
image: the file CUDA_LIBS_DIR/CUDA_RUNTIME_LIB of the image's config, found
in its layers (smallest first, streamed, nothing else unpacked) and written
with the digests of the image, the layer and the file itself. The GPU host
then needs no registry, no Docker and no network.

  gpu-bundle/
    bundle.json                        what is in it, with every digest
    manifests/<service>.backends.json  the promoted backend manifests
    lib/<tag>-<arch>/libcudart.so.N     each CUDA line's libcudart

Usage: .venv/bin/python bench/gpu_bundle.py [--project project.yaml] [--out gpu-bundle]
then copy gpu-bundle/ and this checkout to the GPU host and run bench/gpu_check.py there.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.cli import find_project  # noqa: E402
from orchestrator.common.errors import EnvironmentProblem  # noqa: E402
from orchestrator.oci import backends  # noqa: E402
from orchestrator.oci.registry import Registry, split_ref  # noqa: E402
from orchestrator.project import compat as compat_mod  # noqa: E402
from orchestrator.project import spec  # noqa: E402

FORMAT = 1


def _tar_stream(raw, media_type: str):
    """A layer blob's bytes as a tar stream: gzip (multi-member too), zstd or plain."""
    if media_type.endswith("+gzip") or media_type.endswith(".tar.gzip"):
        return gzip.GzipFile(fileobj=raw)
    if media_type.endswith("+zstd"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw)
    return raw


def find_in_layer(reg: Registry, name: str, layer: dict, path: str) -> bytes | None:
    """The file at path (no leading /) in one layer, following a symlink inside the layer; None if absent."""
    wanted = path
    with reg.open_blob(name, layer["digest"]) as resp:
        resp.raw.decode_content = False
        with tarfile.open(fileobj=_tar_stream(resp.raw, layer["mediaType"]), mode="r|") as tf:
            for member in tf:
                if member.name.lstrip("./") != wanted:
                    continue
                if member.issym():  # libcudart.so.12 -> libcudart.so.12.4.127, later in the same layer
                    wanted = str(Path(wanted).parent / member.linkname)
                    continue
                if member.isfile():
                    return tf.extractfile(member).read()
    return None


def libcudart(reg: Registry, name: str, digest: str, fallback_lib: str) -> dict:
    """The CUDA-libs image's libcudart: its bytes and where it was found."""
    image = reg.get_manifest(name, digest)
    if image is None:
        raise EnvironmentProblem(f"{name}@{digest} is not in {reg.host}", "re-publish, or check the manifest")
    body = image.json
    config = json.loads(reg.get_blob(name, body["config"]["digest"]))
    env = dict(e.split("=", 1) for e in (config.get("config") or {}).get("Env") or [])
    path = f"{env.get('CUDA_LIBS_DIR', '/opt/site/cuda-libs').rstrip('/')}/{env.get('CUDA_RUNTIME_LIB', fallback_lib)}"
    for layer in sorted(body["layers"], key=lambda x: x["size"]):  # the runtime wheel sits in a small layer
        data = find_in_layer(reg, name, layer, path.lstrip("/"))
        if data is not None:
            return {"data": data, "path_in_image": path, "layer": layer["digest"]}
    raise EnvironmentProblem(f"{name}@{digest[:19]} has no {path} in any layer", "is it a CUDA-libs image?")


def make(project: spec.Project, out: Path, services: list[str] | None = None, log=print) -> dict:
    compat = compat_mod.load()
    reg = Registry(project.registry, login=project.login)
    out.mkdir(parents=True, exist_ok=True)
    bundle = {"format": FORMAT, "made_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "project": project.name, "registry": project.registry, "manifests": {}, "lines": []}
    files: dict[tuple[str, str], dict] = {}  # (cuda-libs digest) -> what was written for it
    for service in services or list(project.services):
        ref = f"{project.repository(service)}:{backends.artifact_tag(project.services[service].version)}"
        manifest = backends.fetch_manifest(ref, project.login)  # every digest on the way checked
        rel = Path("manifests") / f"{service}.backends.json"
        data = backends.manifest_bytes(manifest)
        (out / rel).parent.mkdir(exist_ok=True)
        (out / rel).write_bytes(data)
        bundle["manifests"][service] = {"file": str(rel), "ref": ref,
                                        "sha256": "sha256:" + hashlib.sha256(data).hexdigest()}
        for platform, entry in manifest["platforms"].items():
            for backend, spec_ in entry["backends"].items():
                requires = spec_.get("requires") or {}
                if not requires.get("cuda") or "cuda_libs" not in spec_:
                    continue
                libs = spec_["cuda_libs"]
                key = (libs["digest"], backend)
                if key in files:
                    continue
                release = compat.cuda(requires["cuda"])
                _, name, _ = split_ref(project.repository("cuda-libs") + ":x")
                found = libcudart(reg, name, libs["digest"], release.runtime_lib)
                lib_rel = Path("lib") / f"{libs['tag']}-{platform.split('/')[1]}" / Path(found["path_in_image"]).name
                (out / lib_rel).parent.mkdir(parents=True, exist_ok=True)
                (out / lib_rel).write_bytes(found["data"])
                files[key] = {"backend": backend, "cuda": requires["cuda"], "platform": platform,
                              "cuda_libs": {"image": f"{project.repository('cuda-libs')}@{libs['digest']}",
                                            "tag": libs["tag"], "layer": found["layer"]},
                              "path_in_image": found["path_in_image"], "file": str(lib_rel),
                              "sha256": "sha256:" + hashlib.sha256(found["data"]).hexdigest(),
                              "size": len(found["data"]), "runtime_version": release.runtime_version,
                              "min_driver": release.min_driver, "archs": list(requires.get("archs") or [])}
                log(f"{backend} {platform}: {found['path_in_image']} ({len(found['data']):,} bytes) from "
                    f"{libs['tag']} layer {found['layer'][:19]}")
    bundle["lines"] = sorted(files.values(), key=lambda x: (x["platform"], x["backend"]))
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")
    return bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", help="project file (default: as every task finds it)")
    parser.add_argument("--out", default="gpu-bundle", help="the bundle directory (default gpu-bundle)")
    parser.add_argument("--service", action="append", help="only this service (repeatable)")
    args = parser.parse_args()
    project = spec.load(find_project(args.project))
    bundle = make(project, Path(args.out), args.service, log=lambda m: print(m, file=sys.stderr))
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    print(f"{args.out}: {len(bundle['lines'])} CUDA line(s), {len(bundle['manifests'])} manifest(s), {size:,} bytes",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
