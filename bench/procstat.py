"""What the benchmarks read about a process from /proc."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The CPU time ``pid`` has used so far: utime + stime from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_jiffies() -> tuple[int, int]:
    """The whole machine's CPU time so far, in clock ticks over all cores: (busy, total),
    from the first line of /proc/stat (idle and iowait are not busy)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guests are in user)
    return total - fields[3] - fields[4], total


def machine_busy(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of all cores busy between two machine_jiffies() readings (0-1)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None
