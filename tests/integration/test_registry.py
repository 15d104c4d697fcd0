"""The registry client against the real embedded registry."""

from __future__ import annotations

import os
import uuid

import pytest

from orchestrator.oci import registry
from orchestrator.common.errors import UserError

pytestmark = pytest.mark.engine


@pytest.fixture
def repo(engine_ready):
    return registry.Registry(engine_ready), f"orch-test-{uuid.uuid4().hex[:8]}/blobs"


def test_a_large_blob_goes_up_in_verified_chunks_and_only_once(repo):
    reg, name = repo
    data = os.urandom(registry.CHUNK + 1234)  # forces the PATCH path
    seen = []
    digest, sent = reg.upload_blob(name, data, progress=lambda done, total: seen.append(done))
    assert sent == len(data) and seen[-1] == len(data) and len(seen) == 2
    assert reg.blob_size(name, digest) == len(data)
    assert reg.upload_blob(name, data) == (digest, 0)  # already there: nothing sent


def test_a_blob_is_mounted_across_repositories_without_moving_bytes(repo):
    reg, name = repo
    digest, _ = reg.upload_blob(name, b"shared layer " + uuid.uuid4().bytes)
    other = name.replace("/blobs", "/other")
    assert reg.mount_blob(other, digest, name)
    assert reg.has_blob(other, digest)


def test_content_that_does_not_match_its_digest_is_refused(repo):
    reg, name = repo
    with pytest.raises(UserError, match="does not match its digest"):
        reg.upload_blob(name, b"abc", digest="sha256:" + "0" * 64)


def test_an_unreachable_registry_is_a_clear_error_not_a_traceback():
    from orchestrator.common.errors import EnvironmentProblem

    reg = registry.Registry("127.0.0.1:9", retries=1, timeout=2)
    with pytest.raises(EnvironmentProblem, match="unreachable"):
        reg.check()


def test_the_plain_http_loopback_registry_is_found_without_waiting(engine_ready):
    import time

    started = time.monotonic()
    reg = registry.Registry(engine_ready)
    assert reg.ping()
    assert time.monotonic() - started < 1.0
    assert reg.base == f"http://{engine_ready}/v2"


def test_a_file_streams_up_and_a_blob_copies_across_repositories(repo, tmp_path):
    reg, name = repo
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "layer.bin"
    path.write_bytes(data)
    digest = registry.sha256_digest(data)
    assert reg.upload_blob_file(name, path, digest, len(data)) == (digest, len(data))
    other = name.replace("/blobs", "/copied")
    assert reg.copy_blob(registry.Registry(reg.host), name, other, digest, len(data)) == (digest, 0)  # a mount
    assert reg.get_blob(other, digest) == data
