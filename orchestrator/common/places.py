"""Where the tool keeps things on this machine, decided once.

- the cache ($ORCH_CACHE_DIR, else ~/.cache/orchestrator): compressed layer
  blobs (`blobs/`), Debian indexes and .debs (`apt/`), wheels built from
  sdists (`sdist-wheels/`), uv's wheel cache (`uv/`) and the directories it
  installs locks into while their layers are written (`tmp/`); anything
  there can be deleted and is made again;
- the state ($ORCH_STATE_DIR, else ~/.local/state/orchestrator): the embedded
  registry's storage and config, logs, push locks, the signing key made for
  this machine, which repositories of each registry hold which blobs
  (`registry-blobs.sqlite`) and the images smoke keeps in each engine
  (`smoke-images.json`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(part: str = "") -> Path:
    root = Path(os.environ.get("ORCH_CACHE_DIR") or Path.home() / ".cache" / "orchestrator")
    return root / part if part else root


def state_dir() -> Path:
    path = Path(os.environ.get("ORCH_STATE_DIR") or Path.home() / ".local/state/orchestrator")
    path.mkdir(parents=True, exist_ok=True)
    return path
