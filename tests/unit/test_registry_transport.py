"""The registry client's transport and upload logic against fake registries.

Fake registries are http.server instances in threads on 127.0.0.1; names
ending in .test resolve there too (socket.getaddrinfo is patched), which
is how a non-loopback host name is played without a network. TLS material
is a throwaway CA and server certificate made with the openssl CLI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from orchestrator.oci import registry
from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.oci.registry import client
from orchestrator.oci.registry import transport

from ..tls import make_tls


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- a fake registry ---------------------------------------------------------

class FakeRegistry:
    """Enough of the distribution API for the client, with knobs for faults and auth."""

    def __init__(self, auth: str | None = None, user: str = "bob", password: str = "pw"):
        self.auth, self.user, self.password = auth, user, password
        self.realm: str | None = None  # bearer: defaults to this server's /token
        self.blobs: dict[str, bytes] = {}
        self.links: set[tuple[str, str]] = set()  # (repository, digest): blobs are per repository
        self.uploads: dict[str, bytearray] = {}
        self.manifests: dict[tuple[str, str], tuple[str, bytes]] = {}
        self.tag_list: dict[str, list[str]] = {}
        self.page_size: int | None = None
        self.log: list[tuple[str, str, str | None]] = []
        self.token_requests: list[tuple[dict, str | None]] = []
        self.redirect_blobs_to: str | None = None
        self.fail: dict[str, list] = {}  # method -> queue of faults: int status, or ("cut", nbytes)
        self.deny_pull_only_for_missing = False
        self.server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def start(self, tls: tuple[str, str] | None = None) -> "FakeRegistry":
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_blob(self, name: str, data: bytes) -> str:
        self.blobs[sha(data)] = data
        self.links.add((name, sha(data)))
        return sha(data)

    def methods(self, kind: str | None = None) -> list[str]:
        return [m for m, p, _ in self.log if kind is None or kind in p]


def _handler(fake: FakeRegistry):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        # -- helpers
        def reply(self, code, body=b"", headers=None):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def authorized(self) -> bool:
            got = self.headers.get("Authorization")
            if fake.auth is None:
                return True
            if fake.auth == "basic":
                ok = got == "Basic " + base64.b64encode(f"{fake.user}:{fake.password}".encode()).decode()
                if not ok:
                    self.body()
                    self.reply(401, {"errors": [{"code": "UNAUTHORIZED"}]},
                               {"WWW-Authenticate": 'Basic realm="fake"'})
                return ok
            if got and got.startswith("Bearer "):
                scopes = got[7:].split("|")
                m = re.match(r"/v2/(.+?)/(manifests|blobs|tags)/", self.path)
                if not m:
                    return True
                repo = m.group(1)
                granted = [s for s in scopes if s.startswith(f"repository:{repo}:")]
                if granted:
                    if (fake.deny_pull_only_for_missing and "push" not in granted[0]
                            and not any(k[0] == repo for k in fake.manifests)):
                        self.body()
                        self.reply(403, {"errors": [{"code": "DENIED"}]})
                        return False
                    return True
            realm = fake.realm or f"http://{fake.host}/token"
            self.body()
            self.reply(401, {"errors": [{"code": "UNAUTHORIZED"}]},
                       {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'})
            return False

        def fault(self) -> bool:
            queue = fake.fail.get(self.command)
            if not queue:
                return False
            f = queue.pop(0)
            if isinstance(f, tuple) and f[0] == "cut":  # take some bytes, then drop the connection
                data = self.body()
                uid = self.path.split("/")[-1].split("?")[0]
                fake.uploads[uid] += data[:f[1]]
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return True
            self.body()
            self.reply(f, {"errors": [{"code": "UNKNOWN"}]})
            return True

        def route(self):
            fake.log.append((self.command, self.path, self.headers.get("Authorization")))
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/token":
                fake.token_requests.append((q, self.headers.get("Authorization")))
                expected = "Basic " + base64.b64encode(f"{fake.user}:{fake.password}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    return self.reply(401, {})
                scopes = parse_qs(url.query).get("scope", [])
                return self.reply(200, {"token": "|".join(scopes) or "none", "expires_in": 300})
            if url.path == "/v2/":
                return self.reply(200, {}) if self.authorized() else None
            if not self.authorized() or self.fault():
                return None
            m = re.fullmatch(r"/v2/(.+?)/(blobs/uploads|manifests|blobs|tags)/(.*)", url.path)
            if not m:
                return self.reply(404, {})
            name, kind, ref = m.groups()
            return getattr(self, f"do_{kind.replace('/', '_')}")(name, ref, q)

        do_GET = do_HEAD = do_POST = do_PATCH = do_PUT = do_DELETE = route

        # -- the API
        def do_tags(self, name, ref, q):
            tags = sorted(fake.tag_list.get(name, []))
            if name not in fake.tag_list:
                return self.reply(404, {})
            if "last" in q:
                tags = [t for t in tags if t > q["last"]]
            n = int(q.get("n") or fake.page_size or 0) or len(tags)
            page, headers = tags[:n], {}
            if len(tags) > n:
                headers["Link"] = f'</v2/{name}/tags/list?last={page[-1]}&n={n}>; rel="next"'
            self.reply(200, {"name": name, "tags": page}, headers)

        def do_manifests(self, name, ref, q):
            if self.command == "PUT":
                body = self.body()
                fake.manifests[(name, ref)] = (self.headers["Content-Type"], body)
                fake.manifests[(name, sha(body))] = (self.headers["Content-Type"], body)
                return self.reply(201, b"", {"Docker-Content-Digest": sha(body)})
            if (name, ref) not in fake.manifests:
                return self.reply(404, {})
            if self.command == "DELETE":
                del fake.manifests[(name, ref)]
                return self.reply(202)
            ctype, body = fake.manifests[(name, ref)]
            self.reply(200, body, {"Content-Type": ctype, "Docker-Content-Digest": sha(body)})

        def do_blobs(self, name, digest, q):
            if (name, digest) not in fake.links:
                return self.reply(404, {})
            if self.command == "GET" and fake.redirect_blobs_to:
                return self.reply(307, b"", {"Location": f"{fake.redirect_blobs_to}/storage/{digest}?sig=x"})
            data = fake.blobs[digest]
            if self.command == "HEAD":
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Docker-Content-Digest", digest)
                return self.end_headers()
            self.reply(200, data, {"Docker-Content-Digest": digest})

        def do_blobs_uploads(self, name, uid, q):
            if self.command == "POST":
                if "mount" in q:
                    if (q.get("from"), q["mount"]) in fake.links:
                        fake.links.add((name, q["mount"]))
                        return self.reply(201, b"", {"Docker-Content-Digest": q["mount"]})
                uid = uuid.uuid4().hex
                fake.uploads[uid] = bytearray()
                return self.reply(202, b"", {"Location": f"/v2/{name}/blobs/uploads/{uid}", "Range": "0-0"})
            if uid not in fake.uploads:
                self.body()
                return self.reply(404, {})
            held = fake.uploads[uid]
            if self.command == "GET":
                return self.reply(204, b"", {"Location": f"/v2/{name}/blobs/uploads/{uid}",
                                             "Range": f"0-{max(len(held) - 1, 0)}"})
            if self.command == "DELETE":
                del fake.uploads[uid]
                return self.reply(204)
            data = self.body()
            if self.command == "PATCH":
                start = int(self.headers["Content-Range"].split("-")[0])
                if start != len(held):
                    return self.reply(416, {})
                held += data
                return self.reply(202, b"", {"Location": f"/v2/{name}/blobs/uploads/{uid}",
                                             "Range": f"0-{len(held) - 1}"})
            held += data  # PUT ?digest=
            if sha(bytes(held)) != q.get("digest"):
                return self.reply(400, {"errors": [{"code": "DIGEST_INVALID"}]})
            fake.blobs[q["digest"]] = bytes(held)
            fake.links.add((name, q["digest"]))
            del fake.uploads[uid]
            self.reply(201, b"", {"Docker-Content-Digest": q["digest"]})

    return H


class Storage(BaseHTTPRequestHandler):
    """Where a blob GET is redirected: records what it was sent."""

    seen: list = []
    data = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        Storage.seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Length", str(len(Storage.data)))
        self.end_headers()
        self.wfile.write(Storage.data)


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real credentials, trust, insecure lists, proxies or backoff sleeps leak into these tests."""
    for var in ("REGISTRY_USERNAME", "REGISTRY_PASSWORD", "ORCH_INSECURE_REGISTRIES", "SSL_CERT_FILE",
                "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("ORCH_CERTS_D", str(tmp_path / "certs.d"))
    monkeypatch.setattr(transport, "DAEMON_JSON", tmp_path / "daemon.json")
    monkeypatch.setattr(transport, "sleep", lambda s: None)
    real = socket.getaddrinfo

    def resolve(host, *args, **kw):  # *.test names are this machine, reached by a non-loopback name
        return real("127.0.0.1" if str(host).endswith(".test") else host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


@pytest.fixture
def fake():
    servers = []

    def make(auth=None, tls=None, **kw):
        f = FakeRegistry(auth, **kw).start(tls)
        servers.append(f)
        return f

    yield make
    for f in servers:
        f.stop()


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(client, "CHUNK", 1000)
    return 1000


def test_a_registry_with_a_namespace_path_talks_to_the_host(fake):
    f = fake()
    f.tag_list["acme/morgan/tts"] = ["1"]
    reg = registry.Registry(f"{f.host}/acme")
    assert reg.host == f.host and reg.namespace == "acme" and repr(reg) == f"Registry({f.host!r})"
    assert reg.tags("acme/morgan/tts") == ["1"]
    assert f.log[-1][1] == "/v2/acme/morgan/tts/tags/list"
    assert registry.split_ref("ghcr.io/acme/morgan/tts:1") == ("ghcr.io", "acme/morgan/tts", "1")
    assert registry.registry_host("https://ghcr.io/acme") == "ghcr.io"


# -- scheme and trust --------------------------------------------------------

def test_a_loopback_registry_speaking_plain_http_is_used_over_http_after_a_quick_probe(fake):
    f = fake()
    reg = registry.Registry(f.host)
    started = time.monotonic()
    assert reg.ping()
    assert time.monotonic() - started < 1.0
    assert reg.base == f"http://{f.host}/v2"


def test_https_comes_first_on_loopback_and_a_certs_d_ca_is_trusted(fake, tmp_path):
    tls = make_tls(tmp_path / "tls")
    f = fake(tls=(str(tls["cert"]), str(tls["key"])))
    (tmp_path / "certs.d" / f.host).mkdir(parents=True)
    shutil.copy(tls["ca"], tmp_path / "certs.d" / f.host / "ca.crt")
    f.tag_list["a/b"] = ["x"]
    reg = registry.Registry(f.host)
    assert reg.tags("a/b") == ["x"]
    assert reg.base == f"https://{f.host}/v2"


def test_an_untrusted_certificate_says_where_the_ca_goes(fake, tmp_path, monkeypatch):
    tls = make_tls(tmp_path / "tls")
    f = fake(tls=(str(tls["cert"]), str(tls["key"])))
    reg = registry.Registry(f.host)
    with pytest.raises(EnvironmentProblem, match="not trusted") as e:
        reg.tags("a/b")
    assert str(tmp_path / "certs.d" / f.host / "ca.crt") in str(e.value) and "SSL_CERT_FILE" in str(e.value)
    assert not reg.ping()
    monkeypatch.setenv("SSL_CERT_FILE", str(tls["ca"]))  # a bundle that has the CA works as well
    assert registry.Registry(f.host).ping()


def test_a_non_loopback_host_is_https_only_unless_listed_as_insecure(fake, monkeypatch):
    f = fake()
    name = f"plain.test:{f.server.server_address[1]}"
    with pytest.raises(EnvironmentProblem):
        registry.Registry(name, retries=0).check()
    assert f.log == []  # nothing went to it as plain HTTP
    monkeypatch.setenv("ORCH_INSECURE_REGISTRIES", f"other.test, {name}")
    reg = registry.Registry(name)
    reg.check()
    assert reg.base == f"http://{name}/v2"


def test_insecure_registries_come_from_the_daemon_json_too(tmp_path, monkeypatch):
    (tmp_path / "daemon.json").write_text(json.dumps({"insecure-registries": ["reg.test:5000", "10.0.0.0/8"]}))
    assert transport.is_insecure("reg.test:5000") and transport.is_insecure("10.1.2.3:5000")
    assert not transport.is_insecure("reg.test:5001") and not transport.is_insecure("ghcr.io")


def test_client_certificates_in_certs_d_are_found(tmp_path):
    d = tmp_path / "certs.d" / "reg.test:5000"
    d.mkdir(parents=True)
    assert transport.client_cert("reg.test:5000") is None
    (d / "client.cert").write_text("c")
    (d / "client.key").write_text("k")
    assert transport.client_cert("reg.test:5000") == (str(d / "client.cert"), str(d / "client.key"))


# -- credential hygiene ------------------------------------------------------

def test_a_redirect_to_another_host_carries_no_credentials(fake, monkeypatch):
    monkeypatch.setenv("REGISTRY_USERNAME", "bob")
    monkeypatch.setenv("REGISTRY_PASSWORD", "pw")
    f = fake(auth="basic")
    storage = ThreadingHTTPServer(("127.0.0.1", 0), Storage)
    threading.Thread(target=storage.serve_forever, args=(0.05,), daemon=True).start()
    try:
        Storage.seen, Storage.data = [], b"layer bytes"
        f.add_blob("a/b", Storage.data)
        f.redirect_blobs_to = f"http://storage.test:{storage.server_address[1]}"
        login = registry.env_login(os.environ, f.host)
        assert registry.Registry(f.host, login=login).get_blob("a/b", sha(Storage.data)) == Storage.data
    finally:
        storage.shutdown()
    assert f.log[-1][2] and f.log[-1][2].startswith("Basic ")  # the registry got them
    assert len(Storage.seen) == 1 and "Authorization" not in Storage.seen[0]


def test_a_token_realm_over_plain_http_on_a_non_loopback_name_gets_no_credentials(fake, monkeypatch):
    monkeypatch.setenv("REGISTRY_USERNAME", "bob")
    monkeypatch.setenv("REGISTRY_PASSWORD", "s3cret-pw")
    f = fake(auth="bearer", password="s3cret-pw")
    f.realm = f"http://realm.test:{f.server.server_address[1]}/token"
    f.tag_list["a/b"] = ["1"]
    with pytest.raises(UserError, match="plain HTTP") as e:
        registry.Registry(f.host, login=registry.env_login(os.environ, f.host)).tags("a/b")
    assert f.token_requests and all(auth is None for _, auth in f.token_requests)
    assert "s3cret-pw" not in str(e.value)


# -- retries -------------------------------------------------------------------

def test_reads_are_retried_on_server_errors(fake):
    f = fake()
    f.tag_list["a/b"] = ["1"]
    f.fail["GET"] = [503, 502]
    assert registry.Registry(f.host).tags("a/b") == ["1"]
    assert f.methods("tags") == ["GET"] * 3


def test_post_is_not_retried_on_a_server_error(fake):
    f = fake()
    f.fail["POST"] = [500, 500]
    with pytest.raises(EnvironmentProblem, match="500"):
        registry.Registry(f.host).upload_blob("a/b", b"data")
    assert f.methods("uploads").count("POST") == 1


def test_a_failed_patch_is_not_resent_blindly_but_resumed_from_the_registrys_offset(fake, small_chunks):
    f = fake()
    f.fail["PATCH"] = [500]
    data = bytes(range(256)) * 10  # 2560 bytes: 3 chunks
    digest, sent = registry.Registry(f.host).upload_blob("a/b", data)
    assert (digest, sent) == (sha(data), len(data)) and f.blobs[digest] == data
    calls = [m for m, p, _ in f.log if "uploads" in p]
    assert calls == ["POST", "PATCH", "GET", "PATCH", "PATCH", "PATCH", "PUT"]


def test_an_interrupted_patch_resumes_from_the_reported_range(fake, small_chunks, tmp_path):
    f = fake()
    data = bytes(i % 251 for i in range(2500))
    path = tmp_path / "layer"
    path.write_bytes(data)
    f.fail["PATCH"] = [("cut", 300)]  # the registry keeps 300 bytes of the first chunk, then the line drops
    seen = []
    digest, sent = registry.Registry(f.host).upload_blob_file("a/b", path, sha(data), len(data),
                                                               progress=lambda done, total: seen.append(done))
    assert f.blobs[digest] == data and sent == len(data)
    patches = [p for m, p, _ in f.log if m == "PATCH"]
    assert len(patches) == 4  # 1000 (cut at 300), then 300-1299, 1300-2299, 2300-2499
    assert seen == [300, 1300, 2300, 2500]
    assert [m for m, p, _ in f.log if "uploads" in p].count("POST") == 1


def test_patch_failures_give_up_after_the_retry_budget(fake, small_chunks):
    f = fake()
    f.fail["PATCH"] = [500] * 10
    with pytest.raises(EnvironmentProblem, match="kept failing"):
        registry.Registry(f.host, retries=2).upload_blob("a/b", b"x" * 1500)
    assert f.methods("uploads").count("PATCH") == 3 and f.methods("uploads").count("POST") == 1


# -- uploads -----------------------------------------------------------------

def test_upload_blob_file_streams_in_chunks_skips_present_blobs_and_mounts(fake, small_chunks, tmp_path):
    f = fake()
    data = b"0123456789" * 250
    path = tmp_path / "layer"
    path.write_bytes(data)
    reg = registry.Registry(f.host)
    seen = []
    assert reg.upload_blob_file("a/b", path, sha(data), len(data), progress=lambda d, t: seen.append((d, t))) == (
        sha(data), len(data))
    assert seen == [(1000, 2500), (2000, 2500), (2500, 2500)]
    assert reg.upload_blob_file("a/b", path, sha(data), len(data)) == (sha(data), 0)
    f.log.clear()
    assert reg.upload_blob_file("c/d", path, sha(data), len(data), mount_from=["x/y", "a/b"]) == (sha(data), 0)
    assert [m for m, p, _ in f.log if "uploads" in p] == ["POST", "DELETE", "POST"]  # x/y refused, a/b mounted


def test_a_file_that_does_not_match_its_digest_is_refused_before_it_is_committed(fake, small_chunks, tmp_path):
    f = fake()
    path = tmp_path / "layer"
    path.write_bytes(b"y" * 1500)
    with pytest.raises(UserError, match="does not match its digest"):
        registry.Registry(f.host).upload_blob_file("a/b", path, sha(b"z" * 1500), 1500)
    assert not f.blobs and not f.uploads  # the session was cancelled, nothing stored
    with pytest.raises(UserError, match="not the 99"):
        registry.Registry(f.host).upload_blob_file("a/b", path, sha(b"y" * 1500), 99)


def test_copy_blob_streams_from_another_registry(fake, small_chunks):
    src, dst = fake(), fake()
    data = bytes(i % 13 for i in range(2345))
    src.add_blob("base/x", data)
    assert registry.Registry(dst.host).copy_blob(registry.Registry(src.host), "base/x", "mine/x", sha(data),
                                                 len(data)) == (sha(data), len(data))
    assert dst.blobs[sha(data)] == data
    assert registry.Registry(dst.host).copy_blob(registry.Registry(src.host), "base/x", "mine/x", sha(data),
                                                 len(data)) == (sha(data), 0)
    # same registry: a mount, no bytes
    assert registry.Registry(dst.host).copy_blob(registry.Registry(dst.host), "mine/x", "mine/y", sha(data),
                                                 len(data)) == (sha(data), 0)


def test_small_blobs_go_up_in_one_put(fake):
    f = fake()
    reg = registry.Registry(f.host)
    assert reg.upload_blob("a/b", b"{}") == (sha(b"{}"), 2)
    assert [m for m, p, _ in f.log if "uploads" in p] == ["POST", "PUT"]
    assert reg.get_blob("a/b", sha(b"{}")) == b"{}"


def test_manifests_round_trip_and_are_not_re_put_when_unchanged(fake):
    f = fake()
    reg = registry.Registry(f.host)
    body = b'{"schemaVersion":2}'
    assert reg.put_manifest_if_changed("a/b", "1", body, registry.OCI_MANIFEST) == (sha(body), len(body))
    assert reg.put_manifest_if_changed("a/b", "1", body, registry.OCI_MANIFEST) == (sha(body), 0)
    m = reg.get_manifest("a/b", "1")
    assert m.digest == sha(body) and m.media_type == registry.OCI_MANIFEST and reg.has_manifest("a/b", sha(body))
    reg.delete_manifest("a/b", "1")
    assert reg.get_manifest("a/b", "1") is None


def test_tag_lists_follow_the_link_header_across_pages(fake):
    f = fake()
    f.tag_list["a/b"] = ["e", "d", "c", "b", "a"]
    f.page_size = 2
    assert registry.Registry(f.host).tags("a/b") == ["a", "b", "c", "d", "e"]
    assert f.methods("tags") == ["GET"] * 3
    assert registry.Registry(f.host).tags("missing/repo") == []


# -- never send a blob the registry holds (registry/known.py) -----------------

def test_a_blob_another_repository_was_seen_holding_is_mounted_from_it_not_sent(fake, tmp_path):
    f = fake()
    data = b"cuda libraries" * 300
    path = tmp_path / "layer"
    path.write_bytes(data)
    assert registry.Registry(f.host).upload_blob_file("one/cuda-libs", path, sha(data), len(data)) == (
        sha(data), len(data))
    f.log.clear()
    # Another project, another run (a new client): nothing names one/cuda-libs as a source, the index does.
    assert registry.Registry(f.host).upload_blob_file("two/cuda-libs", path, sha(data), len(data)) == (sha(data), 0)
    assert [m for m, _, _ in f.log] == ["HEAD", "POST"] and "from=one%2Fcuda-libs" in f.log[-1][1]
    assert ("two/cuda-libs", sha(data)) in f.links


def test_a_mount_the_registry_refuses_forgets_that_repository_and_the_blob_is_sent(fake, tmp_path):
    f = fake()
    data = b"garbage-collected since" * 100
    path = tmp_path / "layer"
    path.write_bytes(data)
    reg = registry.Registry(f.host)
    reg.known.add(reg.host, "gone/repo", [sha(data)])  # seen there once; the registry has deleted it since
    assert reg.upload_blob_file("a/b", path, sha(data), len(data)) == (sha(data), len(data))
    assert reg.known.repos(reg.host, sha(data)) == ["a/b"]  # the stale entry is gone, the new one is in


def test_reading_an_image_manifest_remembers_which_blobs_its_repository_holds(fake):
    f = fake()
    layer, config = f.add_blob("base/img", b"layer bytes"), f.add_blob("base/img", b"{}")
    body = json.dumps({"schemaVersion": 2, "config": {"digest": config, "size": 2},
                       "layers": [{"digest": layer, "size": 11}]}).encode()
    f.manifests[("base/img", "v1")] = (client.OCI_MANIFEST, body)
    reg = registry.Registry(f.host)
    reg.get_manifest("base/img", "v1")
    assert reg.known.repos(reg.host, layer) == ["base/img"] and reg.known.repos(reg.host, config) == ["base/img"]
    assert reg.known.repos("other.test:5000", layer) == []  # per registry


def test_a_file_the_tool_hashed_when_it_wrote_it_goes_up_in_one_patch_and_the_registry_checks_it(
        fake, small_chunks, tmp_path):
    f = fake()
    data = bytes(i % 7 for i in range(2500))
    path = tmp_path / "layer"
    path.write_bytes(data)
    reg = registry.Registry(f.host)
    assert reg.upload_blob_file("a/b", path, sha(data), len(data), verify=False) == (sha(data), len(data))
    assert f.methods("uploads") == ["POST", "PATCH", "PUT"] and f.blobs[sha(data)] == data  # not 3 chunks
    with pytest.raises(UserError, match="does not match its digest"):  # DIGEST_INVALID from the registry
        reg.upload_blob_file("a/c", path, sha(b"other"), len(data), verify=False)
