"""Faults injected for real: a registry killed with SIGKILL in the middle of
an upload, a Docker Engine killed while it builds, and Ctrl-C (SIGINT to the
process group, as a terminal sends it) during `invoke lock`, `build` and
`publish`.

Every fault runs the CLI as a subprocess against real processes: a private
`docker-registry serve` on a port of its own (never the shared one on
127.0.0.1:5000) and a second dockerd on its own socket and data root (never
the shared one). What is checked is what a user relies on afterwards: a
clear message and a non-zero exit (130 for Ctrl-C), no traceback, nothing
half-written next to locks and manifests, no tag for an image that was not
finished, the previous backend manifest still served, no child process
left, and a re-run that sends only what is missing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.machine import registry_server
from orchestrator.oci.registry import Registry
from orchestrator.oci.registry import transport as transport_mod

from ..conftest import ROOT, cleanup_namespace, copy_fixture, unavailable
from .conftest import _free_port

pytestmark = pytest.mark.engine

SERVICE = "echo"
ARTIFACT_TAG = "0.1.0-backends"
APP_BLOB_BYTES = 40 * 1024 * 1024  # incompressible: an upload that lasts long enough to be caught in flight
STARTUP_S = 60  # generous: invoke starting, the project loading, the first registry round trips


# -- the CLI as a user runs it --------------------------------------------

class Cli:
    """`invoke <task>` in its own process group, its merged output read as it comes."""

    def __init__(self, args: list[str], project: Path, env: dict | None = None):
        environ = {k: v for k, v in os.environ.items() if k != "ORCH_REGISTRY"}
        environ.update(env or {}, PYTHONUNBUFFERED="1", COLUMNS="200")
        self.started = time.monotonic()
        self.wall_started = time.time()
        argv = [sys.executable, "-m", "invoke", "-r", str(ROOT), *args, "--project", str(project)]
        self.proc = subprocess.Popen(argv, cwd=project.parent, env=environ, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    @property
    def output(self) -> str:
        with self._seen:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first output line matching pattern; fails the test if the process ends or time runs out first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                if self.proc.poll() is not None and not self._reader.is_alive():
                    pytest.fail(f"the CLI ended (rc {self.proc.returncode}) before printing /{pattern}/:\n"
                                + "\n".join(self.lines[-40:]))
                if time.monotonic() > deadline:
                    pytest.fail(f"no /{pattern}/ within {timeout:.0f} s:\n" + "\n".join(self.lines[-40:]))
                self._seen.wait(0.2)

    def interrupt(self, group: bool = True) -> None:
        """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group.

        group=False: to the task's process alone, as `kill -INT` or a supervisor sends it;
        its children (uv, the docker build client) then hear of it only from the task.
        """
        if group:
            os.killpg(self.proc.pid, signal.SIGINT)
        else:
            os.kill(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the CLI did not exit within {timeout:.0f} s:\n" + self.output[-4000:])
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def group_alive(self) -> list[str]:
        """Processes still in the CLI's process group (uv, docker build...): there must be none."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":
                try:
                    found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
                except OSError:
                    pass
        return found


def run_cli(args: list[str], project: Path, env: dict | None = None, timeout: float = 600) -> tuple[int, str]:
    cli = Cli(args, project, env)
    rc = cli.finish(timeout)
    return rc, cli.output


def assert_clean_exit_output(output: str) -> None:
    assert "Traceback" not in output, output[-4000:]


def leftovers(root: Path) -> list[str]:
    """Temp files atomic_write (`.<name>.*.tmp`) or anything else might leave next to locks, manifests, Dockerfiles."""
    found = []
    for sub in ("locks", "manifests", "dockerfiles"):
        d = root / sub
        if d.is_dir():
            found += [str(p.relative_to(root)) for p in d.rglob("*") if p.name.endswith(".tmp") or
                      (p.name.startswith(".") and not p.name.endswith(".lock"))]
    ctx = root / ".build" / "ctx"
    if ctx.is_dir():
        found += [str(p.relative_to(root)) for p in ctx.iterdir()]
    return found


def project_copy(tmp_path: Path, *, registry: str | None = None, amd64_only: bool = True) -> Path:
    path = copy_fixture("mini", tmp_path, f"orch-fault-{uuid.uuid4().hex[:8]}")
    text = path.read_text()
    if registry:
        text = text.replace('python: "3.11"', f'python: "3.11"\nregistry: {registry}')
    if amd64_only:  # half the images; the faults do not depend on the platform
        text = text.replace("platforms: [linux/amd64, linux/arm64]", "platforms: [linux/amd64]")
    path.write_text(text)
    return path


def change_app(project_file: Path, size: int = 8 * 1024 * 1024) -> None:
    """A new release: the app gains an incompressible file, so its layer must be built and uploaded."""
    (project_file.parent / "services" / SERVICE / "payload.bin").write_bytes(secrets.token_bytes(size))


def artifact_digest(registry: str, project_name: str) -> str | None:
    m = Registry(registry).get_manifest(f"{project_name}/{SERVICE}", ARTIFACT_TAG)
    return m.digest if m else None


# -- a registry of our own, to kill ----------------------------------------

class PrivateRegistry:
    """Debian's docker-registry on a free loopback port with its own storage (plain HTTP)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.host = f"127.0.0.1:{_free_port()}"
        self.config = root / "config.yml"
        self.config.write_text(registry_server.REGISTRY_CONFIG.format(root=root / "data", addr=self.host))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.root / "registry.log", "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(self.config)], stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while not Registry(self.host, retries=0, timeout=2).ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                unavailable(f"docker-registry did not come up on {self.host}: "
                            f"{(self.root / 'registry.log').read_text()[-500:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def uploads_receiving(self, at_least: int = 1_000_000) -> list[Path]:
        """Layer uploads the registry is writing bytes into right now (they vanish when completed).

        Configs and manifests are kilobytes; at_least picks a layer's upload.
        """
        found = []
        # os.walk, not Path.glob: an upload directory the registry removes mid-walk is skipped, not an error.
        for top, _dirs, files in os.walk(self.root / "data" / "docker/registry/v2/repositories"):
            if "data" in files and Path(top).parent.name == "_uploads":
                try:
                    if (Path(top) / "data").stat().st_size >= at_least:
                        found.append(Path(top) / "data")
                except OSError:
                    pass
        return found


@pytest.fixture
def private_registry(engine_ready, tmp_path):
    if not shutil.which("docker-registry"):
        unavailable("Debian's docker-registry is not installed (ci/setup.sh installs it)")
    reg = PrivateRegistry(tmp_path / "registry")
    reg.start()
    yield reg
    reg.stop()


def test_a_registry_killed_mid_upload_fails_in_bounded_time_keeps_the_old_manifest_and_a_rerun_sends_the_rest(
        private_registry, first_build, tmp_path):
    project = project_copy(tmp_path, registry=private_registry.host)
    name = project.read_text().split("project: ", 1)[1].split()[0]
    rc, out = run_cli(["publish", "--no-smoke", "--json"], project)
    assert rc == 0, out[-4000:]
    full_release = json.loads(out[out.index("{"):])["uploaded_bytes"]
    old = artifact_digest(private_registry.host, name)
    assert old is not None

    change_app(project, APP_BLOB_BYTES)
    publishing = Cli(["publish", "--no-smoke"], project)
    deadline = time.monotonic() + 300
    while not private_registry.uploads_receiving():
        if publishing.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the new app layer never started uploading:\n" + publishing.output[-4000:])
        time.sleep(0.01)
    private_registry.kill()
    killed = time.monotonic()

    # The bound follows from the client's settings. One logical request against a registry that never
    # answers takes at most worst_case_seconds (every attempt timing out, backing off in between). After
    # the kill: the PATCH in flight fails (one attempt), the upload asks the registry how far it got (one
    # request, retried) and gives up; the run then waits for what another thread has in flight (one more
    # request) and drops the rest. A killed process refuses at once, so in practice only backoff counts.
    one_request = transport_mod.worst_case_seconds(transport_mod.DEFAULT_TIMEOUT_S, transport_mod.DEFAULT_RETRIES)
    bound = transport_mod.DEFAULT_TIMEOUT_S + transport_mod.FIRST_BACKOFF_S + 2 * one_request + 10  # 10: exiting
    rc = publishing.finish(timeout=bound)
    took = time.monotonic() - killed
    out = publishing.output
    print(f"publish failed {took:.1f} s after the registry was killed (bound {bound:.0f} s), rc {rc}")
    print("\n".join(out.splitlines()[-3:]))
    assert rc == 1
    assert_clean_exit_output(out)
    assert f"registry {private_registry.host} is unreachable" in out
    assert publishing.group_alive() == []

    private_registry.start()  # the same storage
    assert artifact_digest(private_registry.host, name) == old  # the previous release is still the one served

    rc, out = run_cli(["publish", "--no-smoke", "--json"], project)
    assert rc == 0, out[-4000:]
    rerun = json.loads(out[out.index("{"):])["uploaded_bytes"]
    print(f"full release {full_release:,} bytes; re-run after the kill {rerun:,} bytes")
    assert artifact_digest(private_registry.host, name) != old
    # Only what the first release lacked: the new app layer (incompressible; it did not land before the
    # kill, and an upload session does not outlive its run) and the new configs and manifests.
    assert APP_BLOB_BYTES <= rerun < APP_BLOB_BYTES + 1_000_000


# -- an engine of our own (the second_engine fixture, tests/integration/conftest.py), to kill --

def test_an_engine_killed_during_a_build_is_named_in_a_clear_error_and_no_tag_is_written(
        second_engine, first_build, tmp_path):
    from orchestrator.project import spec

    path = project_copy(tmp_path)
    project = spec.load(path)
    change_app(path)  # the app stage must run: no cached layer stands in for it
    try:
        building = Cli(["build", "--backend", "cpu", "--platform", "linux/amd64"], path,
                       env={"DOCKER_HOST": second_engine.address})
        step = building.wait_for(r"echo/cpu amd64 app .*#\d+ \[app \d/\d\] (COPY|RUN)", timeout=300)
        second_engine.kill()
        rc = building.finish(timeout=120)
        out = building.output
        print(f"killed the engine at: {step.strip()}\n" + "\n".join(out.splitlines()[-3:]))
        assert rc == 1
        assert_clean_exit_output(out)
        assert (f"the Docker Engine at {second_engine.address} stopped answering "
                "during the build of echo/cpu amd64") in out
        assert building.group_alive() == []  # the docker build client is gone too
        assert Registry(project.registry).tags(f"{project.name}/{SERVICE}") == []
        assert leftovers(path.parent) == []
    finally:
        cleanup_namespace(project)


# -- Ctrl-C ----------------------------------------------------------------

def open_files() -> set[str]:
    found = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            found.add(os.readlink(fd))
        except OSError:
            pass
    return found


def orphaned_temp_blobs(since: float) -> list[str]:
    """Half-written layer blobs (`.blob-*` in the blob cache) made since then that no process holds open.

    The cache is shared with whatever else runs on this machine: a temp blob
    another build is writing is open, one of ours that leaked is not.
    """
    from orchestrator.oci import layers

    root = layers.default_cache().root
    candidates = [p for p in root.glob(".blob-*") if p.stat().st_mtime >= since]
    held = open_files() if candidates else set()
    return [p.name for p in candidates if str(p) not in held]


def assert_interrupted_cleanly(cli: Cli, root: Path) -> None:
    rc = cli.finish(timeout=120)
    out = cli.output
    print("\n".join(out.splitlines()[-2:]) + f"\n(rc {rc})")
    assert rc == 130
    assert out.rstrip().endswith("interrupted")
    assert_clean_exit_output(out)
    assert cli.group_alive() == []  # uv, the docker build client: none outlives the task
    assert leftovers(root) == []
    assert orphaned_temp_blobs(since=cli.wall_started) == []


def lock_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "locks").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("to", ["process group", "task alone"])
def test_ctrl_c_during_lock_leaves_every_lock_either_as_it_was_or_complete(engine_ready, tmp_path, to):
    from orchestrator.project import lock as lock_mod

    path = copy_fixture("mini", tmp_path)
    root = path.parent
    before = lock_files(root)
    (root / "requirements" / "shared.in").write_text("idna==3.9\n")  # every target re-locks, one uv run per layer
    (root / "requirements" / "echo.in").write_text("six==1.17.0\n")

    locking = Cli(["lock"], path)
    locking.wait_for(r"^locking cuda13 for linux/arm64", timeout=120)  # the first target's locks are written
    locking.interrupt(group=to == "process group")
    assert_interrupted_cleanly(locking, root)

    after = lock_files(root)
    assert after.keys() == before.keys()
    rewritten = [name for name in after if after[name] != before[name]]
    print(f"rewritten before Ctrl-C: {rewritten}")
    for name in rewritten:
        assert lock_mod.parse_pins(after[name].decode())  # whole, with its pins, never a torn file
    rc, out = run_cli(["lock", "--check"], path)
    assert rc == 1 and "Traceback" not in out and "error" not in out.lower(), out
    stale = {line.split(": ")[1] for line in out.splitlines() if line.startswith("stale: ")}
    print(f"named stale by lock --check: {sorted(stale)}")
    assert stale and not stale & set(rewritten)  # what was rewritten is complete and fresh; the rest is named

    if to == "process group":
        return  # one networked re-lock serves: it starts from locks in the state both ways of Ctrl-C leave
    rc, out = run_cli(["lock"], path)
    assert rc == 0, out
    rc, out = run_cli(["lock", "--check"], path)
    assert rc == 0, out


@pytest.mark.parametrize("to", ["process group", "task alone"])
def test_ctrl_c_during_build_stops_the_build_client_and_tags_nothing(engine_ready, first_build, tmp_path, to):
    from orchestrator.project import spec

    path = project_copy(tmp_path)
    project = spec.load(path)
    change_app(path)
    try:
        building = Cli(["build", "--backend", "cpu", "--platform", "linux/amd64"], path)
        building.wait_for(r"echo/cpu amd64 app .*#\d+ \[app \d/\d\] (COPY|RUN)", timeout=300)
        building.interrupt(group=to == "process group")
        assert_interrupted_cleanly(building, path.parent)
        assert Registry(project.registry).tags(f"{project.name}/{SERVICE}") == []
    finally:
        cleanup_namespace(project)


def test_ctrl_c_during_publish_keeps_the_previous_backend_manifest_served_and_on_disk(engine_ready, first_build,
                                                                                       tmp_path):
    from orchestrator.project import spec

    path = project_copy(tmp_path)
    project = spec.load(path)
    try:
        rc, out = run_cli(["publish", "--no-smoke"], path)
        assert rc == 0, out[-4000:]
        old = artifact_digest(project.registry, project.name)
        written = path.parent / "manifests" / f"{SERVICE}-0.1.0.backends.json"
        old_bytes = written.read_bytes()

        change_app(path)
        publishing = Cli(["publish", "--no-smoke"], path)
        publishing.wait_for(rf"{SERVICE}/cpu: pushing .* in the background", timeout=300)
        publishing.interrupt()
        assert_interrupted_cleanly(publishing, path.parent)
        assert artifact_digest(project.registry, project.name) == old
        assert written.read_bytes() == old_bytes
    finally:
        cleanup_namespace(project)


# -- a full disk under the blob cache ---------------------------------------

EXPORT_ONE_STAGE = """
import sys, types
from pathlib import Path
from orchestrator.build import export
from orchestrator.common.errors import OrchestratorError
from orchestrator.oci import layers
image = types.SimpleNamespace(key="fill", backend=types.SimpleNamespace(name="cpu"), arch="amd64",
                              platform="linux/amd64")
