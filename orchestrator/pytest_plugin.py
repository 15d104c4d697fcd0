"""pytest fixtures for integration tests against published services (the `pytest11` entry point).

Installed with the package, pytest loads it by itself. A test asks for a
service by name and gets it running, the way a host would run it:

    def test_speaks(orchestrator_service):
        tts = orchestrator_service("tts")           # what `orchestrator select` picks on this host
        assert requests.get(f"{tts.url}/health").ok

    @pytest.mark.orchestrator_backends("tts")        # once per backend of the manifest, this platform
    def test_each_backend(orchestrator_service, orchestrator_backend):
        tts = orchestrator_service("tts", backend=orchestrator_backend)
        assert tts.info["backend_requested"] == orchestrator_backend

Each start reads the service's backend manifest from the registry and
verifies it as `select` does (digests, tags), pulls the image by digest,
asks for GPUs as this host hands them out (CUDA backends only), mounts the
root read-only with a tmpfs on each dir the image's label declares
writable, waits for /health (failing at once when the container exits)
and /ready, and fetches /info. The container is removed after the test; a
failing test's report carries the container's last log lines.

The project file: --orchestrator-project, else the `orchestrator_project`
ini option (relative to the ini file), else as the command line finds it
($ORCH_PROJECT, else project.yaml here or in the nearest directory above).
Everything heavy is imported when a fixture is used, so the plugin costs
nothing in test runs that do not use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MARKER = "orchestrator_backends"
START_TIMEOUT = 60.0  # container start -> /health 200 (as smoke)
READY_TIMEOUT = 180.0  # /health -> /ready 200 (model loading)
LOG_LINES = 50

_started = pytest.StashKey[list]()
_project = pytest.StashKey[Any]()
_host = pytest.StashKey[Any]()


@dataclass
class RunningService:
    """A service container started for a test."""

    service: str
    backend: str
    image: str  # repository@sha256:..., as the backend manifest names it
    container: Any  # testcontainers DockerContainer
    url: str | None = None  # http://HOST:PORT, once /health answered
    info: dict = field(default_factory=dict)  # /info, once /ready answered
    reasons: tuple[str, ...] = ()  # why this backend (select's reasons), when it was chosen for the host

    def logs(self, lines: int = LOG_LINES) -> str:
        """The container's last log lines, stdout and stderr interleaved, under a line saying what ran."""
        try:
            wrapped = self.container.get_wrapped_container()
            wrapped.reload()
            state = wrapped.attrs.get("State") or {}
            status = state.get("Status", "?") + (f", exit code {state.get('ExitCode')}"
                                                 if state.get("Status") in ("exited", "dead") else "")
            text = wrapped.logs(tail=lines).decode(errors="replace").rstrip()
        except Exception as e:  # noqa: BLE001 - removed already, or the engine is gone
            return f"(no logs: {type(e).__name__}: {e})"
        return f"{self.image} ({status})\n{text or '(no output)'}"


# --- configuration ----------------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("orchestrator", "services published with orchestrator")
    group.addoption("--orchestrator-project", dest="orchestrator_project", default=None, metavar="PATH",
                    help="the project file (default: the orchestrator_project ini option, else $ORCH_PROJECT, "
                         "else project.yaml in the current directory or the nearest one above)")
    parser.addini("orchestrator_project", "the orchestrator project file, relative to the ini file", default="")
    parser.addini("orchestrator_log_lines", "container log lines in a failing test's report", default=str(LOG_LINES))


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}(service): run the test once per backend of the service's "
                            "backend manifest on this platform (fixture orchestrator_backend); CUDA backends "
                            "this host cannot run are skipped, saying why")


def project_file(config) -> str:
    """Where the project file is: the option, the ini value, else as `orchestrator` finds it."""
    from orchestrator.cli import find_project

    given = config.getoption("orchestrator_project")
    if given:
        return str(Path(config.invocation_params.dir, given))
    ini = config.getini("orchestrator_project")
    if ini:
        return str(Path(config.inipath.parent if config.inipath else config.rootpath, ini))
    return find_project(None, cwd=Path(config.invocation_params.dir))


def _fail(e: Exception):
    pytest.fail(f"orchestrator: {e}", pytrace=False)


def _load(config):
    from orchestrator import flow
    from orchestrator.common.errors import OrchestratorError

    if _project not in config.stash:
        try:
            config.stash[_project] = flow.load_project(project_file(config))
        except OrchestratorError as e:
            _fail(e)
    return config.stash[_project]


def _host_facts(config):
    """(host probe, docker client, the GPU request a CUDA container gets here), once per session."""
    if _host not in config.stash:
        from orchestrator.host import gpu_request, probe
        from orchestrator.machine import daemon

        client = daemon.docker_client()
        config.stash[_host] = (probe.probe(), client, gpu_request.for_host(client, cuda=True))
    return config.stash[_host]


# --- one test per backend -----------------------------------------------------------

