"""Run by tests/test_semi_auto.py under msrun with 2 ranks on the CPU backend (graph mode, the
collectives real): the cross-rank reductions the train step uses, as semi_auto needs them.

1. The clipping norm from slices: the tiny ViT with dp 1 x mp 2 strategies; a full "gradient" per
   Parameter (the same on both ranks), each rank keeping the slice mp gives it (column weights split
   on out, row weights on in, their biases as the bias add's strategy says, the rest whole).
   semi_auto.sliced_global_norm and clip_by_norm run in a jitted function.
2. An overflow on one rank only: the real train step (loss scaler, clipping, the per-parameter AdamW
   and the weights' EMA semi_auto trains with) with semi_auto's gradient reduction (none: MindSpore's
   parallel compiler would insert it), rank 1's batch holding an inf. Then a finite step.
3. Data mode's two optimizer layouts, two steps each on each rank's own batch: the CPU's FlatAdamW
   with its flat all-reduces, and Ascend's and GPU's per-parameter AdamW with DistributedGradReducer.

Writes OUT_DIR/rank_N.npz."""
import sys
from pathlib import Path

import numpy as np

import mindspore as ms
from mindspore import Tensor, amp
from mindspore.communication import get_group_size, get_rank, init

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vit_dist.host.config import load_config  # noqa: E402
from vit_dist.host.placement import Placement  # noqa: E402
from vit_dist.parallel.data_parallel import gradient_reducer  # noqa: E402
from vit_dist.models.spec import ViTSpec  # noqa: E402
from vit_dist.models.vit import Linear, VisionTransformer  # noqa: E402
from vit_dist.parallel import semi_auto  # noqa: E402
from vit_dist.training.ema import WeightEMA  # noqa: E402
from vit_dist.training.optim import build_optimizer  # noqa: E402
from vit_dist.training.loss import train_loss  # noqa: E402
from vit_dist.training.step import make_train_step  # noqa: E402

TINY = ["model.variant=ti", "model.patch_size=4", "data.image_size=16", "model.embed_dim=32", "model.depth=1",
        "model.num_heads=4", "model.mlp_dim=64", "model.drop_path_rate=0", "model.num_classes=8"]


def main(out_dir: Path) -> None:
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(1)
    init()
    rank, world = get_rank(), get_group_size()
    assert world == 2
    cfg = load_config(None, TINY)
    result = {}

    # 1. The norm of gradients sliced as mp = 2 slices them.
    ms.set_seed(0)
    net = VisionTransformer(ViTSpec.of(cfg, 8))
    semi_auto.apply_strategies(net, 1, world, head="model")
    params = net.trainable_params()
    split_axis = {}  # Parameter name -> the axis mp splits (None: whole)
    for _, cell in net.cells_and_names():
        if isinstance(cell, Linear):
            for param, strategy in ((cell.weight, cell.matmul.in_strategy[1]),
                                    (cell.bias, cell.bias_add.in_strategy[1])):
                split_axis[param.name] = strategy.index(world) if world in strategy else None
    rng = np.random.default_rng(0)
    full = [rng.standard_normal(p.shape).astype(np.float32) * (1 + i % 3) for i, p in enumerate(params)]
    local = [np.split(g, world, axis=split_axis[p.name])[rank] if split_axis.get(p.name) is not None else g
             for g, p in zip(full, params)]
    slices = tuple(semi_auto.slices_of(p) for p in params)
    assert sum(n > 1 for n in slices) == sum(axis is not None for axis in split_axis.values()) > 0
    norm_of = semi_auto.sliced_global_norm(slices, world)
    clip = 0.5

    @ms.jit
    def norm_and_clip(grads):
        norm = norm_of(grads)
        return norm, semi_auto.clip_by_norm(grads, clip, norm)

    norm, clipped = norm_and_clip(tuple(Tensor(g) for g in local))
    result["norm"] = norm.asnumpy()
    result["full_norm"] = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in full))
    result["clip_error"] = max(float(np.max(np.abs(c.asnumpy() - g * clip / result["full_norm"])))
                               for c, g in zip(clipped, local))
    result["sliced"] = np.array(sum(n > 1 for n in slices))
    result["local_norm"] = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in local))

    # 2. An overflow on rank 1 only, in the train step.
    ms.set_seed(7)
    net = VisionTransformer(ViTSpec.of(cfg, 8))
    optimizer = build_optimizer(net, cfg.train, flat=False)
    scaler = amp.DynamicLossScaler(2.0 ** 10, 2, 1000)
    ema = WeightEMA(net.trainable_params(), 0.9)
    step = make_train_step(net, optimizer, train_loss(0.0, False), semi_auto.reduced_by_mindspore, 1.0, scaler, ema=ema)
    before = np.concatenate([p.asnumpy().ravel() for p in net.trainable_params()])
    images = np.random.default_rng(rank).standard_normal((4, 3, 16, 16)).astype(np.float32)
    labels = Tensor(np.arange(4, dtype=np.int32))
    lr = Tensor(1e-3, ms.float32)
    if rank == 1:
        images[2, 0, 5, 5] = np.inf
    _, finite = step(Tensor(images), labels, lr)
    result["overflow_finite"] = finite.asnumpy()
    result["overflow_scale"] = scaler.scale_value.asnumpy()
    result["overflow_changed"] = np.array(
        not np.array_equal(before, np.concatenate([p.asnumpy().ravel() for p in net.trainable_params()])))
    result["overflow_params"] = np.concatenate([p.asnumpy().ravel() for p in net.trainable_params()])
    result["overflow_ema_changed"] = np.array(
        not np.array_equal(before, np.concatenate([p.asnumpy().ravel() for p in ema.average])))
    images[np.isinf(images)] = 0.0
    _, finite = step(Tensor(images), labels, lr)
    result["next_finite"] = finite.asnumpy()
    after = np.concatenate([p.asnumpy().ravel() for p in net.trainable_params()])
    result["next_changed"] = np.array(not np.array_equal(before, after))
    result["next_ema_error"] = np.abs(np.concatenate([p.asnumpy().ravel() for p in ema.average])
                                      - (0.9 * before.astype(np.float64) + 0.1 * after)).max()

    # 3. Data mode's two layouts, each rank on its own batch: FlatAdamW with one all-reduce per group
    # (the CPU's) and MindSpore's per-parameter AdamW with DistributedGradReducer (Ascend's and GPU's).
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=world)
    placement = Placement(launcher="msrun", rank=rank, world_size=world, local_rank=rank, local_world_size=world)
    # Adam's step ignores the gradients' scale unless eps dominates: eps 1 makes a sum in place of the mean show.
    data_cfg = load_config(None, TINY + ["train.adam_eps=1.0"])
    for flat in (True, False):
        ms.set_seed(11)
        net = VisionTransformer(ViTSpec.of(data_cfg, 8))
        optimizer = build_optimizer(net, data_cfg.train, flat=flat)
        reducer = gradient_reducer(placement, None if flat else optimizer.parameters)
        step = make_train_step(net, optimizer, train_loss(0.0, False), reducer, 0.0)
        result["data_before"] = np.concatenate([p.asnumpy().ravel() for p in net.trainable_params()])
        for _ in range(2):
            step(Tensor(images), labels, lr)
        result["data_flat" if flat else "data_per_parameter"] = np.concatenate(
            [p.asnumpy().ravel() for p in net.trainable_params()])
    np.savez(out_dir / f"rank_{rank}.npz", **result)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
