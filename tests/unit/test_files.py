"""atomic_write: whole files only, normal modes, and a durable rename."""

from __future__ import annotations

import os
import stat

import pytest

from orchestrator.common import files


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    def set_(mask):
        old = os.umask(mask)
        restore.append(old)
    restore: list[int] = []
    yield set_
    if restore:
        os.umask(restore[0])


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_a_new_file_gets_the_normal_mode_for_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    path = tmp_path / "sub" / "lock.txt"
    files.atomic_write(path, "pins\n")
    assert path.read_text() == "pins\n"
    assert mode(path) == want  # not mkstemp's 0o600


def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "run.sh"
    path.write_text("old")
    os.chmod(path, 0o750)
    files.atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert mode(path) == 0o750


def test_no_temp_file_is_left_behind(tmp_path):
    path = tmp_path / "x.json"
    files.atomic_write(path, "{}")
    files.atomic_write(path, "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "x.txt"
    path.write_text("old")

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "d" / "x.txt"
    events: list[str] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        events.append("replace")
        return real_replace(src, dst)

    def fsync(fd):
        st = os.fstat(fd)
        events.append("fsync dir" if stat.S_ISDIR(st.st_mode) else "fsync file")
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "replace", replace)
    monkeypatch.setattr(files.os, "fsync", fsync)
    files.atomic_write(path, "data")
    assert events == ["fsync file", "replace", "fsync dir"]
    dir_fsyncs = [e for e in events if e == "fsync dir"]
    assert len(dir_fsyncs) == 1
