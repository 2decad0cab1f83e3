"""Data parallelism: every rank holds the whole model; gradients are averaged across ranks."""
from __future__ import annotations

from typing import Callable

import numpy as np

from vit_dist.host.placement import Placement


def gradient_reducer(placement: Placement, parameters=None) -> Callable:
    """Averages a tuple of gradients over all ranks (identity on one device). Given the optimizer's flat
    gradients, one all-reduce per parameter group. Given the parameters whose gradients it gets, one
    per parameter, by MindSpore's DistributedGradReducer: MindSpore fuses them into buckets
    (bootstrap.init_backend's comm_fusion), each started once its gradients exist. Call inside the
    jitted step."""
    if not placement.distributed:
        return lambda grads: grads
    from mindspore import nn, ops

    if parameters is not None:
        return nn.DistributedGradReducer(parameters, mean=True, degree=placement.world_size)

    all_reduce = ops.AllReduce(ops.ReduceOp.SUM)
    world_size = placement.world_size

    def mean_over_ranks(grads):
        return tuple(all_reduce(g) / world_size for g in grads)

    return mean_over_ranks


def world_size() -> int:
    """The ranks of the job as MindSpore's collective backend counts them; 1 when it was never
    initialised (one device)."""
    from mindspore.communication import GlobalComm, get_group_size

    return get_group_size() if GlobalComm.INITED else 1


def finite_on_every_rank(world: int) -> Callable:
    """finite -> whether it is True on every rank of `world` (identity on one device): a float sum of
    the ranks' overflow flags over all ranks, as MindSpore's loss-scale cells reduce theirs
    (nn/wrap/loss_scale.py), so every rank takes the same skip decision. Call inside the jitted step."""
    if world == 1:
        return lambda finite: finite
    import mindspore as ms
    from mindspore import ops

    all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def every_rank(finite):
        overflows = all_reduce(ops.logical_not(finite).astype(ms.float32))
        return overflows < 0.5

    return every_rank


def all_reduce_sum(values, placement: Placement) -> np.ndarray:
    """Element-wise sum of a small vector over all ranks; every rank gets the result. float32 (the
    widest float the CPU collectives take) keeps integer counts exact below 2**24."""
    return _across_ranks(values, placement, lambda ops: ops.AllReduce(ops.ReduceOp.SUM))[0]


def all_gather(values, placement: Placement) -> np.ndarray:
    """A small vector from every rank, as rows in rank order (float32); every rank gets them all."""
    return _across_ranks(values, placement, lambda ops: ops.AllGather())


def _across_ranks(values, placement: Placement, collective) -> np.ndarray:
    """The row of values (float32) through the collective that collective(mindspore.ops) makes; alone, the row."""
    row = np.asarray(values, dtype=np.float32)[None]
    if not placement.distributed:
        return row
    import mindspore as ms
    from mindspore import ops

    return collective(ops)(ms.Tensor(row)).asnumpy()
