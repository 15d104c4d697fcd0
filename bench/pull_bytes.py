"""Bytes a client must pull after a change: this tool vs a monolithic image.

Method: copy the example project to a scratch directory under its own
registry namespace, build the cuda `tts` image, apply a change, rebuild, and
count the compressed bytes of the layers (plus config) the new image has
that the old one does not: what `docker pull` downloads on a host that has
the old image. The monolithic image installs the same hashed wheels with one
`RUN pip install` on the same base (the style of seeds/001), with the
requirements copied before the app so Docker's cache helps it as much as it
can.

Changes: (a) app-only (a line in services/tts/app.py), (b) a small
dependency bump (soundfile 0.14.0 -> 0.13.1 in the tts service layer),
(d) adding one small package to the tts service (six, in no layer yet), (e) a second
service (stt) on a host that has tts: what it pulls beyond tts, CUDA libraries
included or not, (c) a torch patch change (2.5.1 -> 2.5.0, the same nvidia-*
pins; CUDA-libs bytes reported separately), (g) adding one small package
(requests) to a service whose dependencies are faster-whisper, ctranslate2,
onnxruntime and av (the stt service, built on cuda): what is re-sent, layer by
layer, under the project's layer_split policy.
Also times the no-op and app-only rebuilds and `uv pip compile` vs
`pip-compile` for the torch layer.

Usage: .venv/bin/python bench/pull_bytes.py [--skip-monolith] [--only a,b,c] > bench/out/pull_bytes.json
Needs `invoke engine.up` first. Takes 10-25 minutes (the monolith pushes ~3 GB per change that moves it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scratch_registry import scratch_project  # noqa: E402
from orchestrator.build import bases as base  # noqa: E402
from orchestrator.machine import daemon
from orchestrator.project import lock
from orchestrator import flow
from orchestrator.project import spec
from orchestrator.oci.registry import Registry, split_ref  # noqa: E402


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def pull_bytes(reg: Registry, old_ref: str, new_ref: str) -> int:
    """Compressed bytes of layers in new that old lacks, plus the new config."""
    _, old_name, old_d = split_ref(old_ref)
    _, new_name, new_d = split_ref(new_ref)
    old = reg.get_manifest(old_name, old_d).json
    new = reg.get_manifest(new_name, new_d).json
    have = {layer["digest"] for layer in old["layers"]}
    return new["config"]["size"] + sum(layer["size"] for layer in new["layers"] if layer["digest"] not in have)


def build_tts(project) -> tuple[str, float]:
    started = time.monotonic()
    results = flow.build(project, backends=["cuda"], services=["tts"], log=lambda *_: None)
    r = next(r for r in results if r.image.key == "tts")
    return r.ref, time.monotonic() - started


MONOLITH = """ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \\
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \\
    python3 -m pip install --break-system-packages --no-compile --no-deps --require-hashes \\
      --find-links /tmp -r /tmp/requirements.txt
