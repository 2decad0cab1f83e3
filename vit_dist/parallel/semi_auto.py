"""Semi-auto-parallel: Megatron-style shard strategies set on a built ViT, and the AutoParallel wrapper.

The model file stays pure: this module attaches `Primitive.shard` strategies to the primitives of the
layers the model's seam (models.vit.ViTLayers) built, looked up by the layer's type: a backend layer
with no strategies here is refused in one line. Device matrix (dp, mp): the batch (or batch x
tokens) axis splits over dp, heads and hidden units over mp. Ops given no strategy (reshapes,
residual adds, the attention scale) take MindSpore's default data-parallel one.

The model's Linear holds its weight as (out, in) and multiplies with transpose_b, as nn.Dense does,
so strategies name the weight's axes in that order: column-parallel splits `out` ((dp,1),(mp,1)),
row-parallel splits `in` ((dp,mp),(1,mp)) and MindSpore all-reduces the partial sums over mp.

MindSpore 2.10 runs this only on Ascend/GPU; config.validate refuses semi_auto elsewhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mindspore import nn

from vit_dist.host.config import ParallelConfig
from vit_dist.host.errors import ConfigError
from vit_dist.models.vit import Attention, Linear, Mlp


def dense_strategies(layout: str, dp: int, mp: int) -> dict[str, tuple]:
    """Strategies of Linear's matmul and bias_add (2-D: Linear flattens batch x tokens)."""
    return {
        "column": {"matmul": ((dp, 1), (mp, 1)), "bias_add": ((dp, mp), (mp,))},
        "row": {"matmul": ((dp, mp), (1, mp)), "bias_add": ((dp, 1), (1,))},
        "data": {"matmul": ((dp, 1), (1, 1)), "bias_add": ((dp, 1), (1,))},
    }[layout]


def norm_strategies(dp: int, mp: int) -> dict[str, dict[str, tuple]]:
    return {"": {"layer_norm": ((dp, 1, 1), (1,), (1,))}}


def attention_strategies(dp: int, mp: int) -> dict[str, dict[str, tuple]]:
    """Child path inside the stock Attention -> {primitive attribute: strategy}."""
    heads = (dp, mp, 1, 1)  # (batch, heads, tokens, head_dim)
    return {
        "query": dense_strategies("column", dp, mp),
        "key": dense_strategies("column", dp, mp),
        "value": dense_strategies("column", dp, mp),
        "": {"scores": (heads, heads), "context": (heads, heads)},
        "softmax": {"softmax": (heads,)},
        "out": dense_strategies("row", dp, mp),
    }


def mlp_strategies(dp: int, mp: int) -> dict[str, dict[str, tuple]]:
    """Child path inside the stock Mlp -> {primitive attribute: strategy}. The tanh GELU
    (model.gelu_approximate) is nn.GELU, with no primitive of its own to carry one: MindSpore gives it
    the default data-parallel strategy."""
    return {"fc1": dense_strategies("column", dp, mp), "act": gelu_strategies((dp, mp)),
            "fc2": dense_strategies("row", dp, mp)}


def gelu_strategies(hidden: tuple) -> dict[str, tuple]:
    """The exact GELU's primitives: the activation's layout throughout, the scalars replicated."""
    return {"scale_in": (hidden, ()), "erf": (hidden,), "add_one": (hidden, ()), "mul": (hidden, hidden),
            "half": (hidden, ())}


# The seam's stock layer types -> their strategies (exact types: a subclass may compute otherwise).
SEAM_STRATEGIES = {nn.LayerNorm: norm_strategies, Attention: attention_strategies, Mlp: mlp_strategies}


def apply_strategies(net, dp: int, mp: int, head: str = "data"):
    """Sets the (dp, mp) strategies on a built VisionTransformer in place and returns it."""
    for block in net.blocks:
        for layer in (block.norm1, block.attn, block.norm2, block.mlp):
            _shard(layer, dp, mp)
    _shard(net.norm, dp, mp)
    _shard_linear(net.patch_embed.proj, dense_strategies("data", dp, mp))
    _shard_linear(net.head, dense_strategies("column" if head == "model" else "data", dp, mp))
    return net


def _shard(layer, dp: int, mp: int) -> None:
    strategies = SEAM_STRATEGIES.get(type(layer))
    if strategies is None:
        raise ConfigError(f"parallel.mode=semi_auto has no shard strategies for the layer {type(layer).__name__}; "
                          "use MindSpore's stock layers (parallel.fused_cpu_kernels=false) or parallel.mode=data")
    cells = dict(layer.cells_and_names())
    for path, prims in strategies(dp, mp).items():
        cell = cells[path]
        if isinstance(cell, nn.GELU):  # the tanh GELU: see mlp_strategies
            continue
        for attr, strategy in prims.items():
            getattr(cell, attr).shard(strategy)


def _shard_linear(linear: Linear, strategies: dict[str, tuple]) -> None:
    for attr, strategy in strategies.items():
        getattr(linear, attr).shard(strategy)


def reduced_by_mindspore(grads):
    """The train step's gradient reduction under semi_auto: none, MindSpore's parallel compiler inserts
    the all-reduce over the data-parallel ranks (averaged: enable_gradients_mean)."""
    return grads


def parallelize(train_step, cfg: ParallelConfig, dp: int, strategy_path: Optional[Path]):
    """Wraps the jitted train step in AutoParallel (MindSpore 2.10's documented entry for functional
    training: the outermost function must be wrapped). The input batch is split over dp, the ranks of
    one replica read the same samples; gradients are averaged over dp; the layout is saved for the
    checkpoint merge (when given a path); optimizer_shard turns on optimizer parallel (hsdp)."""
    from mindspore.parallel.auto_parallel import AutoParallel

    parallel = AutoParallel(train_step, parallel_mode="semi_auto")
    parallel.dataset_strategy(((dp, 1, 1, 1), (dp,)))
    parallel.enable_gradients_mean()
    if strategy_path is not None:  # bench has no run to merge
        strategy_path.parent.mkdir(parents=True, exist_ok=True)
        parallel.save_param_strategy_file(str(strategy_path))
    # The checkpoints hold optimizer moments too: their layouts go into the map, for the merge.
    parallel.disable_strategy_file_only_for_trainable_params()
    if cfg.optimizer_shard:
        parallel.hsdp()
    return parallel
