"""Where a run's time goes: seconds and bytes per phase, added up by the code doing the work.

A `Meter` is made by the run that wants a breakdown (flow.publish) and
switched on with `recording()`; the layer writer, the uploader, the build
steps, smoke and promote add to whatever meters are recording (`add`,
`timed`), from any thread, so no timing object has to travel through every
call in between. Nothing records when no meter is on.

Phases overlap (a layer uploads while the next one compresses), so their
seconds do not add up to the run's: compress and hash count CPU seconds of
the threads doing them; the others wall seconds spent in them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field

# The phases a publish reports, in order (README, BENCHMARKS.md "Where the time goes").
PHASES = ("build", "export", "compress", "hash", "upload", "smoke", "promote")

_active: list["Meter"] = []
_guard = threading.Lock()


@dataclass
class Phase:
    seconds: float = 0.0
    bytes: int = 0

    def mb_s(self) -> float | None:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 and self.bytes else None


@dataclass
class Meter:
    phases: dict[str, Phase] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, phase: str, seconds: float = 0.0, nbytes: int = 0) -> None:
        with self._lock:
            p = self.phases.setdefault(phase, Phase())
            p.seconds += seconds
            p.bytes += nbytes

    def get(self, phase: str) -> Phase:
        with self._lock:
            return Phase(**vars(self.phases.get(phase, Phase())))

    def wall(self) -> float:
        return time.monotonic() - self.started

    def floor(self, cores: int | None = None) -> float | None:
        """Seconds the compression and hashing of this run's bytes need at least on this machine:
        their measured CPU seconds spread over every core (the rest of the work could hide behind them)."""
        cores = cores or os.cpu_count() or 1
        cpu = self.get("compress").seconds + self.get("hash").seconds
        return cpu / cores if cpu > 0 else None

    def lines(self, cores: int | None = None) -> list[str]:
        """One line per phase, then the floor against the run's wall time."""
        cores = cores or os.cpu_count() or 1
        out = []
        for name in PHASES:
            p = self.get(name)
            speed = p.mb_s()
            cpu = " CPU" if name in ("compress", "hash") else ""
            out.append(f"  {name:<8} {p.seconds:7.1f} s{cpu:<4} {p.bytes / 1e6:11,.1f} MB"
                       + (f" {speed:8,.0f} MB/s" + (" per core" if cpu else "") if speed else ""))
        wall = self.wall()
        floor = self.floor(cores)
        if floor is not None:
            out.append(f"  floor    {floor:7.1f} s      compress + hash CPU seconds over {cores} cores; "
                       f"this run {wall:.1f} s, floor/actual {floor / wall:.2f}")
        else:
            out.append(f"  total    {wall:7.1f} s      (nothing compressed: no floor)")
        return out

    def as_json(self, cores: int | None = None) -> dict:
        wall = self.wall()
        floor = self.floor(cores)
        return {"seconds": round(wall, 2),
                "phases": {n: {"seconds": round(self.get(n).seconds, 2), "bytes": self.get(n).bytes}
                           for n in PHASES},
                "floor_seconds": round(floor, 2) if floor is not None else None,
                "floor_over_actual": round(floor / wall, 3) if floor is not None and wall > 0 else None}

    @contextlib.contextmanager
    def recording(self):
        with _guard:
            _active.append(self)
        try:
            yield self
        finally:
            with _guard:
                _active.remove(self)


def add(phase: str, seconds: float = 0.0, nbytes: int = 0) -> None:
    """Count seconds and bytes against phase on every meter that is recording (none: nothing happens)."""
    if not _active:
        return
    with _guard:
        meters = list(_active)
    for m in meters:
        m.add(phase, seconds, nbytes)


def recording() -> bool:
    return bool(_active)


@contextlib.contextmanager
def timed(phase: str, nbytes: int = 0, cpu: bool = False):
    """Count the wall (or this thread's CPU) seconds of the body against phase."""
    clock = time.thread_time if cpu else time.monotonic
    start = clock()
    try:
        yield
    finally:
        add(phase, clock() - start, nbytes)
