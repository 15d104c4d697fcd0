"""Scan everything a registry holds for a project for secrets: every manifest, config and (decompressed) layer.

The needles are what must never leave the build machine: the registry
password (also as the base64 `user:password` of a Docker auth entry), the
CA certificates added to this machine's trust store (the intercepting proxy's,
handed to pip as a BuildKit secret), whose base64 bodies are searched line by
line so a copy in any PEM file is found, and the release's private signing
key (its PEM lines, its DER, and its raw private scalar as bytes, hex,
decimal and base64). DSSE envelopes (provenance) are searched with their
base64 payload decoded.
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


def blobs_of(reg, name: str, ref: str):
    """(what, bytes) for a manifest or index and everything it references, layers decompressed."""
    m = reg.get_manifest(name, ref)
    yield f"{name}@{m.digest} manifest", json.dumps(m.json).encode()
    for child in m.json.get("manifests", []):
        yield from blobs_of(reg, name, child["digest"])
    if "config" in m.json:
        yield f"{name} config {m.json['config']['digest'][:19]}", reg.get_blob(name, m.json["config"]["digest"])
    for layer in m.json.get("layers", []):
        data = reg.get_blob(name, layer["digest"])
        if layer["mediaType"].endswith("gzip"):
            data = gzip.decompress(data)
        if layer["mediaType"] == "application/vnd.dsse.envelope.v1+json":
            data = _unwrapped(data)
        yield f"{name} layer {layer['digest'][:19]}", data


def scan(reg, repos: list[str], needles: dict[str, bytes]) -> tuple[list[str], int]:
    """Every (blob, needle) hit across every tag of the repositories, and how many blobs were read."""
    hits, seen, count = [], set(), 0
    for name in repos:
        for tag in reg.tags(name):
            for what, data in blobs_of(reg, name, tag):
                if what in seen:
                    continue
                seen.add(what)
                count += 1
                hits += [f"{label} in {what}" for label, needle in needles.items() if needle in data]
    return hits, count
