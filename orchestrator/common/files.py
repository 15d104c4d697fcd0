"""Writing state safely: every file we own is replaced atomically (temp file
in the same directory, fsync, rename, fsync of the directory), so a crash or
a concurrent run never leaves half a lock, Dockerfile or manifest behind."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import tempfile
import time
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename in directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace path with data. The file gets the mode of the file it replaces,
    or 0o666 & ~umask for a new one (mkstemp's 0o600 would leak into the tree)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an advisory lock on path + '.lock' for a read-modify-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_RECORD = 120


def _record(text: str) -> bytes:
    """A lock file's one fixed-size record: written whole, it replaces the last one entirely."""
    return text.strip()[:_RECORD - 1].ljust(_RECORD - 1).encode() + b"\n"


def _holder(fd: int) -> str:
    """What the holder of a lock file wrote into it ("<pid> <what>"), or '' when it wrote nothing."""
    try:
        return os.pread(fd, _RECORD, 0).decode(errors="replace").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def held(path: Path, *, shared: bool = False, note: str = "", on_wait=None):
    """Hold an advisory flock on path (created if missing) for the body of the with.

    The holder of an exclusive lock writes "<pid> <note>" into the file, so a
    process that has to wait can say whom it waits for: on_wait(holder) is
    called once, with that text ('' when unknown), before blocking. A shared
    holder writes too (the last one's text stays), which is enough to name one
    of them. The file is opened without truncating, so a waiter never erases
    what the holder wrote; an exclusive holder blanks its record as it lets go,
    so a later waiter never names a holder that has left. The lock goes away
    with the process if it dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        if not _try_flock(fd, mode):
            holder = _wait_for_record(fd, mode)
            if holder is not None:  # None: the lock came free while we looked
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, mode)
        try:
            # One fixed-size record written at once: shared holders writing together never interleave.
            os.pwrite(fd, _record(f"{os.getpid()} {note}"), 0)
            yield
        finally:
            if not shared:
                os.pwrite(fd, _record(""), 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _wait_for_record(fd: int, mode: int, settle: float = 1.0) -> str | None:
    """The holder's record; None if the lock was taken meanwhile.

    A holder writes its record just after it takes the lock, so an empty
    record is given a moment to appear before the waiter settles for ''.
    """
    deadline = time.monotonic() + settle
    holder = _holder(fd)
    while not holder and time.monotonic() < deadline:
        time.sleep(0.02)
        if _try_flock(fd, mode):
            return None
        holder = _holder(fd)
    return holder
