"""Who used the machine's CPUs during a load run: the server measured, the load generator, and everything else
(other people's tests on a shared machine), so that a reader can tell a quiet run from a noisy one."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def group_seconds(pgid: int) -> float:
    """CPU time (user + system) of the live processes in process group `pgid` (a server and its workers)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICK


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent on anything but idle and I/O wait since boot (steal counts as busy)."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK
