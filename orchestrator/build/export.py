"""Running BuildKit: one layer stage built and exported as a tar stream, never loaded into an image store.

Only what needs a RUN goes through here (the app stage); the Python and
Debian layers are written by the tool (build/pydeps.py, debian/layer.py).
The stream goes straight into the normalizer and compressor
(orchestrator.oci.layers). `Halt` stops every builder's work at once when
one fails or the run is interrupted; no build client outlives the run.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

from orchestrator.build.plan import ImagePlan
from orchestrator.build.render import export_target
from orchestrator.common.errors import EnvironmentProblem
from orchestrator.machine import daemon
from orchestrator.oci import layers as layers_mod
from orchestrator.oci.registry import docker_auth_config, registry_host
from orchestrator.project.spec import Builder


def _hint(text: str, builder: Builder | None = None, registry: str | None = None) -> str | None:
    engine_name = f"the engine at {builder.host}" if builder is not None else "the engine"
    if registry and ("failed to resolve source metadata" in text or "failed to do request" in text) and \
            ("connection refused" in text or "no such host" in text or "i/o timeout" in text):
        return (f"{engine_name} cannot reach registry {registry} to pull the build base: every builder must reach "
                "the registry under that name (a builder on another machine does not see this machine's 127.0.0.1); "
                "use a registry address every builder reaches")
    if "failed to prepare" in text and "no such file or directory" in text:
        # Seen after `docker image prune`: BuildKit records point at removed layers.
        return "BuildKit's cache refers to layers that were pruned; run `docker builder prune -af` and retry"
    if "pip install" in text and ("HTTPSConnection" in text or "SSLError" in text):
        return "pip could not reach the index from the build; check the proxy and the CA bundle (SSL_CERT_FILE)"
    if "pull access denied" in text or "unauthorized" in text or "x509" in text:
        return ("the engine could not pull the build base from the registry: see `invoke doctor` "
                "(CA in /etc/docker/certs.d/<host>/ca.crt, credentials in REGISTRY_USERNAME/REGISTRY_PASSWORD)")
    return None


def export_stage(image: ImagePlan, stage: str, ctx: Path, build_args: dict[str, str], cache: layers_mod.BlobCache,
                 c: layers_mod.Codec, log=print, no_cache: bool = False, docker_config: str | None = None,
                 builder: Builder | None = None, halt: "Halt | None" = None, registry: str | None = None
                 ) -> list[tuple[str, layers_mod.Layer]]:
    """Run one layer stage with BuildKit and turn its exported files into layer blobs, one per group.

    The app stage is one layer; a stage whose export holds groups
    (`<NN>-<name>/...`, top-level directories) becomes one layer per group.

    The tar streams from BuildKit (`--output type=tar,dest=-`) straight into
    the normalizer and compressor: nothing is unpacked into the engine's
    image store or written to disk uncompressed. Should BuildKit ever send
    entries out of sorted order, the stage is exported again to a file and
    sorted there, so the layer is the same either way.
    """
    client = daemon.build_client()
    cmd = [*[a for a in client.argv if a != "--load"], "--progress=plain", "--platform", image.platform,
           "--target", export_target(stage), *(["--no-cache"] if no_cache else []),
           "--secret", f"id=ca,src={daemon.ca_bundle()}", "-f", str(ctx / "Dockerfile")]
    for k, v in build_args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    env = {**daemon.builder_env(builder), **dict(client.env)}  # DOCKER_HOST (and TLS) of this platform's engine
    if docker_config:
        env["DOCKER_CONFIG"] = docker_config
    label = f"{image.key}/{image.backend.name} {image.arch} {stage}"
    started = time.monotonic()
    rate = layers_mod.Rate(f"{label}: exporting and compressing", log)
    where = {"builder": builder, "halt": halt, "registry": registry}
    split = stage != "app"

    def from_stream(out):
        return (layers_mod.write_layers(out, cache, c, progress=rate) if split
                else [(stage, layers_mod.write_layer(out, cache, c, progress=rate))])

    def from_file(path: Path):
        return (layers_mod.write_layers_from_file(path, cache, c, progress=rate) if split
                else [(stage, layers_mod.write_layer_from_file(path, cache, c, progress=rate))])
    try:
        groups = _run_export([*cmd, "--output", "type=tar,dest=-", str(ctx)], env, label, log, started,
                             from_stream, **where)
    except layers_mod.UnsortedStream:
        log(f"  {label}: BuildKit's tar is not in sorted order; exporting to a file to sort it")
        with tempfile.TemporaryDirectory(prefix="orch-export-") as tmp:
            out = Path(tmp) / "layer.tar"
            _run_export([*cmd, "--output", f"type=tar,dest={out}", str(ctx)], env, label, log, started, None,
                        **where)
            groups = from_file(out)
    took = time.monotonic() - started
    size, blob = sum(lay.size for _, lay in groups), sum(lay.blob_size for _, lay in groups)
    log(f"  {label}: {len(groups)} layer{'s' if len(groups) > 1 else ''} {size / 1e6:,.1f} MB -> {blob / 1e6:,.1f} MB "
        f"{c.name} in {took:.1f} s (build, export and compression)")
    if len(groups) > 1:
        log(f"    {'; '.join(f'{g}: {lay.blob_size / 1e6:,.1f} MB' for g, lay in groups)}")
    return groups


def _run_export(cmd: list[str], env: dict, label: str, log, started: float, consume,
                builder: Builder | None = None, halt: "Halt | None" = None, registry: str | None = None):
    """Run a BuildKit export; consume(stdout) reads the tar when it goes to stdout. Progress goes to log."""
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if consume else subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if halt is not None:
        halt.track(proc)

    def pump() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            # Step starts and ends are progress enough; pip's chatter stays in the tail.
            if (" [" in line and line.startswith("#")) or " DONE " in line or "ERROR" in line:
                log(f"  {label} {time.monotonic() - started:6.0f}s {line[:140]}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    result, failure = None, None
    try:
        if consume:
            try:
                result = consume(proc.stdout)
            except (tarfile.TarError, EOFError) as e:  # the stream ended early: the build failed, its exit says how
                failure = e
            _drain(proc.stdout)  # the tar's end padding: the client exits only once it has written everything
    except BaseException as e:
        # Our side failed (a full disk under the blob cache, an unsorted stream, Ctrl-C, a bug) while
        # the client may still be sending: nobody reads the pipe any more, so it would block on it
        # forever. Close the pipe and stop the client; it must not outlive us. A terminal's Ctrl-C
        # reached it already (same process group); a signal sent to us alone did not.
        _abandon(proc)
        if isinstance(e, OSError):  # an I/O error of ours (a full disk is named by orchestrator.oci.layers)
            raise EnvironmentProblem(f"the layers of {label} could not be written: {e}",
                                     "check the disk of the blob cache (ORCH_CACHE_DIR) and re-run") from e
        raise
    finally:
        code = proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        reader.join(timeout=10)
        if halt is not None:
            halt.untrack(proc)
    if code != 0 or failure is not None:
        if halt is not None and halt.stopped:  # stopped by us: another builder failed, or Ctrl-C
            raise Halted(label)
        if not daemon.engine_running(builder):
            own = os.environ.get("DOCKER_HOST") or (builder is not None and builder.key)
            start = "start it again" if own else "start it again (`invoke engine.up`)"
            raise EnvironmentProblem(
                f"the Docker Engine at {daemon.engine_address(builder)} stopped answering during the build of {label}",
                f"{start} and re-run: this image was neither pushed nor tagged, and the layers already built "
                "are reused")
        text = "\n".join(tail)
        on = f" on {builder}" if builder is not None and builder.key else ""
        raise EnvironmentProblem(f"build of {label} failed{on}:\n" + "\n".join("    " + t for t in tail),
                                 _hint(text, builder, registry))
    return result


class Halted(Exception):
    """A builder's work stopped because another builder failed or the run was interrupted."""


