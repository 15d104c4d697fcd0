"""Builds on several engines: `builders:` maps a platform to a Docker endpoint.

A second dockerd on this machine (its own socket, data root, exec root and
bridge: the second_engine fixture) builds linux/arm64 while the shared
engine builds linux/amd64, at the same time and from cold caches. What
comes out is what one engine makes of the same inputs: the same layers,
configs and image manifests, and so the same indexes under the human tags
that publish promotes from the two-engine run.
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading

import docker
import pytest

from orchestrator import flow
from orchestrator.build import export
from orchestrator.debian import layer as apt_layer
from orchestrator.machine import daemon
from orchestrator.release import publish
from orchestrator.project import spec
from orchestrator.oci import image as image_mod
from orchestrator.common.errors import EnvironmentProblem
from orchestrator.oci.registry import Registry, split_ref

from ..conftest import cleanup_namespace, ready_mini

pytestmark = pytest.mark.engine

ARM = "linux/arm64"
AMD = "linux/amd64"


def quiet(*_):
    pass


def identity(results) -> dict:
    """(image, backend, platform) -> (image digest, config digest, layer digests)."""
    return {(r.image.key, r.image.backend.name, r.image.platform):
            (r.digest, r.assembled.config_digest, [layer.digest for layer in r.assembled.layers]) for r in results}


def indexes(results) -> dict:
    """(image, backend) -> the digest of the OCI index over its platforms, as publish assembles it."""
    groups: dict[tuple[str, str], list] = {}
    for r in results:
        groups.setdefault((r.image.key, r.image.backend.name), []).append((r.image.platform, r.assembled))
    return {k: image_mod.digest_of(image_mod.index(members)) for k, members in groups.items()}


class Log:
    """Build log lines as they come, with the thread that logged each."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        with self.lock:
            self.lines.append((threading.current_thread().name, msg))

    def index(self, fragment: str) -> list[int]:
        return [i for i, (_, msg) in enumerate(self.lines) if fragment in msg]

    def text(self) -> str:
        return "\n".join(f"[{t}] {m}" for t, m in self.lines)


class ConnectProxy(socketserver.ThreadingTCPServer):
    """An HTTP CONNECT proxy on the second engine's bridge, so its build containers reach PyPI.

    The second engine leaves the host firewall alone (no NAT for its bridge),
    so its containers reach this machine and nothing beyond; pip goes through
    here instead. The docker CLI hands the proxy to the builds of that engine
    alone (config.json `proxies`, keyed by engine), as for a remote builder
    behind a proxy; BuildKit keeps proxy variables out of the build's cache
    keys and of the layers.
    """

    daemon_threads = True
    allow_reuse_address = True

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            request = self.rfile.readline().decode("latin-1").split()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            if len(request) < 2 or request[0] != "CONNECT":
                self.wfile.write(b"HTTP/1.1 405 CONNECT only\r\n\r\n")
                return
            host, _, port = request[1].rpartition(":")
            try:
                upstream = socket.create_connection((host, int(port)), timeout=30)
            except OSError:
                self.wfile.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                return
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.wfile.flush()
            pair = {self.connection: upstream, upstream: self.connection}
            with upstream:
                while True:
                    ready, _, _ = select.select(list(pair), [], [], 120)
                    if not ready:
                        return
                    for s in ready:
                        data = s.recv(1 << 16)
                        if not data:
                            return
                        pair[s].sendall(data)

    def __init__(self, address: str):
        super().__init__((address, 0), self.Handler)
        self.url = f"http://{address}:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def second_engine(module_second_engine):
    """The module's second engine (tests/integration/conftest.py), started once: no test here kills it."""
    return module_second_engine


def build_cache_ids(engine) -> set[str]:
    return {c["ID"] for c in docker.DockerClient(base_url=engine.address).df().get("BuildCache") or []}


