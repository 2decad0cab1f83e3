"""Semi-auto-parallel: Megatron-style shard strategies set on a built ViT, and the AutoParallel wrapper.

The model file stays pure: this module attaches `Primitive.shard` strategies to the primitives of the
layers the model's seam (models.vit.ViTLayers) built, looked up by the layer's type: a backend layer
with no strategies here is refused in one line. Device matrix (dp, mp): the batch (or batch x
tokens) axis splits over dp, heads and hidden units over mp.

The model's Linear holds its weight as (out, in) and multiplies with transpose_b, as nn.Dense does,
so strategies name the weight's axes in that order: column-parallel splits `out` ((dp,1),(mp,1)),
row-parallel splits `in` ((dp,mp),(1,mp)) and MindSpore all-reduces the partial sums over mp.

A strategy has one entry per input and one number per input axis, as the primitive receives it:
Linear's matmul and bias add see 2-D (batch x tokens, features); LayerNorm and GELU see the 3-D
(batch, tokens, features) activation; attention's BatchMatMuls and softmax see (batch, heads, tokens, .).
Every primitive of the model carries a strategy, the residual adds, transposes, dropouts and the
embedding's ops included: an op left without one would take MindSpore's default batch split over all
devices and redistribute the activation around it. Left to MindSpore: reshapes (their layout follows
their input), the class token's broadcast and the head's class-token slice (once per step).
tests/test_semi_auto.py checks every strategy against the shapes a real forward pass feeds it.

The optimizer side of the step (clipping, the overflow check, AdamW) is outside MindSpore's parallel
pass: it runs on each rank's local slices. apply_strategies therefore marks each Parameter with the
number of slices mp cuts it into, and sliced_global_norm adds the slices' squares up across ranks.

MindSpore 2.10 documents AutoParallel for Ascend only; config.validate refuses semi_auto elsewhere.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import mindspore as ms
from mindspore import Parameter, nn, ops

from vit_dist.host.config import ParallelConfig
from vit_dist.host.errors import ConfigError
from vit_dist.models.vit import GELU, Attention, DropPath, Linear, Mlp, TanhGELU


def dense_strategies(layout: str, dp: int, mp: int) -> dict[str, tuple]:
    """Strategies of Linear's matmul and bias_add (2-D: Linear flattens batch x tokens)."""
    return {
        "column": {"matmul": ((dp, 1), (mp, 1)), "bias_add": ((dp, mp), (mp,))},
        "row": {"matmul": ((dp, mp), (1, mp)), "bias_add": ((dp, 1), (1,))},
        "data": {"matmul": ((dp, 1), (1, 1)), "bias_add": ((dp, 1), (1,))},
    }[layout]


def norm_strategies(dp: int, mp: int, layer) -> dict[str, dict[str, tuple]]:
    return {"": {"layer_norm": ((dp, 1, 1), (1,), (1,))}}


def dropout_strategy(layout: tuple) -> dict[str, tuple]:
    """nn.Dropout's primitive on an activation of that layout."""
    return {"dropout": (layout,)}


def attention_strategies(dp: int, mp: int, layer) -> dict[str, dict[str, tuple]]:
    """Child path inside the stock Attention -> {primitive attribute: strategy}. The q/k/v outputs are
    (batch, tokens, dim) with dim over mp; the reshape to (batch, tokens, heads, head_dim) puts the
    heads over mp, and the transposes move them to axis 1 and back."""
    heads = (dp, mp, 1, 1)  # (batch, heads, tokens, head_dim)
    return {
        "query": dense_strategies("column", dp, mp),
        "key": dense_strategies("column", dp, mp),
        "value": dense_strategies("column", dp, mp),
        "": {"scale_query": ((dp, 1, mp), ()), "split_heads": ((dp, 1, mp, 1),), "scores": (heads, heads),
             "context": (heads, heads), "merge_heads": (heads,)},
        "softmax": {"softmax": (heads,)},
        "attn_drop": dropout_strategy(heads),
        "out": dense_strategies("row", dp, mp),
        "out_drop": dropout_strategy((dp, 1, 1)),
    }


