"""The process's place in the job, read from the environment once, and the backend brought up.

This is the only module that reads launcher environment variables. Everything below it receives
a `Placement`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Mapping

COMM_BACKENDS = {"Ascend": "hccl", "GPU": "nccl", "CPU": "mccl"}


@dataclass(frozen=True)
class Placement:
    launcher: str  # single | msrun | rank_table
    rank: int
    world_size: int
    local_rank: int  # also the device id on Ascend/GPU
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_scheduler(env: Mapping[str, str]) -> bool:
    """msrun also starts the worker script as the cluster's scheduler process."""
    return env.get("MS_ROLE") == "MS_SCHED"


def serve_scheduler() -> None:
    """The scheduler's part of init(): it brokers the cluster until the workers are done."""
    from mindspore.communication import init

    init()


def detect_placement(env: Mapping[str, str]) -> Placement:
    """Which launcher started this process and where the process sits. Under msrun across nodes the
    rank may only be known after init(), so `rank` here is provisional there."""
    if env.get("MS_ROLE") == "MS_WORKER":  # msrun (or any MindSpore dynamic-cluster bootstrap)
        world = int(env["MS_WORKER_NUM"])
        local_rank = int(env.get("DEVICE_ID", "0"))
        return Placement("msrun", int(env.get("RANK_ID", local_rank)), world, local_rank,
                         int(env.get("LOCAL_WORLD_SIZE", world)))
    if "RANK_TABLE_FILE" in env and "RANK_SIZE" in env:
        local_rank = int(env.get("DEVICE_ID", "0"))
        return Placement("rank_table", int(env["RANK_ID"]), int(env["RANK_SIZE"]), local_rank,
                         int(env.get("LOCAL_WORLD_SIZE", "1")))
    return Placement("single", 0, 1, 0, 1)


def cpu_threads(threads_per_rank: int, local_world_size: int) -> int:
    """Kernel threads per rank on the CPU backend: ranks sharing a node split its cores, since
    oversubscribed ranks spin against each other."""
    if threads_per_rank:
        return threads_per_rank
    return max(1, (os.cpu_count() or 1) // local_world_size)


def init_backend(device_target: str, threads_per_rank: int, placement: Placement) -> Placement:
    """Graph mode on the configured device; for a multi-rank job init() the collective backend
    (HCCL/NCCL/MCCL by device) and the data-parallel context. Returns the placement with the rank
    the backend assigned."""
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    ms.set_context(mode=ms.GRAPH_MODE)
    if device_target == "CPU":
        ms.set_device("CPU")
        ms.device_context.cpu.op_tuning.threads_num(cpu_threads(threads_per_rank, placement.local_world_size))
    else:
        ms.set_device(device_target, placement.local_rank)
    if not placement.distributed:
        return placement
    init()
    placement = replace(placement, rank=get_rank(), world_size=get_group_size())
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=placement.world_size)
    return placement
