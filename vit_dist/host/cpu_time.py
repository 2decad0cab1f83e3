"""CPU time of a process and the processes it started, for per-image CPU figures that a busy or
shared machine does not distort as much as wall-clock rates. No MindSpore: benchmarks/ programs use
it too."""
from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_seconds() -> float:
    """User + system CPU seconds used so far by this process (all its threads, such as MindSpore's
    map workers) and its live descendant processes (worker processes: torch's DataLoader, MindSpore's
    Python multiprocessing). Descendants are found through Linux's /proc, and only there; one that
    has ended no longer counts, so measure while the workers live."""
    return time.process_time() + sum(_proc_cpu_seconds(pid) for pid in _descendants(os.getpid()))


def _descendants(root: int) -> list[int]:
    """Process ids of root's children, their children, and so on."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended while being listed
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [root]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (fields 14 and 15 of /proc/PID/stat), 0 once it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