try:
    export.export_stage(image, "app", Path(sys.argv[1]), {}, layers.default_cache(), layers.codec("gzip"))
except OrchestratorError as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
print("exported")
"""


def process_group(pgid: int) -> list[str]:
    """Live processes of a process group (the exporter and any docker build client it started)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200])
        except (OSError, IndexError, ValueError):
            pass
    return found


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs, unmounted afterwards: a disk that fills in the middle of an export."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        unavailable("mounting a tmpfs needs root")
    where = tmp_path / "tiny"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_blob_cache_disk_that_fills_mid_export_stops_the_build_client_and_names_the_disk(engine_ready, tmp_path,
                                                                                           tiny_disk):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    # 10 MiB that do not compress, five times in one layer stage: a 50 MiB blob for a 4 MiB disk, and
    # more than the compressor reads ahead (3 chunks of 4 MiB per core) before the first failed write shows.
    (ctx / "fill.bin").write_bytes(secrets.token_bytes(10 * 1024 * 1024))
    (ctx / "Dockerfile").write_text("FROM scratch AS app-layer\n" + "".join(f"COPY fill.bin /fill-{i}.bin\n"
                                                                            for i in range(5)))
    env = {**os.environ, "ORCH_CACHE_DIR": str(tiny_disk), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", EXPORT_ONE_STAGE, str(ctx)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)  # a hang guard, not a timing: a stuck export never returns
    except subprocess.TimeoutExpired:
        left = process_group(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the export hung on the full disk; still running: {left}")
    print(err[-3000:])
    assert proc.returncode == 1 and "exported" not in out, err[-3000:]
    assert f"no space left on {tiny_disk} " in err and "ORCH_CACHE_DIR" in err, err[-3000:]
    assert "Traceback" not in err
    assert process_group(proc.pid) == []  # no docker build client outlives the failed export
    assert not list((tiny_disk / "blobs").glob(".blob-*"))  # the partial blob is gone, the space with it
