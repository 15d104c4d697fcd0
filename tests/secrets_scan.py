"""Scan everything a registry holds for a project for secrets: every manifest, config and (decompressed) layer.

The needles are what must never leave the build machine: the registry
password (also as the base64 `user:password` of a Docker auth entry) and the
CA certificates added to this machine's trust store (the intercepting proxy's,
handed to pip as a BuildKit secret), whose base64 bodies are searched line by
line so a copy in any PEM file is found.
"""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")  # where update-ca-certificates takes local CAs from


def local_ca_needles() -> dict[str, bytes]:
    """A distinctive line of each locally added CA (not one that Debian's ca-certificates package ships)."""
    needles = {}
    for crt in sorted(LOCAL_CA_DIR.glob("**/*.crt")):
        lines = [ln for ln in crt.read_bytes().splitlines() if ln and not ln.startswith(b"-----")]
        if len(lines) > 4:
            needles[f"CA {crt.name}"] = lines[len(lines) // 2]  # a middle line: the key, not a shared prefix
    return needles


def credential_needles(user: str, password: str) -> dict[str, bytes]:
    return {"registry password": password.encode(),
            "docker auth entry": base64.b64encode(f"{user}:{password}".encode())}


def private_key_needles(pem: bytes) -> dict[str, bytes]:
    """Every form a leaked signing key could take: PEM lines, DER, and the private scalar."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    scalar = key.private_numbers().private_value
    raw = scalar.to_bytes(32, "big")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    lines = [ln for ln in pem.splitlines() if ln and not ln.startswith(b"-----")]
    needles = {f"private key PEM line {i}": ln for i, ln in enumerate(lines)}
    needles.update({"private key DER": der, "private scalar (bytes)": raw,
                    "private scalar (hex)": raw.hex().encode(), "private scalar (HEX)": raw.hex().upper().encode(),
                    "private scalar (decimal)": str(scalar).encode(),
                    "private scalar (base64)": base64.b64encode(raw).rstrip(b"=")})
    return needles


def _unwrapped(data: bytes) -> bytes:
    """A DSSE envelope with its payload decoded beside it (a needle in the statement is base64 inside)."""
    try:
        env = json.loads(data)
        return data + b"\n" + base64.b64decode(env["payload"])
    except (ValueError, KeyError, TypeError):
        return data


def _gunzip(data: bytes) -> bytes:
    try:
        from isal import igzip  # the product's gzip codec; several times faster than zlib here
    except ImportError:
        return gzip.decompress(data)
    return igzip.decompress(data)


def blobs_of(reg, name: str, ref: str, seen: set[str]):
    """(what, bytes) for a manifest or index and everything it references, layers decompressed.

    A digest in seen is neither fetched nor yielded again: the same bytes give the same hits,
    and most blobs are shared by many tags (the base layer by every image).
    """
    m = reg.get_manifest(name, ref)
    if m.digest in seen:
        return
    seen.add(m.digest)
    yield f"{name}@{m.digest} manifest", json.dumps(m.json).encode()
    for child in m.json.get("manifests", []):
        yield from blobs_of(reg, name, child["digest"], seen)
    if "config" in m.json and m.json["config"]["digest"] not in seen:
        seen.add(m.json["config"]["digest"])
        yield f"{name} config {m.json['config']['digest'][:19]}", reg.get_blob(name, m.json["config"]["digest"])
    for layer in m.json.get("layers", []):
        if layer["digest"] in seen:
            continue
        seen.add(layer["digest"])
        data = reg.get_blob(name, layer["digest"])
        if layer["mediaType"].endswith("gzip"):
            data = _gunzip(data)
        if layer["mediaType"] == "application/vnd.dsse.envelope.v1+json":
            data = _unwrapped(data)
        yield f"{name} layer {layer['digest'][:19]}", data


def scan(reg, repos: list[str], needles: dict[str, bytes]) -> tuple[list[str], int]:
    """Every (blob, needle) hit across every tag of the repositories, and how many distinct blobs were read."""
    hits, seen, count = [], set(), 0
    for name in repos:
        for tag in reg.tags(name):
            for what, data in blobs_of(reg, name, tag, seen):
                count += 1
                hits += [f"{label} in {what}" for label, needle in needles.items() if needle in data]
    return hits, count
