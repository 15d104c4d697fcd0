"""The images smoke keeps in an engine, and the disk budget they keep to.

Smoke loads each variant's image into the engine (orchestrator.release.smoke.images)
and leaves it there for the next group and run, so the large shared layers
(CUDA libraries, torch) are loaded once. Each engine's loaded images are
recorded in `<state dir>/smoke-images.json` with the unpacked size of each
layer (by chain ID, so a layer shared by several images counts once);
beyond the budget the least recently used are untagged and the engine frees
the layers no other image holds. The budget: ORCH_SMOKE_KEEP_GB gigabytes
of unpacked layers, 24 by default (0 keeps nothing after a run);
`invoke doctor` shows it and what is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.common.errors import UserError
from orchestrator.common.files import atomic_write, exclusive
from orchestrator.common.places import state_dir

BUDGET_ENV = "ORCH_SMOKE_KEEP_GB"
DEFAULT_BUDGET_GB = 24.0
GB = 1000**3


def budget(environ=None) -> tuple[int, str]:
    """(bytes of unpacked layers smoke may keep in the engine, how that was decided)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return int(DEFAULT_BUDGET_GB * GB), f"{DEFAULT_BUDGET_GB:g} GB (the default; {BUDGET_ENV} sets it)"
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not 0 <= gb < float("inf"):
        raise UserError(f"{BUDGET_ENV}={raw!r} is not a number of gigabytes", f"e.g. {BUDGET_ENV}=40 (0 keeps nothing)")
    return int(gb * GB), f"{gb:g} GB ({BUDGET_ENV})"


def record_path() -> Path:
    return state_dir() / "smoke-images.json"


@dataclass
class Kept:
    """Images smoke loaded into one engine, with the unpacked size of each layer (by chain ID)."""

    engine: str
    budget: int
    path: Path = field(default_factory=record_path)

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @contextlib.contextmanager
    def _edit(self):
        with exclusive(self.path):
            data = self._read()
            images = data.setdefault("engines", {}).setdefault(self.engine, {})
            yield images
            atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def images(self) -> dict[str, dict]:
        return dict(self._read().get("engines", {}).get(self.engine, {}))

    def add(self, image_id: str, tag: str, layers: list[tuple[str, int]]) -> None:
        with self._edit() as images:
            images[image_id] = {"tag": tag, "last_used": time.time(), "layers": [list(x) for x in layers]}

    def touch(self, image_ids) -> None:
        with self._edit() as images:
            for i in image_ids:
                if i in images:
                    images[i]["last_used"] = time.time()

    def forget(self, image_ids) -> None:
        with self._edit() as images:
            for i in image_ids:
                images.pop(i, None)

    @staticmethod
    def usage(images: dict[str, dict]) -> int:
        """Bytes of unpacked layers these images hold, each shared layer counted once."""
        sizes: dict[str, int] = {}
        for entry in images.values():
            for chain, size in entry.get("layers") or []:
                sizes[chain] = size
        return sum(sizes.values())

    def over_budget(self, keep: set[str]) -> list[tuple[str, dict]]:
        """The least recently used images to remove, oldest first, until the rest fit the budget."""
        images = self.images()
        order = sorted((i for i in images if i not in keep), key=lambda i: images[i].get("last_used", 0))
        out = []
        for image_id in order:
            if self.usage(images) <= self.budget:
                break
            out.append((image_id, images.pop(image_id)))
        return out


def engine_key(client) -> str:
    try:
        return client.info().get("ID") or "engine"
    except Exception:  # noqa: BLE001 - a fake or an old engine: one record for all
        return "engine"


def summary(engine: str, environ=None) -> tuple[int, int, str]:
    """(bytes kept, images kept, the budget as words) for one engine."""
    images = Kept(engine, 0).images()
    return Kept.usage(images), len(images), budget(environ)[1]