def backend_params(manifest: dict, host, gpu) -> list:
    """pytest.param per backend of the host's platform in fallback order; those it cannot run, skipped."""
    from orchestrator.host.launch import is_cuda_backend
    from orchestrator.host.select import check, walk_order

    entry = manifest["platforms"].get(host.platform)
    if entry is None:
        return [pytest.param(None, id="no-backend", marks=pytest.mark.skip(
            reason=f"the backend manifest has no images for {host.platform}"))]
    params = []
    for name in walk_order(entry):
        spec = entry["backends"][name]
        why = None
        if is_cuda_backend(spec):
            if not gpu.requested:
                why = f"{name} is a CUDA backend and this host gives containers no GPU: {gpu.description}"
            elif not (verdict := check(name, spec, host)).ok:
                why = f"{name}: this host cannot run it: {verdict.detail}"
        params.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=why)] if why else []))
    return params


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None or "orchestrator_backend" not in metafunc.fixturenames:
        return
    from orchestrator import flow
    from orchestrator.common.errors import OrchestratorError

    service = marker.args[0] if marker.args else marker.kwargs.get("service")
    project = _load(metafunc.config)
    if service not in project.services:
        _fail(f"@pytest.mark.{MARKER}({service!r}): {project.file.name} defines {sorted(project.services)}")
    try:
        manifest = flow.backend_manifest(project, service)[0]
    except OrchestratorError as e:
        _fail(e)
    host, _, gpu = _host_facts(metafunc.config)
    metafunc.parametrize("orchestrator_backend", backend_params(manifest, host, gpu))


# --- fixtures ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def orchestrator_project(pytestconfig):
    """The project (orchestrator.project.spec.Project) the services come from."""
    return _load(pytestconfig)


@pytest.fixture
def orchestrator_backend():
    """The backend of this run of a test marked @pytest.mark.orchestrator_backends(SERVICE)."""
    pytest.fail(f"orchestrator_backend needs the marker: @pytest.mark.{MARKER}(\"SERVICE\")", pytrace=False)


@pytest.fixture
def orchestrator_service(request, orchestrator_project):
    """Start a published service: orchestrator_service(NAME, backend=None, env=None) -> RunningService.

    backend None takes what `orchestrator select` picks on this host; a named
    backend is started as asked (a CUDA image on a host without a GPU serves
    on CPU under its fallback policy). The containers are removed afterwards.
    """
    started = request.node.stash.setdefault(_started, [])

    def start(service: str, backend: str | None = None, env: dict[str, str] | None = None,
              start_timeout: float = START_TIMEOUT, ready_timeout: float = READY_TIMEOUT) -> RunningService:
        from orchestrator.common.errors import OrchestratorError

        try:
            return _start(request.config, orchestrator_project, service, backend, env or {}, started,
                          start_timeout, ready_timeout)
        except OrchestratorError as e:
            _fail(e)

    yield start
    for running in started:
        try:
            running.container.stop()
        except Exception:  # noqa: BLE001 - already gone
            pass


def _start(config, project, service: str, backend: str | None, env: dict[str, str], started: list,
           start_timeout: float, ready_timeout: float) -> RunningService:
    import requests
    from testcontainers.core.container import DockerContainer  # its import costs a few 100 ms

    from orchestrator import flow
    from orchestrator.common.errors import UserError
    from orchestrator.host import gpu_request
    from orchestrator.host.contract import run_options_for
    from orchestrator.host.launch import is_cuda_backend
    from orchestrator.host.select import select
    from orchestrator.oci.registry import docker_auth_config
    from orchestrator.release.smoke.checks import wait_health, wait_ready

    if service not in project.services:
        raise UserError(f"no service {service!r} in {project.file}", f"pick one of {sorted(project.services)}")
    host, client, _ = _host_facts(config)
    manifest, source, ref, digest = flow.backend_manifest(project, service)
    reasons: tuple[str, ...] = ()
    if backend is None:
        choice = select(manifest, host, None, source)
        backend, reasons = choice.backend, choice.reasons
    entry = manifest["platforms"].get(host.platform) or {"backends": {}}
    if backend not in entry["backends"]:
        raise UserError(f"{service}: backend {backend!r} is not published for {host.platform} "
                        f"(available: {sorted(entry['backends'])})", "pass one of those, or none to let select choose")
    flow.verify(project, manifest, source, ref, digest, host.platform, [backend])  # as `orchestrator select` does
    spec = entry["backends"][backend]
    image = spec["image"]
    try:
        client.images.get(image)
    except Exception:  # noqa: BLE001 - not here yet: pulled by digest, with the tool's credentials
        client.images.pull(image, platform=host.platform, auth_config=docker_auth_config(image.split("/")[0]))
    labels = client.images.get(image).attrs.get("Config", {}).get("Labels") or {}
    gpu = gpu_request.for_host(client, cuda=is_cuda_backend(spec))
    port = project.services[service].port
    container = DockerContainer(image).with_exposed_ports(port)
    for k, v in {**env, **gpu.environment}.items():
        container = container.with_env(k, v)
    options = run_options_for(labels)  # read-only root, a tmpfs on each dir the image declares writable
    container.tmpfs.update(options.pop("tmpfs"))  # testcontainers passes its own tmpfs dict to the engine
    container = container.with_kwargs(**gpu.kwargs(), **options)
    running = RunningService(service, backend, image, container, reasons=reasons)
    started.append(running)
    container.start()
    ok, detail, url = wait_health(container, port, start_timeout)
    if not ok:
        pytest.fail(f"{service}/{backend} did not come up: {detail}", pytrace=False)
    running.url = url
    ok, detail = wait_ready(url, ready_timeout)
    if not ok:
        pytest.fail(f"{service}/{backend}: {detail}", pytrace=False)
    running.info = requests.get(f"{url}/info", timeout=10).json()
    return running


# --- reporting ----------------------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    started = item.stash.get(_started, None)
    if not started or not report.failed:
        return
    lines = int(item.config.getini("orchestrator_log_lines") or LOG_LINES)
    for running in started:
        report.sections.append((f"orchestrator: {running.service}/{running.backend} container log "
                                f"(last {lines} lines)", running.logs(lines)))