COPY app /opt/app
ENV PYTHONPATH=/opt/app:/opt/runtime
COPY runtime /opt/runtime
CMD ["python3", "-m", "uvicorn", "app:app", "--host", "0.0.0.0", "--port", "8000"]
"""


def build_monolith(project, ctx: Path, ref: str) -> str:
    """One RUN pip install of the same locks, on the same base; returns repo@digest."""
    if ctx.exists():
        shutil.rmtree(ctx)
    ctx.mkdir(parents=True)
    backend = project.backends["cuda"]
    locks = lock.load_locks(project, backend, "linux/amd64")
    wanted = [lk for lk in locks if not lk.layer.startswith("service-") or lk.layer == "service-tts"]
    (ctx / "requirements.txt").write_text("".join(p.block for lk in wanted for p in lk.pins))
    shutil.copytree(project.services["tts"].path, ctx / "app")
    shutil.copytree(ROOT / "orchestrator" / "runtime", ctx / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (ctx / "Dockerfile").write_text(MONOLITH)
    client = daemon.build_client()
    env = dict(os.environ, **dict(client.env))
    base_ref = base.ensure(project, "linux/amd64", log=lambda *_: None)[0].ref
    cmd = [*client.argv, "--progress=plain", "-t", ref, "--secret", f"id=ca,src={daemon.ca_bundle()}",
           "--build-arg", f"BASE_IMAGE={base_ref}", str(ctx)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The monolith leaves the way such Dockerfiles do: docker push.
    subprocess.run(["docker", "push", ref], check=True, stdout=subprocess.DEVNULL)
    host, name, tag = split_ref(ref)
    return f"{ref.rsplit(':', 1)[0]}@{Registry(host).get_manifest(name, tag).digest}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-monolith", action="store_true")
    ap.add_argument("--only", default="a,b,d,e,c,g,lock",
                    help="which to measure: a, b, c, d, e, g, lock (uv vs pip-compile)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    out: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cores, {os.uname().machine}"}
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        pf = scratch_project(tmp, "bench")
        project = spec.load(pf)
        reg = Registry(project.registry)
        app = project.services["tts"].path / "app.py"
        tts_in = pf.parent / "requirements" / "tts.in"

        say("baseline build of tts (cuda)")
        base_ref, _ = build_tts(project)
        _, noop = build_tts(project)
        out["noop_rebuild_seconds"] = round(noop, 1)

        repo = f"{project.registry}/bench/monolith"
        ctx = Path(tmp) / "monolith"
        monolith = not args.skip_monolith
        m_prev = build_monolith(project, ctx, f"{repo}:base") if monolith else None
        prev = base_ref

        def measure(key: str, label: str, change) -> None:
            nonlocal prev, m_prev, project
            say(f"({key}) {label}")
            change()
            project = spec.load(pf)
            t = time.monotonic()
            flow.lock(project, log=lambda *_: None)
            lock_secs = time.monotonic() - t
            ref, secs = build_tts(project)
            out[label] = {"tool_pull_bytes": pull_bytes(reg, prev, ref), "tool_rebuild_seconds": round(secs, 1),
                          "lock_seconds": round(lock_secs, 1)}
            prev = ref
            if monolith:
                m = build_monolith(project, ctx, f"{repo}:{key}")
                out[label]["monolith_pull_bytes"] = pull_bytes(reg, m_prev, m)
                m_prev = m

        if monolith:
            _, mono_name, mono_digest = split_ref(m_prev)
            out["monolith_image_bytes"] = sum(
                layer["size"] for layer in reg.get_manifest(mono_name, mono_digest).json["layers"])
        if "a" in only:
            measure("a", "app_only", lambda: app.write_text(app.read_text() + "\n# bench: app-only change\n"))
        if "b" in only:
            measure("b", "dep_bump", lambda: tts_in.write_text("soundfile==0.13.1\n"))
        if "d" in only:
            measure("d", "add_small_package", lambda: tts_in.write_text(tts_in.read_text() + "six\n"))
        if "e" in only:
            say("(e) a second service sharing the CUDA libraries")
            stt = next(r for r in flow.build(project, backends=["cuda"], services=["stt"], log=lambda *_: None)
                       if r.image.key == "stt")
            libs = next(r for r in flow.build(project, backends=["cuda"], services=["tts"], log=lambda *_: None)
                        if r.image.key == "cuda-libs")
            _, stt_name, _ = split_ref(stt.ref)
            libs_digests = {x.digest for x in libs.assembled.layers}
            extra = pull_bytes(reg, prev, stt.ref)
            new_layers = [x for x in reg.get_manifest(stt_name, stt.digest).json["layers"]]
            out["second_service"] = {"tool_pull_bytes": extra, "cuda_libs_bytes_pulled": sum(
                x["size"] for x in new_layers if x["digest"] in libs_digests and x["digest"] not in
                {y["digest"] for y in reg.get_manifest(*split_ref(prev)[1:]).json["layers"]})}
        if "g" in only:
            out["add_small_package_big_service"] = small_package_in_big_service(project, pf, reg)
        if "c" in only:
            before = prev
            measure("c", "torch_patch", lambda: pf.write_text(pf.read_text().replace('torch: "2.5.1"', 'torch: "2.5.0"')))
            old_libs = {x["digest"] for x in reg.get_manifest(*split_ref(before)[1:]).json["layers"]}
            new_manifest = reg.get_manifest(*split_ref(prev)[1:]).json
            libs = next(r for r in flow.build(project, backends=["cuda"], services=["tts"], log=lambda *_: None)
                        if r.image.key == "cuda-libs")
            out["torch_patch"]["cuda_libs_bytes_pulled"] = sum(
                x["size"] for x in new_manifest["layers"]
                if x["digest"] in {y.digest for y in libs.assembled.layers} and x["digest"] not in old_libs)


    if "lock" in only:
        lock_timing(out)
    print(json.dumps(out, indent=2))
    return 0


def _layers_by_stage(result) -> list[dict]:
    """The image's layers named as the config's history names them ("service-stt layer av", ...)."""
    history = [h["created_by"] for h in json.loads(result.assembled.config)["history"]]
    return [{"layer": h.split(" (")[0].removeprefix("orchestrator: "), "digest": x.digest, "bytes": x.blob_size}
            for h, x in zip(history, result.assembled.layers)]


def small_package_in_big_service(project, pf: Path, reg: Registry) -> dict:
    say("(g) stt with faster-whisper, ctranslate2, onnxruntime and av gains requests")
    stt_in = pf.parent / "requirements" / "stt.in"
    stt_in.write_text(stt_in.read_text() + "faster-whisper\nctranslate2\nonnxruntime\nav\n")

    def build_stt(project, stats=None):
        started = time.monotonic()
        r = next(r for r in flow.build(project, backends=["cuda"], services=["stt"], log=lambda *_: None,
                                        stats=stats) if r.image.key == "stt")
        return r, time.monotonic() - started

    project = spec.load(pf)
    flow.lock(project, log=lambda *_: None)
    old, _ = build_stt(project)
    locked = (pf.parent / "locks" / "cuda-amd64" / "service-stt.txt").read_text()
    stt_in.write_text(stt_in.read_text() + "requests\n")
    project = spec.load(pf)
    t = time.monotonic()
    flow.lock(project, log=lambda *_: None)
    lock_secs = time.monotonic() - t
    stats: dict = {}
    new, secs = build_stt(project, stats)
    relocked = (pf.parent / "locks" / "cuda-amd64" / "service-stt.txt").read_text()
    pins = lambda text: {ln.split(" ")[0] for ln in text.splitlines() if "==" in ln and not ln.startswith(" ")}  # noqa: E731
    have = {x.digest for x in old.assembled.layers}
    service = [x for x in _layers_by_stage(old) if x["layer"].startswith("service-stt layer")]
    return {"policy": {"own_mb": project.layer_split.own_mb, "max_layers": project.layer_split.max_layers},
            "pins_added": sorted(pins(relocked) - pins(locked)),
            "service_layers_before": service,
            "service_bytes_before": sum(x["bytes"] for x in service),
            "changed_layers": [x for x in _layers_by_stage(new) if x["digest"] not in have],
            "tool_pull_bytes": pull_bytes(reg, old.ref, new.ref),
            "registry_received_bytes": stats["uploaded_bytes"],
            "tool_rebuild_seconds": round(secs, 1), "lock_seconds": round(lock_secs, 1)}


def lock_timing(out: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        say("lock timing: uv vs pip-compile for torch==2.5.1 with hashes")
        req = Path(tmp) / "torch.in"
        req.write_text("torch==2.5.1\n")
        t = time.monotonic()
        subprocess.run([lock._uv(), "pip", "compile", str(req), "--generate-hashes", "--no-cache", "-q",
                        "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"],
                       check=True, stdout=subprocess.DEVNULL)
        out["lock_seconds_uv_torch_cold"] = round(time.monotonic() - t, 1)
        if shutil.which("pip-compile") or (ROOT / ".venv/bin/pip-compile").exists():
            t = time.monotonic()
            subprocess.run([str(ROOT / ".venv/bin/pip-compile"), str(req), "--generate-hashes", "-q",
                            "--output-file", str(Path(tmp) / "torch.txt")], check=True, stdout=subprocess.DEVNULL)
            out["lock_seconds_pip_compile_torch"] = round(time.monotonic() - t, 1)


if __name__ == "__main__":
    sys.exit(main())