def mlp_strategies(dp: int, mp: int, layer) -> dict[str, dict[str, tuple]]:
    """Child path inside the stock Mlp -> {primitive attribute: strategy}: fc1's (batch, tokens, hidden)
    output, hidden over mp, through the GELU and the first dropout to fc2."""
    hidden = (dp, 1, mp)
    return {"fc1": dense_strategies("column", dp, mp), "act": ACTIVATIONS[type(layer.act)](hidden),
            "drop1": dropout_strategy(hidden), "fc2": dense_strategies("row", dp, mp),
            "drop2": dropout_strategy((dp, 1, 1))}


def gelu_strategies(hidden: tuple) -> dict[str, tuple]:
    """The exact GELU's primitives: the activation's layout throughout, the 0-d scalars replicated."""
    return {"scale_in": (hidden, ()), "erf": (hidden,), "add_one": (hidden, ()), "mul": (hidden, hidden),
            "half": (hidden, ())}


ACTIVATIONS = {GELU: gelu_strategies, TanhGELU: lambda hidden: {"gelu": (hidden,)}}
# The seam's stock layer types -> their strategies (exact types: a subclass may compute otherwise).
SEAM_STRATEGIES = {nn.LayerNorm: norm_strategies, Attention: attention_strategies, Mlp: mlp_strategies}


def apply_strategies(net, dp: int, mp: int, head: str = "data"):
    """Sets the (dp, mp) strategies on every primitive of a built VisionTransformer, in place, and
    returns it. Between the sharded layers the activation is (batch, tokens, dim) with the batch over
    dp, replicated over mp: the residual adds, drop path, dropout and the embedding ops keep it."""
    tokens = (dp, 1, 1)
    for block in net.blocks:
        for layer in (block.norm1, block.attn, block.norm2, block.mlp):
            _shard(layer, dp, mp)
        block.add_attention.shard((tokens, tokens))
        block.add_mlp.shard((tokens, tokens))
        _shard_drop_path(block.drop_path, tokens)
    _shard(net.norm, dp, mp)
    net.patch_embed.to_patches.shard(((dp, 1, 1, 1, 1, 1),))  # (batch, rows, p, cols, p, channels)
    _shard_linear(net.patch_embed.proj, dense_strategies("data", dp, mp))
    net.prepend_class_token.shard((tokens, tokens))
    net.add_position.shard((tokens, (1, 1, 1)))
    _shard_cell(net.pos_drop, dropout_strategy(tokens))
    _shard_linear(net.head, dense_strategies("column" if head == "model" else "data", dp, mp))
    return net


def _shard(layer, dp: int, mp: int) -> None:
    strategies = SEAM_STRATEGIES.get(type(layer))
    if strategies is None or (isinstance(layer, Mlp) and type(layer.act) not in ACTIVATIONS):
        raise _unsupported(layer if strategies is None else layer.act)
    cells = dict(layer.cells_and_names())
    for path, prims in strategies(dp, mp, layer).items():
        cell = cells[path]
        if isinstance(cell, Linear):
            _shard_linear(cell, prims)
            continue
        _shard_cell(cell, prims)
        if isinstance(cell, nn.LayerNorm):  # (x, gamma, beta)
            _mark_split(cell.gamma, prims["layer_norm"][1])
            _mark_split(cell.beta, prims["layer_norm"][2])


def _shard_cell(cell, prims: dict[str, tuple]) -> None:
    for attr, strategy in prims.items():
        primitive = getattr(cell, attr, None)
        if primitive is None:  # e.g. another dropout layer than nn.Dropout
            raise _unsupported(cell)
        primitive.shard(strategy)


def _shard_drop_path(drop_path, tokens: tuple) -> None:
    if type(drop_path) is not DropPath:
        raise _unsupported(drop_path)
    drop_path.mul.shard((tokens, tokens))
    if drop_path.enabled:  # its dropout draws the (batch, 1, 1) mask
        _shard_cell(drop_path.dropout, dropout_strategy(tokens))


def _unsupported(layer) -> ConfigError:
    return ConfigError(f"parallel.mode=semi_auto has no shard strategies for the layer {type(layer).__name__}; "
                       "use MindSpore's stock layers (parallel.fused_cpu_kernels=false) or parallel.mode=data")


def _shard_linear(linear: Linear, strategies: dict[str, tuple]) -> None:
    for attr, strategy in strategies.items():
        getattr(linear, attr).shard(strategy)
    _mark_split(linear.weight, strategies["matmul"][1])  # (x, W) with W as (out, in)
    _mark_split(linear.bias, strategies["bias_add"][1])  # (rows, bias)


