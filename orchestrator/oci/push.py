"""Pushing assembled images: blobs, then config, then the manifest.

Every byte leaves through the tool's registry client (one credential and TLS
configuration for everything), never `docker push`. A blob the registry has
is skipped (HEAD) or mounted from a repository that has it (one this run
sent it to, the image's parents, or any the machine has seen holding it:
registry/known.py); the rest is streamed from the local blob cache in
chunks. `Uploader` runs uploads on a
thread of its own so a layer uploads while the next one is compressed.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from orchestrator.common import meter
from orchestrator.common.errors import EnvironmentProblem
from orchestrator.oci.image import OCI_MANIFEST, Image
from orchestrator.oci.layers import Layer
from orchestrator.oci.registry import Registry


def _upload_layer(reg: Registry, name: str, layer: Layer, mount_from, log) -> int:
    if layer.path is None:
        # Not produced here (a base's layers): it must already be in the registry.
        if reg.skip_or_mount(name, layer.digest, mount_from):
            return 0
        raise EnvironmentProblem(f"blob {layer.digest[:19]} for {name} is neither in {reg.host} nor in the local cache",
                                 "run `invoke engine.up` to put the base image into this registry")
    started = time.monotonic()
    last = [started]

    def progress(sent: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 5 and log:
            last[0] = now
            log(f"  {name}: uploading {layer.digest[7:19]} {sent / 1e6:,.0f}/{total / 1e6:,.0f} MB "
                f"({sent / 1e6 / (now - started):,.0f} MB/s)")

    # Hashed once when it was written into the cache: not again here (the registry checks it on commit).
    _, sent = reg.upload_blob_file(name, layer.path, layer.digest, layer.blob_size, mount_from=tuple(mount_from),
                                   progress=progress, verify=False)
    took = time.monotonic() - started
    meter.add("upload", took if sent else 0.0, sent)
    if sent and log and layer.blob_size > 50_000_000:
        log(f"  {name}: uploaded {layer.digest[7:19]} {sent / 1e6:,.0f} MB in {took:.1f} s "
            f"({sent / 1e6 / max(took, 1e-6):,.0f} MB/s)")
    return sent


class Uploader:
    """Uploads layer blobs in the background; `wait()` returns the bytes sent."""

    def __init__(self, host: str, log=None, workers: int = 2, login=None):
        self.host, self.log, self.login = host, log, login  # login: the environment's (auth.EnvLogin), if any
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload")
        self.local = threading.local()
        self.futures: dict[tuple[str, str], Future] = {}
        self.lock = threading.Lock()
        self.counted: set[tuple[str, str]] = set()
        self.manifests = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manifest")
        self.pushes: list[Future] = []

    def _reg(self) -> Registry:
        # One client per thread: each keeps its own session and token.
        if not hasattr(self.local, "reg"):
            self.local.reg = Registry(self.host, login=self.login)
        return self.local.reg

    def submit(self, name: str, layer: Layer, mount_from=()) -> Future:
        key = (name, layer.digest)
        with self.lock:
            if key not in self.futures:
                # A repository this run already sent the blob to can lend it: mount, don't re-send.
                earlier = [self.futures[(n, d)] for (n, d) in self.futures if d == layer.digest and n != name]
                siblings = [n for (n, d) in self.futures if d == layer.digest and n != name]

                def upload():
                    for f in earlier:
                        f.result()
                    return _upload_layer(self._reg(), name, layer, (*siblings, *mount_from), self.log)

                self.futures[key] = self.pool.submit(upload)
            return self.futures[key]

    def push_async(self, reg_host: str, name: str, img: Image, tag: str | None, mount_from=()) -> Future:
        """Push img in the background: its layers (as submitted), then config and manifest.

        The caller goes on building the next image while this one uploads;
        the manifest still goes up only after every blob it names.
        """
        for layer in img.layers:
            self.submit(name, layer, mount_from)
        keys = {(name, layer.digest) for layer in img.layers}

        def finish() -> tuple[int, int]:
            sent, layers_sent = self.wait_counted(keys)
            reg = Registry(reg_host, login=self.login)
            _, config_sent = reg.upload_blob(name, img.config)
            _, manifest_sent = reg.put_manifest_if_changed(name, tag or img.digest, img.manifest(), OCI_MANIFEST)
            return sent + config_sent + manifest_sent, layers_sent

        # Not on the upload pool: finish() waits on uploads, which need those workers.
        fut = self.manifests.submit(finish)
        self.pushes.append(fut)
        return fut

    def wait(self, keys=None) -> int:
        """Wait for these uploads; returns the bytes they sent that no earlier wait() counted."""
        return self.wait_counted(keys)[0]

    def wait_counted(self, keys=None) -> tuple[int, int]:
        """(bytes, blobs) sent by these uploads and not counted by an earlier wait."""
        with self.lock:
            futures = [(k, f) for k, f in self.futures.items() if keys is None or k in keys]
        sent = blobs = 0
        for k, f in futures:
            n = f.result()
            with self.lock:
                if k not in self.counted:
                    self.counted.add(k)
                    sent += n
                    blobs += n > 0
        return sent, blobs

    def close(self, cancel: bool = False) -> None:
        """Wait for the work in flight; with cancel, drop what has not started (the run has failed).

        A manifest push waiting on a dropped upload ends there, without its tag.
        """
        if cancel:
            with self.lock:
                for f in [*self.futures.values(), *self.pushes]:
                    f.cancel()  # only those not yet running
        self.manifests.shutdown(wait=True, cancel_futures=cancel)
        self.pool.shutdown(wait=True, cancel_futures=cancel)


def push_image(reg: Registry, name: str, img: Image, tag: str | None, log=None, mount_from=(),
               uploader: Uploader | None = None) -> int:
    """Push img's blobs, config and manifest (under tag, or by digest); returns bytes sent."""
    own = uploader is None
    uploader = uploader or Uploader(reg.host, log, login=reg.login)
    try:
        keys = {(name, layer.digest) for layer in img.layers}
        for layer in img.layers:
            uploader.submit(name, layer, mount_from)
        sent = uploader.wait(keys)
    finally:
        if own:
            uploader.close()
    _, config_sent = reg.upload_blob(name, img.config)
    body = img.manifest()
    _, manifest_sent = reg.put_manifest_if_changed(name, tag or img.digest, body, OCI_MANIFEST)
    return sent + config_sent + manifest_sent
