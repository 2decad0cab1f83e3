"""The one build of a run, used by train, bench, eval, infer, export and the tests: the model (backend
layers through its seam, shard strategies, pretrained weights, precision) and, for training, the
optimizer, loss scaler and compiled step."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mindspore as ms

from vit_dist.backends.backend import Backend, backend_for
from vit_dist.host.checkpoint_files import head_classes
from vit_dist.host.config import Config
from vit_dist.host.placement import ParallelDims, Placement
from vit_dist.models.spec import ViTSpec
from vit_dist.models.vit import VisionTransformer
from vit_dist.parallel import semi_auto
from vit_dist.parallel.data_parallel import gradient_reducer
from vit_dist.training import checkpoint
from vit_dist.training.ema import WeightEMA
from vit_dist.training.loss import train_loss
from vit_dist.training.optim import build_optimizer
from vit_dist.training.precision import apply_mixed_precision, build_loss_scaler
from vit_dist.training.step import make_train_step


@dataclass(frozen=True)
class Training:
    """What the loop (and bench) drives: step(images, labels, lr) -> (loss, finite). ema: the weights'
    WeightEMA, None without train.ema_decay."""
    net: object
    optimizer: object
    scaler: object
    step: Callable
    backend: Backend
    dims: ParallelDims
    ema: Optional[WeightEMA] = None


def build_model(cfg: Config, num_classes: int, placement: Placement, say: Callable[[str], None],
                training: bool = False, portable: bool = False) -> tuple[VisionTransformer, Backend]:
    """The ViT of the config on this backend, cast for precision.amp_level. training: with semi_auto's
    shard strategies and model.pretrained loaded; otherwise the caller loads a checkpoint. portable: MindSpore's
    stock layers only (for export)."""
    backend = backend_for(cfg, placement, say, portable)
    ms.set_seed(cfg.train.seed)  # the same seed on every rank: identical initial parameters
    net = VisionTransformer(ViTSpec.of(cfg, num_classes), backend.layers)
    if training and cfg.parallel.mode == "semi_auto":
        dims = ParallelDims.of(cfg, placement.world_size)
        semi_auto.apply_strategies(net, dims.dp, dims.mp, cfg.parallel.head)
    if training and cfg.model.pretrained:
        checkpoint.load_pretrained(net, cfg.model.pretrained, say)
    if training and cfg.train.recompute:
        recompute_blocks(net)
    net = apply_mixed_precision(net, cfg.precision)
    net.set_train(training)
    return net, backend


def recompute_blocks(net: VisionTransformer) -> None:
    """Each encoder block's norms, attention and MLP recompute their inner activations in the backward
    pass instead of keeping them; their inputs and outputs are kept. The block's drop path stays outside
    the recomputed layers: recomputing whole blocks merged the two draws of a block's drop path into one
    (MindSpore keeps the order of a recomputed cell's Parameter writes only by chance), which trains differently."""
    for block in net.blocks:
        for layer in (block.norm1, block.attn, block.norm2, block.mlp):
            layer.recompute()


def build_training(cfg: Config, num_classes: int, placement: Placement, say: Callable[[str], None],
                   strategy_path: Optional[Path] = None) -> Training:
    """The model, optimizer, loss scaler, weights' EMA and compiled train step of the config. Data mode on
    the CPU: the flat AdamW and one all-reduce of the packed gradients per group and step; on Ascend and GPU
    (Backend.flat_optimizer): per-parameter AdamW and MindSpore's DistributedGradReducer; semi_auto:
    per-parameter AdamW and MindSpore's parallel compiler, with each rank's parameter layout written to
    strategy_path."""
    dims = ParallelDims.of(cfg, placement.world_size)
    net, backend = build_model(cfg, num_classes, placement, say, training=True)
    flat = backend.flat_optimizer and not dims.semi_auto
    optimizer = build_optimizer(net, cfg.train, flat=flat)
    scaler = build_loss_scaler(cfg.precision)
    # After model.pretrained is loaded: fine-tuning averages from the imported weights.
    ema = WeightEMA(net.trainable_params(), cfg.train.ema_decay) if cfg.train.ema_decay else None
    # semi_auto's graph sees the global batch and reduces gradients itself, once per step.
    reduce_gradients = (semi_auto.reduced_by_mindspore if dims.semi_auto else
                        gradient_reducer(placement, None if flat else optimizer.parameters))
    step = make_train_step(net, optimizer, train_loss(cfg.train.label_smoothing, cfg.data.mixes), reduce_gradients,
                           cfg.train.grad_clip_norm, scaler, cfg.precision.min_loss_scale, dims.accumulation,
                           in_graph_accumulation=dims.semi_auto, signal=backend.signal, ema=ema)
    if dims.semi_auto:
        step = semi_auto.parallelize(step, cfg.parallel, dims.dp, strategy_path, cfg.data.mixes)
    return Training(net, optimizer, scaler, step, backend, dims, ema)


def model_from_checkpoint(cfg: Config, path: str | Path, placement: Placement, say: Callable[[str], None],
                          num_classes: Optional[int] = None, portable: bool = False,
                          ema: bool = False) -> VisionTransformer:
    """The model for eval, infer and export, built as training builds it, with the checkpoint's weights
    (ema: their EMA); its class count is num_classes, else model.num_classes, else the checkpoint head's."""
    num_classes = num_classes or cfg.model.num_classes or head_classes(path)
    net, _ = build_model(cfg, num_classes, placement, say, portable=portable)
    checkpoint.load_weights(net, path, ema)
    return net
