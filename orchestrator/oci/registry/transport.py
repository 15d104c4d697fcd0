"""HTTP plumbing for the registry client: scheme, TLS trust, timeouts, retries, redirects.

Nothing here knows manifests or tokens. The client hands over the
Authorization header it wants sent; this module decides where it may go:
only to the host it belongs to, only over HTTPS (plain HTTP only to a
loopback address), and never along a redirect to another host.
"""

from __future__ import annotations

import atexit
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import ssl
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from orchestrator.common.errors import EnvironmentProblem
from orchestrator.common.hostinfo import ca_bundle, hostname_port, is_loopback  # noqa: F401 - is_loopback: part of this module's answers

CERTS_D = Path("/etc/docker/certs.d")
DAEMON_JSON = Path("/etc/docker/daemon.json")
PROBE_TIMEOUT_S = 3.0  # a loopback TLS server answers a ClientHello in milliseconds
MAX_REDIRECTS = 10
REDIRECTS = (301, 302, 303, 307, 308)
DEFAULT_TIMEOUT_S = 30.0  # connect, and each read: a registry silent this long is taken as gone
DEFAULT_RETRIES = 4
FIRST_BACKOFF_S = 0.5  # doubled after each failed attempt: 0.5, 1, 2, 4 s
sleep = time.sleep  # tests replace it to skip the backoff


def backoff_seconds(retries: int) -> float:
    """The sleeps between the attempts of one request: FIRST_BACKOFF_S doubling, none after the last."""
    return FIRST_BACKOFF_S * (2 ** retries - 1)


def worst_case_seconds(timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES) -> float:
    """The longest one logical request can take against a registry that never answers.

    Every attempt may wait out the timeout (connect or read); a dead process
    refuses at once, so in practice only the backoff counts.
    """
    return (retries + 1) * timeout + backoff_seconds(retries)


class TransportError(EnvironmentProblem):
    """The registry could not be reached, or answered in a way no retry fixes."""


class Unreachable(TransportError):
    """No answer at all (connection refused, reset, timed out): the request may or may not have landed."""


class _NoNetrc(requests.auth.AuthBase):
    """Set as the session's auth so requests never adds ~/.netrc credentials on its own."""

    def __call__(self, r):
        return r


# -- names -------------------------------------------------------------------

def registry_host(host: str) -> str:
    """'https://ghcr.io/acme' or 'ghcr.io/acme' -> 'ghcr.io': the API lives at the host, not under the path."""
    return host.split("://", 1)[-1].split("/", 1)[0]


def certs_d_root() -> Path:
    """Docker's per-registry trust directory; ORCH_CERTS_D points elsewhere (tests, rootless setups)."""
    return Path(os.environ.get("ORCH_CERTS_D") or CERTS_D)


def insecure_registries() -> list[str]:
    """ORCH_INSECURE_REGISTRIES (comma list) plus the Docker daemon's `insecure-registries`."""
    entries = [e.strip() for e in os.environ.get("ORCH_INSECURE_REGISTRIES", "").split(",") if e.strip()]
    try:
        entries += json.loads(DAEMON_JSON.read_text()).get("insecure-registries") or []
    except (OSError, ValueError, AttributeError):
        pass  # no daemon.json, or not ours to read: the env list is enough
    return entries


def is_insecure(host: str) -> bool:
    name = hostname_port(host)[0]
    for entry in insecure_registries():
        entry = entry.split("://", 1)[-1].rstrip("/")
        if entry in (host, name):
            return True
        if "/" in entry:  # Docker also accepts CIDRs
            try:
                if ipaddress.ip_address(name) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
    return False


# -- trust -------------------------------------------------------------------

_bundle_dir: str | None = None


def _bundle_path(parts: list[Path]) -> str:
    """One CA file made of several: requests takes a single bundle, Docker adds certs.d to the system's."""
    global _bundle_dir
    text = b"\n".join(p.read_bytes().strip() + b"\n" for p in parts)
    if _bundle_dir is None:
        _bundle_dir = tempfile.mkdtemp(prefix="orch-ca-")
        atexit.register(shutil.rmtree, _bundle_dir, True)
    path = Path(_bundle_dir) / (hashlib.sha256(text).hexdigest()[:16] + ".pem")
    if not path.exists():
        path.write_bytes(text)
    return str(path)


def ca_files(host: str) -> list[Path]:
    d = certs_d_root() / host
    return sorted(d.glob("*.crt")) if d.is_dir() else []


def client_cert(host: str) -> tuple[str, str] | None:
    d = certs_d_root() / host
    if (d / "client.cert").is_file() and (d / "client.key").is_file():
        return str(d / "client.cert"), str(d / "client.key")
    for cert in sorted(d.glob("*.cert")) if d.is_dir() else []:
        if cert.with_suffix(".key").is_file():
            return str(cert), str(cert.with_suffix(".key"))
    return None


def trust_hint(host: str) -> str:
    return (f"put the registry's CA certificate in {certs_d_root() / host / 'ca.crt'}, "
            "or point SSL_CERT_FILE at a CA bundle that includes it")


def _is_cert_error(e: BaseException) -> bool:
    text = str(e)
    return "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text \
        or "doesn't match" in text or "Hostname mismatch" in text


# -- the transport -----------------------------------------------------------

