"""The registry as users see it: manifests, blobs and tags of the OCI distribution API.

How bytes travel (scheme, trust, retries, redirects) is transport.py's; who
we are (credentials, tokens) is auth.py's. Uploads are never retried
blindly: a POST opens an upload session once, and an interrupted PATCH
resumes from the offset the registry says it has.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import urljoin

import requests

from orchestrator.common.errors import EnvironmentProblem, UserError
from orchestrator.oci.registry import known as known_mod
from orchestrator.oci.registry import transport as _transport
from orchestrator.oci.registry.auth import Authenticator, EnvLogin
from orchestrator.oci.registry.transport import (
    Transport,
    TransportError,
    Unreachable,
    registry_host,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
CHUNK = 64 * 1024 * 1024  # above this, uploads go in PATCH chunks of this size
# Files the tool wrote and hashed itself go up in PATCHes this large, streamed from disk: the registry's cost
# per PATCH (reopening the upload, saving its hash state) is what bounds a loopback upload, not the bytes.
FILE_CHUNK = 1024 * 1024 * 1024

Progress = Callable[[int, int], None]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


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


def _parse_range(header: str | None) -> int:
    """'0-1023' -> 1024 bytes held. Distribution says '0-0' for both 0 and 1 byte; 0 is the safe reading."""
    if not header:
        return 0
    end = header.replace("bytes=", "").split("-")[-1]
    return int(end) + 1 if end.isdigit() and int(end) > 0 else 0


class _StreamWindow:
    """read_at over a one-way byte stream, keeping only the chunk being uploaded (for resumes)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = bytearray()
        self._start = 0

    def read_at(self, offset: int, n: int) -> bytes:
        if offset < self._start:
            raise EnvironmentProblem("cannot resume a streamed copy before the current chunk", "re-run the copy")
        del self._buf[:offset - self._start]
        self._start = offset
        for piece in self._chunks:
            self._buf += piece
            if len(self._buf) >= n:
                break
        return bytes(self._buf[:n])


class _FileSlice:
    """n bytes of a file from offset, as a request body: sent in 1 MiB pieces, never all in memory."""

    def __init__(self, path: Path, offset: int, n: int):
        self.path, self.offset = path, offset
        self.n = max(0, min(n, path.stat().st_size - offset))

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[bytes]:
        left = self.n
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            while left > 0:
                piece = fh.read(min(1 << 20, left))
                if not piece:
                    return
                left -= len(piece)
                yield piece


