"""Unit tests keep the machine's state out: the registry-blob index (orchestrator/oci/registry/known.py)
and the record of images smoke keeps in an engine go to a temporary state dir, so a test never sees what
another test, or a real run, remembered."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"
