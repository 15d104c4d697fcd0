"""OCI image configs, manifests and indexes, assembled by the tool (pure).

An image is its parent's layers plus its own, and a config that is the
parent's config with this image's settings applied, the way a Dockerfile's
ENV, LABEL, USER... would. Nothing in it depends on when or where it was
built: `created` and every history entry carry SOURCE_DATE_EPOCH, JSON is
canonical (sorted keys, no spaces), so the same layers and settings give the
same config digest, manifest digest and index digest on any machine.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from orchestrator.oci.layers import SOURCE_DATE_EPOCH, Layer

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def timestamp(epoch: int = SOURCE_DATE_EPOCH) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass(frozen=True)
class Settings:
    """What an image sets on top of its parent (the Dockerfile's final-stage instructions)."""

    env: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    workdir: str | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    exposed_ports: tuple[str, ...] = ()  # "8000/tcp"
    healthcheck: dict | None = None  # Docker's shape: Test, Interval (ns), Timeout, StartPeriod, Retries


@dataclass(frozen=True)
class Image:
    """An assembled image: its layers (parent's first) and its config bytes."""

    platform: str
    layers: tuple[Layer, ...]
    config: bytes
    sources: tuple[str, ...] = field(default=())  # repositories that already hold some of the blobs

    @property
    def config_digest(self) -> str:
        return digest_of(self.config)

    def manifest(self, annotations: dict[str, str] | None = None) -> bytes:
        body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": self.config_digest, "size": len(self.config)},
                "layers": [layer.descriptor() for layer in self.layers]}
        if annotations:
            body["annotations"] = dict(annotations)
        return canonical(body)

    @property
    def digest(self) -> str:
        return digest_of(self.manifest())

    def size(self) -> int:
        return len(self.config) + sum(layer.blob_size for layer in self.layers)


def _merge_env(parent: list[str], new: tuple[tuple[str, str], ...]) -> list[str]:
    out: dict[str, str] = {}
    for entry in parent:
        k, _, v = entry.partition("=")
        out[k] = v
    for k, v in new:
        out[k] = v
    return [f"{k}={v}" for k, v in out.items()]


def config(parent: dict | None, platform: str, new_layers: tuple[Layer, ...], settings: Settings,
           history: tuple[str, ...], epoch: int = SOURCE_DATE_EPOCH) -> bytes:
    """The config of an image that adds new_layers and settings to parent (None: from scratch).

    history: one description per new layer (what made it), in order.
    """
    parent = parent or {}
    os_, arch = platform.split("/")
    pc = dict(parent.get("config") or {})
    cfg: dict = {k: v for k, v in pc.items() if v not in (None, [], {}, "")}
    if settings.env:
        cfg["Env"] = _merge_env(pc.get("Env") or [], settings.env)
    if settings.labels:
        cfg["Labels"] = {**(pc.get("Labels") or {}), **dict(settings.labels)}
    for key, value in (("User", settings.user), ("WorkingDir", settings.workdir)):
        if value is not None:
            cfg[key] = value
    if settings.entrypoint is not None:
        cfg["Entrypoint"] = list(settings.entrypoint)
        cfg.pop("Cmd", None)  # as in a Dockerfile: a new ENTRYPOINT resets the parent's CMD
    if settings.cmd is not None:
        cfg["Cmd"] = list(settings.cmd)
    if settings.exposed_ports:
        cfg["ExposedPorts"] = {**(pc.get("ExposedPorts") or {}), **{p: {} for p in settings.exposed_ports}}
    if settings.healthcheck is not None:
        cfg["Healthcheck"] = settings.healthcheck
    created = timestamp(epoch)
    hist = [dict(h, created=created) for h in parent.get("history") or []]
    hist += [{"created": created, "created_by": h} for h in history]
    if len(new_layers) != len(history):
        raise ValueError("one history entry per new layer")
    diff_ids = list((parent.get("rootfs") or {}).get("diff_ids") or []) + [layer.diff_id for layer in new_layers]
    body = {"architecture": arch, "os": os_, "created": created, "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": hist}
    if arch == "arm64":
        body["variant"] = "v8"
    return canonical(body)


def index(manifests: list[tuple[str, Image]]) -> bytes:
    """An OCI image index over (platform, image), sorted by platform."""
    entries = []
    for platform, img in sorted(manifests, key=lambda pm: pm[0]):
        os_, arch = platform.split("/")
        plat = {"architecture": arch, "os": os_}
        if arch == "arm64":
            plat["variant"] = "v8"
        m = img.manifest()
        entries.append({"mediaType": OCI_MANIFEST, "digest": digest_of(m), "size": len(m), "platform": plat})
    return canonical({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})


def healthcheck(test: list[str], interval_s: int, timeout_s: int, start_period_s: int, retries: int) -> dict:
    ns = 1_000_000_000
    return {"Test": ["CMD", *test], "Interval": interval_s * ns, "Timeout": timeout_s * ns,
            "StartPeriod": start_period_s * ns, "Retries": retries}
