"""Semi-auto-parallel: Megatron-style shard strategies set on a built ViT, and the AutoParallel wrapper.

The model file stays pure: this module attaches `Primitive.shard` strategies to the primitives of the
cells at the contract paths (`blocks.N.attn.query`, ...). Device matrix (dp, mp): the batch (or
batch x tokens) axis splits over dp, heads and hidden units over mp. Ops given no strategy (reshapes,
residual adds, the attention scale) take MindSpore's default data-parallel one.

The model's Linear holds its weight as (out, in) and multiplies with transpose_b, as nn.Dense does,
so strategies name the weight's axes in that order: column-parallel splits `out` ((dp,1),(mp,1)),
row-parallel splits `in` ((dp,mp),(1,mp)) and MindSpore all-reduces the partial sums over mp.

MindSpore 2.10 runs this only on Ascend/GPU; config.validate refuses semi_auto elsewhere.
"""
from __future__ import annotations

from pathlib import Path

from vit_dist.config import ParallelConfig
from vit_dist.models.vit import GELU


def dense_strategies(layout: str, dp: int, mp: int) -> dict[str, tuple]:
    """Strategies of Linear's matmul and bias_add (2-D: Linear flattens batch x tokens)."""
    return {
        "column": {"matmul": ((dp, 1), (mp, 1)), "bias_add": ((dp, mp), (mp,))},
        "row": {"matmul": ((dp, mp), (1, mp)), "bias_add": ((dp, 1), (1,))},
        "data": {"matmul": ((dp, 1), (1, 1)), "bias_add": ((dp, 1), (1,))},
    }[layout]


def block_strategies(dp: int, mp: int) -> dict[str, dict[str, tuple]]:
    """Cell path inside a block -> {primitive attribute: strategy}."""
    heads = (dp, mp, 1, 1)  # (batch, heads, tokens, head_dim)
    norm = {"layer_norm": ((dp, 1, 1), (1,), (1,))}
    return {
        "norm1": norm,
        "norm2": norm,
        "attn.query": dense_strategies("column", dp, mp),
        "attn.key": dense_strategies("column", dp, mp),
        "attn.value": dense_strategies("column", dp, mp),
        "attn": {"scores": (heads, heads), "context": (heads, heads)},
        "attn.softmax": {"softmax": (heads,)},
        "attn.out": dense_strategies("row", dp, mp),
        "mlp.fc1": dense_strategies("column", dp, mp),
        "mlp.act": gelu_strategies((dp, mp)),
        "mlp.fc2": dense_strategies("row", dp, mp),
    }


def gelu_strategies(hidden: tuple) -> dict[str, tuple]:
    """The exact GELU's primitives: the activation's layout throughout, the scalars replicated."""
    return {"scale_in": (hidden, ()), "erf": (hidden,), "add_one": (hidden, ()), "mul": (hidden, hidden),
            "half": (hidden, ())}


def model_strategies(depth: int, dp: int, mp: int, head: str) -> dict[str, dict[str, tuple]]:
    """Every cell path of the ViT that gets strategies -> {primitive attribute: strategy}."""
    plan = {
        "patch_embed.proj": dense_strategies("data", dp, mp),
        "norm": {"layer_norm": ((dp, 1, 1), (1,), (1,))},
        "head": dense_strategies("column" if head == "model" else "data", dp, mp),
    }
    for n in range(depth):
        plan.update({f"blocks.{n}.{path}": prims for path, prims in block_strategies(dp, mp).items()})
    return plan


def apply_strategies(net, dp: int, mp: int, head: str = "data"):
    """Sets the (dp, mp) strategies on a built VisionTransformer in place and returns it. The tanh
    GELU (model.gelu_approximate) is nn.GELU, with no primitive of its own to carry one: MindSpore
    gives it the default data-parallel strategy."""
    cells = dict(net.cells_and_names())
    for path, prims in model_strategies(len(net.blocks), dp, mp, head).items():
        if path.endswith("mlp.act") and not isinstance(cells[path], GELU):
            continue
        for attr, strategy in prims.items():
            getattr(cells[path], attr).shard(strategy)
    return net


def reduced_by_mindspore(grads):
    """The train step's gradient reduction under semi_auto: none, MindSpore's parallel compiler inserts
    the all-reduce over the data-parallel ranks (averaged: enable_gradients_mean)."""
    return grads


def parallelize(train_step, cfg: ParallelConfig, dp: int, strategy_path: Path):
    """Wraps the jitted train step in AutoParallel (MindSpore 2.10's documented entry for functional
    training: the outermost function must be wrapped). The input batch is split over dp, the ranks of
    one replica read the same samples; gradients are averaged over dp; the layout is saved for the
    checkpoint merge; optimizer_shard turns on optimizer parallel (hsdp)."""
    from mindspore.parallel.auto_parallel import AutoParallel

    strategy_path.parent.mkdir(parents=True, exist_ok=True)
    parallel = AutoParallel(train_step, parallel_mode="semi_auto")
    parallel.dataset_strategy(((dp, 1, 1, 1), (dp,)))
    parallel.enable_gradients_mean()
    parallel.save_param_strategy_file(str(strategy_path))
    # The checkpoints hold optimizer moments too: their layouts go into the map, for the merge.
    parallel.disable_strategy_file_only_for_trainable_params()
    if cfg.optimizer_shard:
        parallel.hsdp()
    return parallel