class Halt:
    """Stops every builder's work at once: no new image or stage starts, running build clients are stopped.

    Set when one builder fails or the run is interrupted; the others unwind
    with Halted, so the first failure is the one reported.
    """

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self.stopped:
            raise Halted()

    def track(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.add(proc)
        if self.stopped:  # started just as the run was stopped
            _stop(proc)

    def untrack(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def stop(self) -> None:
        self._event.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            _stop(proc)


def on_builders(groups: list[tuple[Builder, list]], work, halt: Halt) -> None:
    """work(builder, images) for every builder: in this thread for one, else one thread per builder.

    The first failure stops the other builders and is raised once they have
    unwound; Ctrl-C (which reaches this thread only) stops them all.
    """
    if len(groups) == 1:
        work(*groups[0])
        return
    errors: list[BaseException] = []

    def run(builder: Builder, images: list) -> None:
        try:
            work(builder, images)
        except Halted:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors.append(e)
            halt.stop()

    threads = [threading.Thread(target=run, args=group, name=f"build on {group[0].host}", daemon=True)
               for group in groups]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException:
        halt.stop()
        for t in threads:
            t.join()
        raise
    if errors:
        raise errors[0]


def _drain(stream) -> None:
    """Read a pipe to its end, discarding what comes."""
    while stream.read(1 << 16):
        pass


def _abandon(proc: subprocess.Popen) -> None:
    """Stop a build client whose output nobody will read: close the pipe (its writes fail), then stop it."""
    if proc.stdout is not None:
        proc.stdout.close()
    _stop(proc)


def _stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def engine_docker_config(host: str, login=None) -> str | None:
    """A private DOCKER_CONFIG for the build client holding the credentials our registry client uses.

    login: the environment's login (registry.EnvLogin); written only if it is for host.

    BuildKit pulls the build base through the docker CLI's credentials, which
    never see REGISTRY_USERNAME/REGISTRY_PASSWORD or a credential helper's
    answer: one credential configuration for everything the tool sends.
    None when there are no credentials (the CLI's own config is used).
    """
    auth = docker_auth_config(host, login)
    if not auth:
        return None
    host = registry_host(host)
    entry = ({"identitytoken": auth["identitytoken"]} if "identitytoken" in auth else
             {"auth": base64.b64encode(f"{auth['username']}:{auth['password']}".encode()).decode()})
    d = tempfile.mkdtemp(prefix="orch-docker-config-")
    fd = os.open(os.path.join(d, "config.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"auths": {host: entry}}, fh)
    return d
