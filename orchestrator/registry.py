"""A small OCI distribution API client over requests.

Enough for what the pipeline needs from a registry: does a tag or blob
exist, read a manifest, put a manifest under another tag (retagging without
moving bytes), list and delete tags. Plain HTTP for loopback registries,
HTTPS otherwise; credentials from the environment, never printed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests

from .errors import EnvironmentProblem, UserError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
CHUNK = 32 * 1024 * 1024  # above this, uploads go in PATCH chunks


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def credentials_for(host: str, docker_config: Path | None = None) -> tuple[str, str] | None:
    """REGISTRY_USERNAME/REGISTRY_PASSWORD, else the Docker config file's auth for host."""
    user, password = os.environ.get("REGISTRY_USERNAME"), os.environ.get("REGISTRY_PASSWORD")
    if user and password:
        return user, password
    path = docker_config or Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "config.json"
    try:
        auths = json.loads(Path(path).read_text()).get("auths", {})
    except (OSError, ValueError):
        return None
    for key in (host, f"https://{host}", f"http://{host}"):
        entry = auths.get(key) or {}
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue  # a broken entry is as good as none; the registry will say 401
            return user, password
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """'Bearer realm="x",service="y"' -> ('bearer', {'realm': 'x', 'service': 'y'})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body)


def split_ref(ref: str) -> tuple[str, str, str]:
    """'host:port/ns/name:tag' or '...@sha256:x' -> (host, name, reference)."""
    if "@" in ref:
        repo, reference = ref.split("@", 1)
    else:
        head, _, last = ref.rpartition("/")
        if ":" in last:
            name, tag = last.rsplit(":", 1)
            repo, reference = f"{head}/{name}", tag
        else:
            repo, reference = ref, "latest"
    host, _, name = repo.partition("/")
    return host, name, reference


def _is_loopback(host: str) -> bool:
    h = host.split(":")[0]
    return h in ("localhost", "::1") or h.startswith("127.")


class Registry:
    def __init__(self, host: str, timeout: float = 30.0, retries: int = 4):
        self.host = host
        self.base = f"{'http' if _is_loopback(host) else 'https'}://{host}/v2"
        self.timeout = timeout
        self.retries = retries
        self.session = requests.Session()
        self._credentials = credentials_for(host)
        self._token: str | None = None

    def __repr__(self) -> str:  # never show credentials
        return f"Registry({self.host!r})"

    def _authorize(self, resp: requests.Response) -> bool:
        """Answer a 401 challenge (basic or bearer token flow); True if worth retrying."""
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self._credentials and self.session.auth is None:
            self.session.auth = self._credentials
            return True
        if scheme == "bearer" and "realm" in params:
            query = {k: v for k, v in params.items() if k in ("service", "scope")}
            try:
                r = requests.get(params["realm"], params=query, auth=self._credentials, timeout=self.timeout)
            except requests.RequestException:
                return False
            if r.status_code != 200:
                raise UserError(f"registry {self.host}: the token service refused us ({r.status_code})",
                                "set REGISTRY_USERNAME/REGISTRY_PASSWORD or `docker login` for this registry")
            body = r.json()
            token = body.get("token") or body.get("access_token")
            if token and token != self._token:
                self._token = token
                self.session.headers["Authorization"] = f"Bearer {token}"
                return True
        return False

    # -- plumbing ----------------------------------------------------------
    def _request(self, method: str, path: str, **kw) -> requests.Response:
        url = path if path.startswith("http") else f"{self.base}{path}"
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                resp = self.session.request(method, url, timeout=self.timeout, **kw)
                if resp.status_code == 401 and self._authorize(resp):
                    resp = self.session.request(method, url, timeout=self.timeout, **kw)
                if resp.status_code == 401:
                    raise UserError(f"registry {self.host} refused {method} {path} (401 unauthorized)",
                                    "set REGISTRY_USERNAME/REGISTRY_PASSWORD or `docker login` for this registry")
            except requests.RequestException as e:
                if attempt == self.retries:
                    raise EnvironmentProblem(
                        f"registry {self.host} is unreachable ({type(e).__name__})",
                        "start the embedded one with `invoke engine.up`, or set ORCH_REGISTRY / `registry:`",
                    ) from None
            else:
                if resp.status_code < 500 or attempt == self.retries:
                    return resp
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def ping(self) -> bool:
        try:
            return self._request("GET", "/").status_code in (200, 401)
        except EnvironmentProblem:
            return False

    def check(self) -> None:
        resp = self._request("GET", "/")
        if resp.status_code not in (200, 401):
            raise EnvironmentProblem(f"{self.host} does not speak the registry API (GET /v2/ gave {resp.status_code})")

    # -- manifests ---------------------------------------------------------
    def get_manifest(self, name: str, reference: str) -> Manifest | None:
        resp = self._request("GET", f"/{name}/manifests/{reference}", headers={"Accept": ", ".join(MANIFEST_TYPES)})
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise EnvironmentProblem(f"registry {self.host}: GET manifest {name}:{reference} gave {resp.status_code}")
        digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
        header = resp.headers.get("Docker-Content-Digest")
        if reference.startswith("sha256:") and digest != reference:
            raise UserError(f"registry {self.host} returned content for {name}@{reference} whose digest is {digest}",
                            "the registry content was tampered with or corrupted; re-publish")
        if header and header != digest:
            raise UserError(f"registry {self.host}: manifest {name}:{reference} digest header {header} != content {digest}")
        return Manifest(resp.headers.get("Content-Type", "").split(";")[0], digest, resp.content)

    def has_manifest(self, name: str, reference: str) -> bool:
        resp = self._request("HEAD", f"/{name}/manifests/{reference}", headers={"Accept": ", ".join(MANIFEST_TYPES)})
        return resp.status_code == 200

    def put_manifest(self, name: str, reference: str, body: bytes, media_type: str) -> str:
        resp = self._request("PUT", f"/{name}/manifests/{reference}", data=body, headers={"Content-Type": media_type})
        if resp.status_code not in (200, 201):
            raise EnvironmentProblem(f"registry {self.host}: PUT manifest {name}:{reference} gave {resp.status_code}: "
                                     f"{resp.text[:300]}")
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def delete_manifest(self, name: str, digest: str) -> None:
        self._request("DELETE", f"/{name}/manifests/{digest}")

    def tags(self, name: str) -> list[str]:
        resp = self._request("GET", f"/{name}/tags/list")
        if resp.status_code == 404:
            return []
        return sorted(resp.json().get("tags") or [])

    # -- blobs -------------------------------------------------------------
    def has_blob(self, name: str, digest: str) -> bool:
        return self._request("HEAD", f"/{name}/blobs/{digest}").status_code == 200

    def blob_size(self, name: str, digest: str) -> int | None:
        resp = self._request("HEAD", f"/{name}/blobs/{digest}")
        return int(resp.headers.get("Content-Length", 0)) if resp.status_code == 200 else None

    def mount_blob(self, name: str, digest: str, from_name: str) -> bool:
        """Cross-repository mount: the registry links a blob it has, no bytes move."""
        resp = self._request("POST", f"/{name}/blobs/uploads/", params={"mount": digest, "from": from_name})
        if resp.status_code == 201:
            return True
        if resp.status_code == 202:  # mount refused, an upload session was opened instead: close it
            self._request("DELETE", self._location(resp))
        return False

    def _location(self, resp: requests.Response) -> str:
        loc = resp.headers.get("Location", "")
        return loc if loc.startswith("http") else f"{self.base.rsplit('/v2', 1)[0]}{loc}"

    def upload_blob(self, name: str, data: bytes, digest: str | None = None, mount_from: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> tuple[str, int]:
        """Upload unless present; returns (digest, bytes sent). Verifies the digest the registry reports."""
        digest = digest or sha256_digest(data)
        if sha256_digest(data) != digest:
            raise UserError(f"blob for {name} does not match its digest {digest}", "the content was altered; rebuild")
        if self.has_blob(name, digest):
            return digest, 0
        if mount_from and self.mount_blob(name, digest, mount_from):
            return digest, 0
        resp = self._request("POST", f"/{name}/blobs/uploads/")
        if resp.status_code != 202:
            raise EnvironmentProblem(f"registry {self.host}: cannot start an upload to {name} ({resp.status_code})")
        location = self._location(resp)
        sent = 0
        if len(data) > CHUNK:
            while sent < len(data):
                chunk = data[sent:sent + CHUNK]
                resp = self._request("PATCH", location, data=chunk, headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{sent}-{sent + len(chunk) - 1}", "Content-Length": str(len(chunk))})
                if resp.status_code != 202:
                    raise EnvironmentProblem(f"registry {self.host}: chunk upload to {name} gave {resp.status_code}")
                location = self._location(resp)
                sent += len(chunk)
                if progress:
                    progress(sent, len(data))
            resp = self._request("PUT", location, params={"digest": digest}, headers={"Content-Length": "0"})
        else:
            resp = self._request("PUT", location, params={"digest": digest}, data=data,
                                 headers={"Content-Type": "application/octet-stream"})
            sent = len(data)
        if resp.status_code != 201:
            raise EnvironmentProblem(f"registry {self.host}: upload to {name} gave {resp.status_code}: {resp.text[:200]}")
        reported = resp.headers.get("Docker-Content-Digest")
        if reported and reported != digest:
            raise UserError(f"registry {self.host} stored {reported} for a blob whose digest is {digest}",
                            "the upload was corrupted in transit; re-run")
        return digest, sent

    def get_blob(self, name: str, digest: str) -> bytes:
        resp = self._request("GET", f"/{name}/blobs/{digest}")
        if resp.status_code != 200:
            raise EnvironmentProblem(f"registry {self.host}: blob {name}@{digest} gave {resp.status_code}")
        if sha256_digest(resp.content) != digest:
            raise UserError(f"registry {self.host}: blob {name}@{digest} does not match its digest",
                            "the registry content was tampered with or corrupted; re-publish")
        return resp.content

    def put_manifest_if_changed(self, name: str, reference: str, body: bytes, media_type: str) -> tuple[str, int]:
        """PUT unless the tag already names exactly these bytes; returns (digest, bytes sent)."""
        digest = sha256_digest(body)
        current = self._request("HEAD", f"/{name}/manifests/{reference}", headers={"Accept": ", ".join(MANIFEST_TYPES)})
        if current.status_code == 200 and current.headers.get("Docker-Content-Digest") == digest:
            return digest, 0
        return self.put_manifest(name, reference, body, media_type), len(body)

