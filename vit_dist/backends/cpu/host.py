"""CPU-backend settings of the process (no MindSpore import): kernel threads per rank, and the host
thread's priority."""
from __future__ import annotations

import os


def cpu_threads(threads_per_rank: int, local_world_size: int) -> int:
    """Kernel threads per rank on the CPU backend: ranks sharing a node split its cores, since
    oversubscribed ranks spin against each other."""
    if threads_per_rank:
        return threads_per_rank
    return max(1, (os.cpu_count() or 1) // local_world_size)


def yield_cores_to_kernels() -> None:
    """Puts the calling thread in SCHED_IDLE. MindSpore's Python thread busy-waits while the kernel
    threads run a step (in the runtime pipeline's queue wait), taking a core from them; at idle
    priority it runs only on a core they leave free, and a step takes about a third less time.
    Call it once kernel threads exist (after the first step): threads and processes started later
    inherit the policy, and an unprivileged thread cannot leave it. A no-op where the OS has no
    SCHED_IDLE."""
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
