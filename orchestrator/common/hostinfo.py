"""Facts about this machine and about addresses, answered in one place.

- the host's architecture as Debian and OCI name it (amd64, arm64);
- whether an address is this machine's loopback (127.0.0.0/8, ::1 in any
  spelling, localhost), whatever form it comes in: a registry
  (`127.0.0.1:5000/ns`), a URL, an engine endpoint (`tcp://[::1]:2376`);
- which CA bundle HTTPS uses, in one order everywhere (the registry client,
  the Debian archive, the CA secret handed to builds):
  $REQUESTS_CA_BUNDLE, then $SSL_CERT_FILE, then the system bundle.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

# What `uname -m` (or an engine's Architecture) says -> the architecture in OCI platforms and Debian.
ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
SYSTEM_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
CA_ENV = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")


def host_arch(machine: str | None = None) -> str:
    """amd64 or arm64 for this machine (or for `machine`, as uname -m prints it); other names pass through."""
    m = machine or os.uname().machine
    return ARCHES.get(m, m)


def host_platform(machine: str | None = None) -> str:
    return f"linux/{host_arch(machine)}"


def hostname_port(host: str) -> tuple[str, int | None]:
    """'[::1]:5000' -> ('::1', 5000); 'ghcr.io' -> ('ghcr.io', None); '::1' -> ('::1', None)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, int(rest[1:]) if rest[1:].isdigit() else None
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, int(port) if port.isdigit() else None
    return host, None


def is_loopback(address: str) -> bool:
    """Whether address names this machine's loopback: a host, host:port, registry path, URL or engine endpoint."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    name = hostname_port(hostport)[0].lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def ca_bundle(environ=None) -> str | None:
    """The CA bundle HTTPS trusts: the first file that exists of $REQUESTS_CA_BUNDLE, $SSL_CERT_FILE and the
    system bundle; None when there is none (then requests' own bundle is all there is)."""
    environ = os.environ if environ is None else environ
    for candidate in (*(environ.get(k) for k in CA_ENV), *SYSTEM_CA_BUNDLES):
        if candidate and Path(candidate).is_file():
            return candidate
    return None