# The Parameter attribute apply_strategies sets: how many slices the strategies cut the Parameter into.
MP_SLICES = "vit_dist_mp_slices"


def _mark_split(param: Parameter, strategy: tuple) -> None:
    setattr(param, MP_SLICES, math.prod(strategy))


def slices_of(param: Parameter) -> int:
    """How many slices the shard strategies cut `param` into (1: whole on every rank)."""
    return getattr(param, MP_SLICES, 1)


def sliced_global_norm(slices: tuple[int, ...], world: int) -> Callable:
    """grads -> the global L2 norm of the whole gradients, from the local slices each rank holds.
    slices[i] is how many slices gradient i is cut into (slices_of its Parameter), over `world`
    ranks: each slice is held by world / slices[i] ranks, so one all-reduce over all ranks of
    sum_i |local slice i|^2 * slices[i] / world counts every slice once and a replicated gradient
    once. Every rank gets the same norm. With nothing sliced every rank holds the whole gradients
    and the norm is local. Call inside the jitted step (or any graph)."""
    def square_sum(g):
        return ops.reduce_sum(ops.square(g.astype(ms.float32)))

    if world == 1 or all(n == 1 for n in slices):
        def local_norm(grads):
            total = square_sum(grads[0])
            for g in grads[1:]:
                total = total + square_sum(g)
            return ops.sqrt(total)

        return local_norm

    if any(world % n for n in slices):
        raise ValueError(f"gradient slice counts {sorted(set(slices))} do not divide the world size {world}")
    weights = tuple(n / world for n in slices)
    all_reduce = ops.AllReduce(ops.ReduceOp.SUM)

    def global_norm(grads):
        if len(grads) != len(weights):
            raise ValueError(f"{len(grads)} gradients for {len(weights)} slice counts")
        total = square_sum(grads[0]) * weights[0]
        for g, weight in zip(grads[1:], weights[1:]):
            total = total + square_sum(g) * weight
        return ops.sqrt(all_reduce(total))

    return global_norm


def clip_by_norm(grads, clip_norm: float, norm):
    """grads scaled by clip_norm / max(norm, clip_norm): ops.clip_by_global_norm's arithmetic with a
    norm given (its own ExpandDims carries the grad_scale mark MindSpore's parallel pass looks for;
    this one has none, so nothing is added to the norm twice)."""
    scale = clip_norm / ops.maximum(norm, clip_norm)
    return tuple((g * scale).astype(g.dtype) for g in grads)


def reduced_by_mindspore(grads):
    """The train step's gradient reduction under semi_auto: none, MindSpore's parallel compiler inserts
    the all-reduce over the data-parallel ranks (averaged: enable_gradients_mean)."""
    return grads


def dataset_strategy(dp: int, soft_targets: bool = False) -> tuple:
    """The (images, labels) input layout: the batch over dp (labels int [batch], or soft targets
    [batch, classes]). MindSpore puts the remaining mp-fold repeat on the left of the device matrix,
    so rank r holds block r % dp (ParallelDims.replica)."""
    return ((dp, 1, 1, 1), (dp, 1) if soft_targets else (dp,))


def parallelize(train_step, cfg: ParallelConfig, dp: int, strategy_path: Optional[Path], soft_targets: bool = False):
    """Wraps the jitted train step in AutoParallel (MindSpore 2.10's documented entry for functional
    training: the outermost function must be wrapped). The input batch is split over dp (rank r holds
    block r % dp), the ranks of one replica read the same samples; gradients are averaged over dp; the layout is saved for the
    checkpoint merge (when given a path); optimizer_shard turns on optimizer parallel (hsdp)."""
    from mindspore.parallel.auto_parallel import AutoParallel

    parallel = AutoParallel(train_step, parallel_mode="semi_auto")
    parallel.dataset_strategy(dataset_strategy(dp, soft_targets))
    parallel.enable_gradients_mean()
    if strategy_path is not None:  # bench has no run to merge
        strategy_path.parent.mkdir(parents=True, exist_ok=True)
        parallel.save_param_strategy_file(str(strategy_path))
    # The checkpoints hold optimizer moments too: their layouts go into the map, for the merge.
    parallel.disable_strategy_file_only_for_trainable_params()
    if cfg.optimizer_shard:
        parallel.hsdp()
    return parallel