class Transport:
    """A requests session bound to one registry host."""

    def __init__(self, host: str, timeout: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES):
        self.host = host
        self.timeout = timeout
        self.retries = retries
        self.loopback = is_loopback(host)
        self.insecure = is_insecure(host)
        # HTTPS always, except where plain HTTP is allowed and the server turns out not to speak TLS.
        self._scheme: str | None = None if (self.loopback or self.insecure) else "https"
        self.session = requests.Session()
        self.session.auth = _NoNetrc()

    def __repr__(self) -> str:
        return f"Transport({self.host!r}, scheme={self._scheme!r})"

    # -- the scheme --------------------------------------------------------
    def base_url(self) -> str:
        if self._scheme is None:
            self._scheme = self._probe()
        return f"{self._scheme}://{self.host}"

    def _probe(self) -> str:
        """'https' if the server completes a TLS handshake, 'http' if it answers but not in TLS.

        Only loopback and insecure-listed hosts get here. Trust is not checked
        (CERT_NONE): this only learns the protocol; the real requests verify.
        """
        name, port = hostname_port(self.host)
        try:
            sock = socket.create_connection((name, port or 443), timeout=min(self.timeout, PROBE_TIMEOUT_S))
        except OSError as e:
            if port is None:
                return "http"  # nothing on 443: Docker then tries port 80
            raise requests.ConnectionError(f"cannot connect to {self.host}: {e.strerror or e}") from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with ctx.wrap_socket(sock, server_hostname=name):
                return "https"
        except (ssl.SSLError, ConnectionError, socket.timeout, OSError):
            return "http"  # "wrong version number": the server answered the ClientHello in plain HTTP
        finally:
            sock.close()

    def url(self, path: str) -> str:
        return path if "://" in path else f"{self.base_url()}{path}"

    def may_send_credentials(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.netloc))

    def _verify(self, netloc: str) -> bool | str:
        if self.insecure and netloc == self.host:
            return False
        cas = ca_files(netloc)
        if not cas:
            return ca_bundle() or True
        import certifi  # requests' own dependency

        return _bundle_path([Path(ca_bundle() or certifi.where()), *cas])

    # -- requests ----------------------------------------------------------
    def request(self, method: str, path: str, *, headers: dict | None = None, data: Any = None,
                params: Any = None, stream: bool = False, auth_header: str | None = None,
                auth_host: str | None = "", retry: bool | None = None) -> requests.Response:
        """One logical request, redirects followed by hand.

        auth_header goes only to auth_host (default: the registry host), and
        only where may_send_credentials allows. data may be a callable that
        returns a fresh body, for bodies that cannot be sent twice as they are.
        Retried on 5xx and connection errors only when idempotent (retry
        defaults to GET/HEAD/DELETE; the client says True for manifest PUTs).
        """
        if retry is None:
            retry = method in ("GET", "HEAD", "DELETE")
        auth_host = self.host if auth_host == "" else auth_host
        attempts = self.retries + 1 if retry else 1
        delay = FIRST_BACKOFF_S
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                resp = self._send(method, path, headers or {}, data, params, stream, auth_header, auth_host)
            except requests.exceptions.SSLError as e:
                if _is_cert_error(e):
                    raise TransportError(f"registry {self.host}: the TLS certificate of "
                                         f"{urlsplit(self.url(path)).netloc} is not trusted",
                                         trust_hint(urlsplit(self.url(path)).netloc)) from None
                if last:
                    raise Unreachable(f"registry {self.host}: TLS failed ({type(e).__name__})",
                                      "is it serving HTTPS on this port? " + trust_hint(self.host)) from None
            # ChunkedEncodingError: the body broke off (a registry killed while it answered),
            # which a non-streamed request reads here, before it returns.
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    OSError) as e:
                if last:
                    raise Unreachable(f"registry {self.host} is unreachable ({type(e).__name__}, "
                                      f"{attempts} attempt{'s' if attempts > 1 else ''})",
                                      "start it (the embedded one: `invoke engine.up`) or point ORCH_REGISTRY / "
                                      "`registry:` at one that runs; a re-run skips what was already uploaded"
                                      ) from None
            else:
                if resp.status_code < 500 or last:
                    return resp
                resp.close()
            sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _send(self, method, path, headers, data, params, stream, auth_header, auth_host) -> requests.Response:
        url = self.url(path)
        for _ in range(MAX_REDIRECTS + 1):
            netloc = urlsplit(url).netloc
            h = dict(headers)
            if auth_header and netloc == auth_host and self.may_send_credentials(url):
                h["Authorization"] = auth_header
            body = data() if callable(data) else data
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)  # insecure-registries
                resp = self.session.request(method, url, headers=h, data=body, params=params, stream=stream,
                                            timeout=self.timeout, allow_redirects=False, verify=self._verify(netloc),
                                            cert=client_cert(netloc) if netloc == self.host else None)
            if resp.status_code not in REDIRECTS or "Location" not in resp.headers:
                return resp
            # Blob GETs are redirected to storage elsewhere; the Authorization header stays
            # behind when the host changes (auth_host no longer matches).
            url = urljoin(resp.url, resp.headers["Location"])
            resp.close()
            params = None  # the Location carries its own query
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                method, data = "GET", None
        raise TransportError(f"registry {self.host}: more than {MAX_REDIRECTS} redirects for {path}")

