"""What the machine did during a bench: CPU seconds of every process, from /proc/stat."""

from __future__ import annotations

import os


def cpu_busy_seconds() -> float:
    """Seconds the machine's cores were not idle since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