class Registry:
    """One registry host. `Registry("ghcr.io/acme")` talks to https://ghcr.io/v2/; names are full repository paths.

    login: the environment's login (auth.env_login), which knows the one host it is for: a client
    of any other host never sends it. Docker's config.json and helpers answer per host as ever.
    """

    def __init__(self, host: str, timeout: float = _transport.DEFAULT_TIMEOUT_S,
                 retries: int = _transport.DEFAULT_RETRIES, login: EnvLogin | None = None,
                 known: known_mod.KnownBlobs | None = None):
        self.host = registry_host(host)
        # Where else this registry holds a blob (known.py): mounted from there instead of sent.
        self.known = known if known is not None else known_mod.default()
        self.namespace = host.split("://", 1)[-1].partition("/")[2].strip("/")
        self.timeout = timeout
        self.retries = retries
        self.login = login
        self.transport = Transport(self.host, timeout, retries)
        self.auth = Authenticator(self.host, self.transport, login)

    def __repr__(self) -> str:  # never show credentials
        return f"Registry({self.host!r})"

    @property
    def base(self) -> str:
        return f"{self.transport.base_url()}/v2"

    # -- plumbing ----------------------------------------------------------
    @staticmethod
    def _scopes(repo: str | None, method: str, push: bool = False, also: Iterable[str] = ()) -> list[str]:
        if not repo:
            return []
        actions = "pull,push" if push or method not in ("GET", "HEAD") else "pull"
        return [f"repository:{repo}:{actions}", *(f"repository:{r}:pull" for r in also)]

    def _request(self, method: str, path: str, *, repo: str | None = None, also: Iterable[str] = (),
                 retry: bool | None = None, **kw) -> requests.Response:
        """A request with the authorization it needs: answers 401 challenges, then widens a pull scope.

        GHCR and Docker Hub answer a pull-scoped request for a repository that
        does not exist yet with 401/403; with a pull,push token it is a plain 404.
        """
        scopes = self._scopes(repo, method, also=also)
        widened = False
        for _ in range(4):
            sent = self.auth.header(scopes)
            resp = self.transport.request(method, path, auth_header=sent, retry=retry, **kw)
            if resp.status_code not in (401, 403):
                return resp
            if resp.status_code == 401 and self.auth.answer(resp, scopes, sent):
                resp.close()
                continue
            if repo and not widened and self.auth.uses_tokens and not scopes[0].endswith("push"):
                scopes, widened = self._scopes(repo, method, push=True, also=also), True
                resp.close()
                continue
            break
        if resp.status_code == 401:
            raise self.auth.refused(method, path)
        return resp

    def _denied(self, resp: requests.Response, what: str) -> EnvironmentProblem | UserError:
        if resp.status_code == 403:
            creds = self.auth.credentials()
            source = creds.source if creds else "anonymous access"
            return UserError(f"registry {self.host} denied {what} (403) for {source}",
                             "that login lacks permission on this repository; use one that has it")
        return TransportError(f"registry {self.host}: {what} gave {resp.status_code}: {resp.text[:300]}")

    def _location(self, resp: requests.Response, current: str | None = None) -> str:
        return urljoin(current or self.transport.base_url() + "/", resp.headers.get("Location", ""))

    def ping(self) -> bool:
        try:
            return self.transport.request("GET", "/v2/").status_code in (200, 401)
        except EnvironmentProblem:
            return False

    def check(self) -> None:
        resp = self.transport.request("GET", "/v2/")
        if resp.status_code not in (200, 401):
            raise EnvironmentProblem(f"{self.host} does not speak the registry API (GET /v2/ gave {resp.status_code})")

    # -- manifests ---------------------------------------------------------
    def get_manifest(self, name: str, reference: str) -> Manifest | None:
        resp = self._request("GET", f"/v2/{name}/manifests/{reference}", repo=name,
                             headers={"Accept": ", ".join(MANIFEST_TYPES)})
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._denied(resp, f"GET manifest {name}:{reference}")
        digest = sha256_digest(resp.content)
        header = resp.headers.get("Docker-Content-Digest")
        if reference.startswith("sha256:") and digest != reference:
            raise UserError(f"registry {self.host} returned content for {name}@{reference} whose digest is {digest}",
                            "the registry content was tampered with or corrupted; re-publish")
        if header and header != digest:
            raise UserError(f"registry {self.host}: manifest {name}:{reference} digest header {header} != content {digest}")
        found = Manifest(resp.headers.get("Content-Type", "").split(";")[0], digest, resp.content)
        self._remember(name, found)
        return found

    def _remember(self, name: str, manifest: Manifest) -> None:
        """The blobs an image manifest names are in this repository (the registry checks that on PUT)."""
        try:
            body = manifest.json
        except ValueError:
            return
        if isinstance(body, dict) and isinstance(body.get("config"), dict):
            self.known.add(self.host, name, [body["config"].get("digest")]
                           + [d.get("digest") for d in body.get("layers") or [] if isinstance(d, dict)])

    def has_manifest(self, name: str, reference: str) -> bool:
        return self._head_manifest(name, reference).status_code == 200

    def _head_manifest(self, name: str, reference: str) -> requests.Response:
        return self._request("HEAD", f"/v2/{name}/manifests/{reference}", repo=name,
                             headers={"Accept": ", ".join(MANIFEST_TYPES)})

    def put_manifest(self, name: str, reference: str, body: bytes, media_type: str) -> str:
        # A manifest PUT is idempotent (same bytes, same tag), so it may be retried.
        resp = self._request("PUT", f"/v2/{name}/manifests/{reference}", repo=name, retry=True, data=body,
                             headers={"Content-Type": media_type})
        if resp.status_code not in (200, 201):
            raise self._denied(resp, f"PUT manifest {name}:{reference}")
        return sha256_digest(body)

    def put_manifest_if_changed(self, name: str, reference: str, body: bytes, media_type: str) -> tuple[str, int]:
        """PUT unless the tag already names exactly these bytes; returns (digest, bytes sent)."""
        digest = sha256_digest(body)
        current = self._head_manifest(name, reference)
        if current.status_code == 200 and current.headers.get("Docker-Content-Digest") == digest:
            return digest, 0
        return self.put_manifest(name, reference, body, media_type), len(body)

    def delete_manifest(self, name: str, digest: str) -> None:
        self._request("DELETE", f"/v2/{name}/manifests/{digest}", repo=name)

    def tags(self, name: str) -> list[str]:
        """All tags, following the Link header's pages (`n`/`last`) as GHCR and Docker Hub paginate."""
        found: list[str] = []
        url, seen = f"/v2/{name}/tags/list", set()
        while url and url not in seen:
            seen.add(url)
            resp = self._request("GET", url, repo=name)
            if resp.status_code == 404:
                return sorted(found)
            if resp.status_code != 200:
                raise self._denied(resp, f"list tags of {name}")
            found += resp.json().get("tags") or []
            nxt = resp.links.get("next", {}).get("url")
            url = urljoin(resp.url, nxt) if nxt else None
        return sorted(set(found))

    def referrers(self, name: str, digest: str, artifact_type: str | None = None) -> list[dict] | None:
        """Descriptors of the manifests whose `subject` is digest (the referrers API, distribution spec 1.1).

        None where the registry lacks the API: it answers 404, which a registry
        that has it must not (callers then read the referrers tag schema).
        Some registries answer an unknown route with 400, 405 or 501 instead.
        """
        found: list[dict] = []
        url, seen = f"/v2/{name}/referrers/{digest}", set()
        params = {"artifactType": artifact_type} if artifact_type else None
        while url and url not in seen:
            seen.add(url)
            resp = self._request("GET", url, repo=name, params=params if len(seen) == 1 else None,
                                 headers={"Accept": OCI_INDEX})
            if resp.status_code in (400, 404, 405, 501):
                return None
            if resp.status_code != 200:
                raise self._denied(resp, f"list referrers of {name}@{digest}")
            try:
                found += resp.json().get("manifests") or []
            except ValueError:
                raise TransportError(f"registry {self.host}: the referrers of {name}@{digest} are not JSON") from None
            nxt = resp.links.get("next", {}).get("url")
            url = urljoin(resp.url, nxt) if nxt else None
        # The filter is optional for registries; apply it here when one was not applied.
        return [d for d in found if not artifact_type or d.get("artifactType") == artifact_type]

    # -- blobs: reading ------------------------------------------------------
    def has_blob(self, name: str, digest: str) -> bool:
        found = self._request("HEAD", f"/v2/{name}/blobs/{digest}", repo=name).status_code == 200
        if found:
            self.known.add(self.host, name, [digest])
        return found

    def blob_size(self, name: str, digest: str) -> int | None:
        resp = self._request("HEAD", f"/v2/{name}/blobs/{digest}", repo=name)
        return int(resp.headers.get("Content-Length", 0)) if resp.status_code == 200 else None

    def open_blob(self, name: str, digest: str) -> requests.Response:
        """A streaming GET of a blob (redirects to storage followed, without our credentials)."""
        resp = self._request("GET", f"/v2/{name}/blobs/{digest}", repo=name, stream=True)
        if resp.status_code != 200:
            error = self._denied(resp, f"GET blob {name}@{digest}")
            resp.close()
            raise error
        return resp

    def get_blob(self, name: str, digest: str) -> bytes:
        try:
            with self.open_blob(name, digest) as resp:
                data = resp.content  # read here, outside the transport's retries: a body that breaks off lands below
        except requests.RequestException as e:
            raise Unreachable(f"registry {self.host}: reading {name}@{digest[:19]} broke off ({type(e).__name__})",
                              "check that the registry is still running, then re-run") from None
        if sha256_digest(data) != digest:
            raise UserError(f"registry {self.host}: blob {name}@{digest} does not match its digest",
                            "the registry content was tampered with or corrupted; re-publish")
        return data

    # -- blobs: writing ------------------------------------------------------
    def mount_blob(self, name: str, digest: str, from_name: str) -> bool:
        """Cross-repository mount: the registry links a blob it has, no bytes move."""
        resp = self._request("POST", f"/v2/{name}/blobs/uploads/", repo=name, also=[from_name],
                             params={"mount": digest, "from": from_name})
        if resp.status_code == 201:
            self.known.add(self.host, name, [digest])
            return True
        if resp.status_code == 202:  # mount refused, an upload session was opened instead: close it
            self._request("DELETE", self._location(resp), repo=name)
        return False

    def skip_or_mount(self, name: str, digest: str, mount_from: Iterable[str] = ()) -> bool:
        """Whether the blob is in name now without sending it: there already, or mounted.

        Mounted from mount_from first, then from the repositories of this
        registry the machine has seen holding it (known.py); one that
        refuses is forgotten.
        """
        if self.has_blob(name, digest):
            return True
        tried = {name}
        for src in mount_from:
            if src not in tried:
                tried.add(src)
                if self.mount_blob(name, digest, src):
                    return True
        for src in self.known.repos(self.host, digest, besides=tried):
            try:
                if self.mount_blob(name, digest, src):
                    return True
            except (EnvironmentProblem, UserError):  # no pull access there (any more): send it instead
                pass
            self.known.forget(self.host, src, digest)
        return False

    def _start_upload(self, name: str) -> str:
        resp = self._request("POST", f"/v2/{name}/blobs/uploads/", repo=name)
        if resp.status_code != 202:
            raise self._denied(resp, f"start of an upload to {name}")
        return self._location(resp)

    def upload_blob(self, name: str, data: bytes, digest: str | None = None,
                    mount_from: str | Iterable[str] | None = None, progress: Progress | None = None) -> tuple[str, int]:
        """Upload unless present; returns (digest, bytes sent). Verifies the digest the registry reports."""
        digest = digest or sha256_digest(data)
        if sha256_digest(data) != digest:
            raise UserError(f"blob for {name} does not match its digest {digest}", "the content was altered; rebuild")
        mounts = [mount_from] if isinstance(mount_from, str) else list(mount_from or ())
        if self.skip_or_mount(name, digest, mounts):
            return digest, 0
        if len(data) > CHUNK:
            view = memoryview(data)
            return digest, self._upload_chunks(name, digest, len(data), lambda o, n: bytes(view[o:o + n]), progress)
        location = self._start_upload(name)
        self._finish(name, location, digest, data)
        if progress:
            progress(len(data), len(data))
        return digest, len(data)

    def upload_blob_file(self, name: str, path: str | Path, digest: str, size: int,
                         mount_from: Iterable[str] = (), progress: Progress | None = None,
                         verify: bool = True) -> tuple[str, int]:
        """Stream a file up in CHUNK-sized PATCHes (never all in memory); returns (digest, bytes sent).

        verify=False: the caller hashed the file when it wrote it (the blob cache), so it goes up
        in FILE_CHUNK PATCHes straight from disk without hashing it again here; the registry
        still checks the digest when the upload is committed.
        """
        path = Path(path)
        actual = path.stat().st_size
        if actual != size:
            raise UserError(f"{path} is {actual} bytes, not the {size} its descriptor says", "rebuild the layer")
        if self.skip_or_mount(name, digest, [mount_from] if isinstance(mount_from, str) else mount_from):
            return digest, 0
        if not verify:
            return digest, self._upload_chunks(name, digest, size, lambda o, n: _FileSlice(path, o, n), progress,
                                               chunk=FILE_CHUNK, verify=False)
        with open(path, "rb") as fh:
            def read_at(offset: int, n: int) -> bytes:
                fh.seek(offset)
                return fh.read(n)

            return digest, self._upload_chunks(name, digest, size, read_at, progress)

    def copy_blob(self, src: "Registry", src_name: str, dst_name: str, digest: str, size: int,
                  progress: Progress | None = None) -> tuple[str, int]:
        """Copy a blob from another registry, streaming (GET -> chunked upload); returns (digest, bytes sent)."""
        if self.skip_or_mount(dst_name, digest, [src_name] if src.host == self.host else []):
            return digest, 0
        with src.open_blob(src_name, digest) as resp:
            window = _StreamWindow(resp.iter_content(1024 * 1024))
            try:
                return digest, self._upload_chunks(dst_name, digest, size, window.read_at, progress)
            except requests.RequestException as e:  # the source stream broke, not the upload
                raise Unreachable(f"registry {src.host}: reading {src_name}@{digest} failed ({type(e).__name__})",
                                  "re-run the copy") from None

    def _upload_chunks(self, name: str, digest: str, size: int, read_at: Callable[[int, int], bytes],
                       progress: Progress | None, chunk: int | None = None, verify: bool = True) -> int:
        """POST once, PATCH chunk by chunk, PUT ?digest=. Returns the bytes the registry took.

        read_at(offset, n) gives the bytes (or a sized body: verify=False) of one PATCH.
        """
        location = self._start_upload(name)
        hasher, hashed = hashlib.sha256(), 0
        offset, failures = 0, 0
        while offset < size:
            n = min(chunk or CHUNK, size - offset)
            body = read_at(offset, n)
            if len(body) != n:
                self._abort(name, location)
                raise UserError(f"blob {digest} for {name} ended at {offset + len(body)} bytes, not {size}",
                                "the source changed while uploading; rebuild and re-run")
            if verify and offset <= hashed < offset + n:  # hash each byte once, even when a chunk is resent
                hasher.update(body[hashed - offset:])
                hashed = offset + n
            resp = None
            try:
                resp = self._request("PATCH", location, repo=name, retry=False, data=body, headers={
                    "Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{offset + n - 1}"})
            except Unreachable:
                pass
            if resp is not None and resp.status_code == 202:
                location = self._location(resp, location)
                offset += n
                if progress:
                    progress(offset, size)
                continue
            # Interrupted or failed: ask how far the registry got instead of re-sending blindly.
            if resp is not None and resp.status_code < 500 and resp.status_code != 416:
                self._abort(name, location)
                raise self._denied(resp, f"chunk upload to {name}")
            failures += 1
            if failures > self.retries:
                raise Unreachable(f"registry {self.host}: the upload of {digest} to {name} kept failing at byte "
                                  f"{offset}", "re-run; blobs already uploaded are skipped")
            _transport.sleep(0.5 * 2 ** (failures - 1))
            location, held = self._upload_status(name, location)
            if held > offset + n:
                raise TransportError(f"registry {self.host} reports {held} bytes of an upload we sent {offset + n} of")
            offset = held
            if progress:
                progress(offset, size)
        if verify and digest.startswith("sha256:") and "sha256:" + hasher.hexdigest() != digest:
            self._abort(name, location)
            raise UserError(f"blob for {name} does not match its digest {digest}", "the content was altered; rebuild")
        self._finish(name, location, digest, b"")
        return size

    def _upload_status(self, name: str, location: str) -> tuple[str, int]:
        resp = self._request("GET", location, repo=name)
        if resp.status_code not in (200, 204):
            raise TransportError(f"registry {self.host}: the upload session for {name} is gone ({resp.status_code})",
                                 "re-run; blobs already uploaded are skipped")
        return self._location(resp, location) if "Location" in resp.headers else location, \
            _parse_range(resp.headers.get("Range"))

    def _abort(self, name: str, location: str) -> None:
        try:
            self._request("DELETE", location, repo=name, retry=False)
        except EnvironmentProblem:
            pass  # the registry expires abandoned sessions itself

    def _finish(self, name: str, location: str, digest: str, data: bytes) -> requests.Response | None:
        """PUT ?digest= closes the session; if its answer is lost, HEAD tells whether it landed."""
        try:
            resp = self._request("PUT", location, repo=name, retry=False, params={"digest": digest}, data=data,
                                 headers={"Content-Type": "application/octet-stream"})
        except Unreachable:
            if self.has_blob(name, digest):
                return None
            raise
        if resp.status_code >= 500 and self.has_blob(name, digest):
            return resp
        if resp.status_code != 201:
            if resp.status_code == 400 and "DIGEST_INVALID" in resp.text:
                raise UserError(f"registry {self.host}: the blob uploaded to {name} does not match its digest {digest}",
                                "the content was altered or corrupted in transit; re-run")
            raise self._denied(resp, f"upload to {name}")
        reported = resp.headers.get("Docker-Content-Digest")
        if reported and reported != digest:
            raise UserError(f"registry {self.host} stored {reported} for a blob whose digest is {digest}",
                            "the upload was corrupted in transit; re-run")
        self.known.add(self.host, name, [digest])
        return resp
