"""Stochastic depth whose masks a resumed run draws again: the CPU backend's DropPath for the seam.

nn.Dropout's kernel keeps its random state inside the process, so a resumed run starts that state
afresh and draws other masks than the uninterrupted run would have. Here each mask is a function of
(seed, draw count): the count is a Parameter, saved with the checkpoint and restored on resume.
MindSpore's MultinomialWithReplacement takes its seed and offset as inputs, which makes that
possible; it exists on the CPU backend only."""
from __future__ import annotations

import itertools

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.operations.random_ops import MultinomialWithReplacement


class CountedDropPath(nn.Cell):
    """Drops a whole residual branch per sample with probability drop_prob, scaling survivors by
    1/keep (as models.vit.DropPath does); draw n of this layer is the same for the same seed."""

    def __init__(self, drop_prob: float, seed: int):
        super().__init__()
        self.enabled = drop_prob > 0.0
        self.keep = 1.0 - drop_prob
        self.weights = Tensor([[drop_prob, self.keep]], ms.float32)  # index 1: kept
        self.seed = Tensor(seed, ms.int64)
        self.draws = Parameter(Tensor(0, ms.int64), name="draws", requires_grad=False)
        self.sample = MultinomialWithReplacement(numsamples=1, replacement=True)

    def construct(self, x):
        if not self.enabled or not self.training:
            return x
        kept = self.sample(ops.broadcast_to(self.weights, (x.shape[0], 2)), self.seed, self.draws)
        x = ops.depend(x, ops.assign(self.draws, self.draws + 1))
        return x * (kept.astype(x.dtype) / self.keep).reshape((x.shape[0], 1, 1))


def counted_drop_path(seed: int, rank: int):
    """A seam factory (drop_prob -> CountedDropPath): each layer it builds gets a seed of its own, in
    build order, and each rank other seeds, so no two layers or ranks share masks."""
    layer = itertools.count()

    def build(drop_prob: float) -> CountedDropPath:
        # Odd multipliers keep (seed, rank, layer) -> seed one-to-one for any realistic sizes, never 0
        # (seed and offset both 0 would make the op draw from a random seed).
        return CountedDropPath(drop_prob, 1 + seed * 1_000_003 + rank * 10_007 + next(layer))

    return build