@pytest.fixture
def second_engine_online(second_engine, tmp_path, monkeypatch):
    """The second engine, its builds reaching the Internet through a proxy on its bridge."""
    info = json.loads(subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", second_engine.bridge],
                                     capture_output=True, text=True, check=True).stdout)
    proxy = ConnectProxy(info[0]["addr_info"][0]["local"])
    config = tmp_path / "docker-config"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"proxies": {second_engine.address: {
        "httpProxy": proxy.url, "httpsProxy": proxy.url, "noProxy": "localhost,127.0.0.1"}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    try:
        yield second_engine
    finally:
        proxy.shutdown()
        proxy.server_close()


class TLSFront(socketserver.ThreadingTCPServer):
    """tcp://127.0.0.1:<port> with TLS that demands a client certificate, the second engine's socket behind it.

    To the client this is a Docker Engine started with --tlsverify: what is
    tested is our side, docker-py and the docker CLI finding the CA and the
    client certificate through DOCKER_TLS_VERIFY and DOCKER_CERT_PATH.
    """

    daemon_threads = True

    def __init__(self, engine_socket: str, ca: str, cert: str, key: str):
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.tls.load_verify_locations(ca)
        self.tls.verify_mode = ssl.CERT_REQUIRED
        self.engine_socket = engine_socket
        self.verified_clients = 0
        super().__init__(("127.0.0.1", 0), self.Handler)
        self.address = f"tcp://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            try:
                conn = self.server.tls.wrap_socket(self.request, server_side=True)
            except (ssl.SSLError, OSError):
                return  # no client certificate, or not ours
            self.server.verified_clients += 1
            with conn, socket.socket(socket.AF_UNIX) as engine_side:
                engine_side.connect(self.server.engine_socket)
                while True:
                    ready = [conn] if conn.pending() else select.select([conn, engine_side], [], [], 300)[0]
                    if not ready:
                        return
                    for src, dst in ((conn, engine_side), (engine_side, conn)):
                        if src in ready:
                            data = src.recv(1 << 16)
                            if not data:
                                return
                            dst.sendall(data)


def client_certificates(d) -> tuple[dict, str]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate in Docker's DOCKER_CERT_PATH layout."""
    from ..tls import make_tls

    tls = make_tls(d / "ca")
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "key.pem",
        "-out", "client.csr", "-subj", "/CN=orch test client")
    (d / "client.cnf").write_text("extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "client.csr", "-CA", str(tls["ca"]), "-CAkey", str(d / "ca" / "ca.key"),
        "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "client.cnf")
    cert_path = d / "docker-certs"
    cert_path.mkdir()
    shutil.copy(tls["ca"], cert_path / "ca.pem")
    shutil.copy(d / "cert.pem", cert_path / "cert.pem")
    shutil.copy(d / "key.pem", cert_path / "key.pem")
    return tls, str(cert_path)


@pytest.fixture
def project_file(engine_ready, tmp_path):
    """The mini fixture under its own namespace, locked, bases pinned; its tags deleted afterwards."""
    project = ready_mini(tmp_path, "orch-builders")
    try:
        yield project.file
    finally:
        cleanup_namespace(project)


def test_two_engines_build_their_platforms_at_once_and_make_the_digests_one_engine_makes(
        second_engine_online, project_file, monkeypatch):
    second_engine = second_engine_online
    cache_before = build_cache_ids(second_engine)
    one_engine = spec.load(project_file)
    single = flow.build(one_engine, log=quiet)

    project_file.write_text(project_file.read_text() + f"builders:\n  {ARM}: {second_engine.address}\n")
    two_engines = spec.load(project_file)
    assert two_engines.builders[ARM].host == second_engine.address
    log = Log()
    # --force skips content tags and the layer cache, --no-cache BuildKit's cache: every stage runs again on its
    # engine. The Debian layers are the tool's own work on this machine, whatever the builder (no engine runs
    # them): they come from the layer cache the one-engine build used (rebuilt, they cost a minute per image).
    real_debian_layer = apt_layer.build_layer
    monkeypatch.setattr(apt_layer, "build_layer", lambda *a, **kw: real_debian_layer(*a, **{**kw, "reuse": True}))
    results = flow.build(two_engines, force=True, no_cache=True, log=log)
    print(log.text())

    # Which engine builds which platform is said up front, and every image built names its engine.
    assert log.index(f"{ARM}: builds on {second_engine.address} (builders.{ARM}), a linux/amd64 engine")
    assert log.index(f"{AMD}: builds on {daemon.engine_address()} (the default engine)")
    arm_builds = log.index(f" {ARM}: building ")
    amd_builds = log.index(f" {AMD}: building ")
    assert {r.image.platform for r in results if r.built} == {AMD, ARM} and all(r.built for r in results)
    assert len(arm_builds) == sum(r.image.platform == ARM for r in results)
    assert all(log.lines[i][1].endswith(f" on {second_engine.address}") for i in arm_builds)
    assert all(log.lines[i][1].endswith(f" on {daemon.engine_address()}") for i in amd_builds)

    # At once: each engine on its own thread, and each one's run overlaps the other's in the log.
    assert len({log.lines[i][0] for i in arm_builds} | {log.lines[i][0] for i in amd_builds}) == 2
    assert arm_builds[0] < amd_builds[-1] and amd_builds[0] < arm_builds[-1]
    # Each engine keeps the plan's order: its CUDA-libs image before the services built on it.
    for platform in (AMD, ARM):
        assert log.index(f"cuda-libs/cuda13 {platform}: building")[0] < log.index(f"echo/cuda13 {platform}: building")[0]

    # The arm64 images really were built by the second engine: its BuildKit ran their stages (new cache records).
    second = docker.DockerClient(base_url=second_engine.address)
    cache = [c for c in second.df().get("BuildCache") or [] if c["ID"] not in cache_before]
    print(f"second engine build cache: {len(cache)} new records, e.g. "
          f"{sorted({c.get('Description', '')[:60] for c in cache})[:5]}")
    assert cache

    # Byte for byte what one engine made: layers, configs, image manifests, indexes.
    assert identity(results) == identity(single)
    assert indexes(results) == indexes(single)

    # publish assembles the indexes from the two-engine run: the human tags name one engine's indexes.
    publish.promote(two_engines, results, ["echo"], smoke_ran=False, smoked=0, log=quiet)
    reg = Registry(two_engines.registry)
    expected = indexes(single)
    for r in results:
        if r.image.platform != AMD:
            continue
        _, name, _ = split_ref(r.ref)
        for human in r.image.human_tags:
            assert reg.get_manifest(name, human).digest == expected[(r.image.key, r.image.backend.name)], human
    print("digests (one engine == two engines):")
    for (key, backend, platform), (digest, config, layers) in sorted(identity(single).items()):
        print(f"  {key}/{backend} {platform}: image {digest[:19]} config {config[:19]} layers {len(layers)}")
    for (key, backend), digest in sorted(expected.items()):
        print(f"  {key}/{backend} index {digest[:19]}")


def test_a_failing_builder_stops_the_other_and_the_first_failure_is_the_one_reported(
        second_engine, project_file, monkeypatch):
    project_file.write_text(project_file.read_text() + f"builders:\n  {ARM}: {second_engine.address}\n")
    project = spec.load(project_file)
    real = export.export_stage
    amd64_building = threading.Event()

    def arm64_fails_while_amd64_builds(image, stage, *args, **kwargs):
        if image.platform == ARM:
            assert amd64_building.wait(300), "the amd64 engine never started a stage"
            raise EnvironmentProblem(f"simulated: {stage} failed on the arm64 engine")
        amd64_building.set()
        return real(image, stage, *args, **kwargs)

    monkeypatch.setattr(export, "export_stage", arm64_fails_while_amd64_builds)
    log = Log()
    with pytest.raises(EnvironmentProblem, match="simulated: .* failed on the arm64 engine"):
        flow.build(project, backends=["cpu"], services=["echo"], force=True, log=log)
    print(log.text())
    # echo/cpu amd64 had stages left when arm64 failed: it was stopped, not finished, so nothing is tagged.
    assert not log.index("echo/cpu amd64 app: 1 layer ")
    assert Registry(project.registry).tags(f"{project.name}/echo") == []


@pytest.mark.parametrize("to", ["process group", "task alone"])
def test_ctrl_c_stops_the_build_clients_on_both_engines_and_tags_nothing_unfinished(second_engine, project_file, to):
    from .test_faults import Cli, assert_interrupted_cleanly, change_app

    project_file.write_text(project_file.read_text() + f"builders:\n  {ARM}: {second_engine.address}\n")
    project = spec.load(project_file)
    change_app(project_file)  # the app stage must run again, on both engines
    building = Cli(["build", "--backend", "cpu"], project_file)
    building.wait_for(r"echo/cpu arm64 app .*#\d+ \[app \d/\d\] (COPY|RUN)", timeout=300)
    building.interrupt(group=to == "process group")
    # Exit 130, no docker build client left on either engine, no temp files or contexts.
    assert_interrupted_cleanly(building, project_file.parent)
    # amd64 may have finished (and been tagged) first; the arm64 image was interrupted: it has no tag.
    reg = Registry(project.registry)
    name = f"{project.name}/echo"
    for tag in reg.tags(name):
        config = reg.get_manifest(name, tag).json["config"]["digest"]
        assert json.loads(reg.get_blob(name, config))["architecture"] == "amd64", tag


def test_a_tcp_builder_with_tls_builds_through_its_certificate_directory(second_engine, project_file, tmp_path,
                                                                          monkeypatch):
    from .test_faults import change_app

    # A system CA bundle in the environment, as on many machines: requests would let it replace the engine's CA.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", daemon.ca_bundle())
    tls, cert_path = client_certificates(tmp_path / "tls")
    front = TLSFront(str(second_engine.socket), str(tls["ca"]), str(tls["cert"]), str(tls["key"]))
    try:
        project_file.write_text(project_file.read_text() + f"builders:\n  {ARM}:\n    host: {front.address}\n"
                                f"    cert_path: {cert_path}\n")
        project = spec.load(project_file)
        change_app(project_file)  # the app stage runs on the engine behind TLS
        log = Log()
        [result] = flow.build(project, backends=["cpu"], services=["echo"], platforms=[ARM], log=log)
        print(log.text())
        assert result.built and result.image.platform == ARM
        assert log.index(f"{ARM}: builds on {front.address} (builders.{ARM}), a linux/amd64 engine")
        assert log.index("echo/cpu arm64 app: 1 layer ")  # BuildKit ran the stage, through the TLS endpoint
        assert front.verified_clients >= 2  # docker-py and the docker CLI, each with the client certificate
    finally:
        front.shutdown()
        front.server_close()
