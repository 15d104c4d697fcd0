"""A small OCI distribution API client over requests.

Enough for what the pipeline needs from a registry: does a tag or blob
exist, read a manifest, put a manifest under another tag (retagging without
moving bytes), list and delete tags. Plain HTTP for loopback registries,
HTTPS otherwise; credentials from the environment, never printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import requests

from .errors import EnvironmentProblem, UserError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)


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
        user, password = os.environ.get("REGISTRY_USERNAME"), os.environ.get("REGISTRY_PASSWORD")
        if user and password:
            self.session.auth = (user, password)

    # -- plumbing ----------------------------------------------------------
    def _request(self, method: str, path: str, **kw) -> requests.Response:
        url = f"{self.base}{path}"
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                resp = self.session.request(method, url, timeout=self.timeout, **kw)
            except requests.ConnectionError as e:
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

    def retag(self, name: str, source: str, tag: str) -> str:
        m = self.get_manifest(name, source)
        if m is None:
            raise EnvironmentProblem(f"registry {self.host}: {name}:{source} vanished while tagging")
        return self.put_manifest(name, tag, m.body, m.media_type)

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


def for_ref(ref: str) -> tuple[Registry, str, str]:
    host, name, reference = split_ref(ref)
    return Registry(host), name, reference
