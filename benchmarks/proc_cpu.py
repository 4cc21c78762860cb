"""CPU time of processes, read from ``/proc``: what the benchmarks report as the cost of an
operation on each side."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time the processes ``pids`` have used so far (Linux; 0 elsewhere, and
    nothing for a process that is gone)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.0
