"""Dropout and stochastic depth whose masks a resumed run draws again: the CPU backend's layers for
the seam's `dropout` and `drop_path`.

nn.Dropout's kernel keeps its random state inside the process, so a resumed run starts that state
afresh and draws other masks than the uninterrupted run would have. Here each mask is a function of
(seed, draw count): the count is a Parameter, saved with the checkpoint and restored on resume.
MindSpore's MultinomialWithReplacement takes its seed and offset as inputs, which makes that
possible; it exists on the CPU backend only."""
from __future__ import annotations

import itertools
from typing import Callable

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.operations.random_ops import MultinomialWithReplacement

from vit_dist.models.vit import dropout as stock_dropout


class CountedDrop(nn.Cell):
    """Zeroes with probability drop_prob, scaling survivors by 1/keep: each element (dropout), or
    each sample's whole residual branch (per_sample: stochastic depth, as models.vit.DropPath does).
    Draw n of this layer is the same for the same seed."""

    def __init__(self, drop_prob: float, seed: int, per_sample: bool):
        super().__init__()
        self.enabled = drop_prob > 0.0
        self.per_sample = per_sample
        self.keep = 1.0 - drop_prob
        self.weights = Tensor([[drop_prob, self.keep]], ms.float32)  # index 1: kept
        self.seed = Tensor(seed, ms.int64)
        self.draws = Parameter(Tensor(0, ms.int64), name="draws", requires_grad=False)
        self.sample = MultinomialWithReplacement(numsamples=1, replacement=True)

    def construct(self, x):
        if not self.enabled or not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.per_sample else x.shape
        kept = self.sample(ops.broadcast_to(self.weights, (x.shape[0] if self.per_sample else x.size, 2)),
                           self.seed, self.draws)
        x = ops.depend(x, ops.assign(self.draws, self.draws + 1))
        return x * (kept.astype(x.dtype) / self.keep).reshape(shape)


def counted_layers(seed: int, rank: int) -> tuple[Callable[[float], nn.Cell], Callable[[float], CountedDrop]]:
    """The seam factories (dropout, drop_path), drop probability -> layer. Each CountedDrop they build
    gets a seed of its own, in build order, and each rank other seeds, so no two layers or ranks
    share masks. A dropout of probability 0 is the stock one, which holds no draw count."""
    layer = itertools.count()

    def build(drop_prob: float, per_sample: bool) -> CountedDrop:
        # Odd multipliers keep (seed, rank, layer) -> seed one-to-one for any realistic sizes, never 0
        # (seed and offset both 0 would make the op draw from a random seed).
        return CountedDrop(drop_prob, 1 + seed * 1_000_003 + rank * 10_007 + next(layer), per_sample)

    def dropout(drop_prob: float) -> nn.Cell:
        return build(drop_prob, False) if drop_prob > 0 else stock_dropout(drop_prob)

    return dropout, (lambda drop_prob: build(drop_prob, True))
