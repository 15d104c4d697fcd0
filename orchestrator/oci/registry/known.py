"""Which repositories of a registry hold a blob, as far as this machine has seen: mount instead of send.

The distribution API has no "does this registry hold blob X anywhere":
a HEAD asks one repository, and a cross-repository mount needs a
repository to mount from. So every repository the tool pushes a blob to,
mounts it into, or reads a manifest naming it from is remembered here, per
registry host, across runs and projects; before sending a blob, the client
tries to mount it from those repositories (client.Registry.skip_or_mount).
A second project whose CUDA-libs layers the registry already holds under
another namespace then sends none of them.

The index is a hint, never trusted: a mount the registry refuses (the blob
was garbage-collected, the storage was reset, no pull access) forgets that
entry, and the blob is sent. It lives in `<state dir>/registry-blobs.sqlite`
(SQLite: several processes push at once); deleting it costs only mounts.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

from orchestrator.common.places import state_dir

FILE = "registry-blobs.sqlite"
MAX_CANDIDATES = 5  # repositories tried per blob, most recently seen first


class KnownBlobs:
    def __init__(self, path: Path | None = None):
        self._path = path
        self._ready = False
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path or state_dir() / FILE

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA synchronous=NORMAL")  # a hint: losing the last entries to a power cut costs a send
        if not self._ready:
            with self._lock:
                try:
                    db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
                    db.execute("CREATE TABLE IF NOT EXISTS blobs (host TEXT, digest TEXT, repo TEXT, seen REAL, "
                               "PRIMARY KEY (host, digest, repo))")
                    db.commit()
                except BaseException:
                    db.close()
                    raise
                self._ready = True
        return db

    def _do(self, sql: str, args=(), many: bool = False) -> list:
        """Run one statement; [] on any database trouble (a hint only: a push never fails for want of it)."""
        try:
            db = self._connect()
            try:
                with db:
                    cur = db.executemany(sql, args) if many else db.execute(sql, args)
                    return cur.fetchall()
            finally:
                db.close()
        except (sqlite3.Error, OSError):
            return []

    def add(self, host: str, repo: str, digests: Iterable[str]) -> None:
        rows = [(host, d, repo, time.time()) for d in dict.fromkeys(digests) if d]
        if rows:
            self._do("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", rows, many=True)

    def repos(self, host: str, digest: str, besides: Iterable[str] = ()) -> list[str]:
        """Repositories of host seen holding digest, most recent first (besides excluded)."""
        skip = set(besides)
        rows = self._do("SELECT repo FROM blobs WHERE host = ? AND digest = ? ORDER BY seen DESC", (host, digest))
        return [r for (r,) in rows if r not in skip][:MAX_CANDIDATES]

    def forget(self, host: str, repo: str, digest: str) -> None:
        self._do("DELETE FROM blobs WHERE host = ? AND digest = ? AND repo = ?", (host, digest, repo))


_default: dict[Path, KnownBlobs] = {}
_default_lock = threading.Lock()


def default() -> KnownBlobs:
    """The machine's index (one object per state dir, so ORCH_STATE_DIR set by a test is honoured)."""
    path = state_dir() / FILE
    with _default_lock:
        if path not in _default:
            _default[path] = KnownBlobs(path)
        return _default[path]
