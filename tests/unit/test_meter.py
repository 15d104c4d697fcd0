"""`publish` ends with where the time went: one line per phase with seconds and MB/s, and the floor this
machine sets (the measured compression and hashing CPU seconds spread over its cores)."""

from __future__ import annotations

import threading

from orchestrator.common import meter


def test_work_done_while_a_meter_records_is_counted_from_any_thread_and_nothing_records_otherwise():
    meter.add("upload", 5.0, 10**9)  # no meter on: nothing happens
    m = meter.Meter()
    with m.recording():
        t = threading.Thread(target=meter.add, args=("compress", 2.0, 800_000_000))
        t.start()
        t.join()
        meter.add("hash", 0.5, 1_600_000_000)
        with meter.timed("smoke"):
            pass
    meter.add("compress", 100.0, 1)  # after: not counted
    assert (m.get("compress").seconds, m.get("compress").bytes) == (2.0, 800_000_000)
    assert m.get("upload").bytes == 0 and m.get("smoke").seconds >= 0


def test_the_lines_name_every_phase_and_the_floor_against_the_run(monkeypatch):
    m = meter.Meter()
    m.add("compress", 8.0, 4_000_000_000)  # 500 MB/s per core
    m.add("hash", 2.0, 8_000_000_000)
    m.add("upload", 10.0, 2_000_000_000)
    monkeypatch.setattr(m, "wall", lambda: 10.0)
    lines = m.lines(cores=2)
    assert [line.split()[0] for line in lines] == [*meter.PHASES, "floor"]
    assert "500 MB/s per core" in lines[meter.PHASES.index("compress")]
    assert "200 MB/s" in lines[meter.PHASES.index("upload")]
    # (8 + 2) CPU seconds over 2 cores: 5 s at the least; the run took 10.
    assert m.floor(cores=2) == 5.0 and lines[-1].endswith("floor/actual 0.50")
    report = m.as_json(cores=2)
    assert report["floor_seconds"] == 5.0 and report["floor_over_actual"] == 0.5
    assert report["phases"]["upload"] == {"seconds": 10.0, "bytes": 2_000_000_000}
