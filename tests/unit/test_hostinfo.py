"""One answer, everywhere, to: is this address this machine? which architecture is it? which CA bundle?"""

from __future__ import annotations

import pytest

from orchestrator.common import hostinfo


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1:5000", True), ("localhost:5000", True), ("127.0.0.1:5000/team", True), ("127.3.2.1:5000", True),
    ("http://localhost:5000", True), ("[::1]:5000", True), ("::1", True), ("[::1]", True),
    ("registry.localhost:5000", True), ("tcp://[::1]:2376", True), ("ssh://builder@127.0.0.1", True),
    ("registry.example.com", False), ("registry.example.com:443/ns", False), ("ghcr.io/org", False),
    ("10.0.0.5:5000", False), ("[2001:db8::1]:5000", False), ("tcp://arm-host:2376", False),
])
def test_loopback_is_decided_the_same_way_for_registries_urls_and_engine_endpoints(address, loopback):
    assert hostinfo.is_loopback(address) is loopback


@pytest.mark.parametrize("machine, arch", [("x86_64", "amd64"), ("amd64", "amd64"), ("aarch64", "arm64"),
                                           ("arm64", "arm64"), ("riscv64", "riscv64")])
def test_host_architectures_have_one_name(machine, arch):
    assert hostinfo.host_arch(machine) == arch
    assert hostinfo.host_platform(machine) == f"linux/{arch}"


def test_the_ca_bundle_is_requests_then_ssl_cert_file_then_the_systems(tmp_path):
    a, b = tmp_path / "a.pem", tmp_path / "b.pem"
    a.write_text("a")
    b.write_text("b")
    assert hostinfo.ca_bundle({"REQUESTS_CA_BUNDLE": str(a), "SSL_CERT_FILE": str(b)}) == str(a)
    assert hostinfo.ca_bundle({"SSL_CERT_FILE": str(b)}) == str(b)
    assert hostinfo.ca_bundle({"REQUESTS_CA_BUNDLE": str(tmp_path / "gone.pem"), "SSL_CERT_FILE": str(b)}) == str(b)
    system = hostinfo.ca_bundle({})
    assert system is None or system in hostinfo.SYSTEM_CA_BUNDLES
