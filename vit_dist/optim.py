"""AdamW with decoupled weight decay and a per-step warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

from mindspore import ops

from vit_dist.config import TrainConfig

# Parameters that are not weight matrices: decaying them only hurts (ViT/DeiT recipe).
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """Learning rate of every step: linear warm-up to cfg.lr, then cosine down to cfg.min_lr."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    rates = []
    for step in range(total):
        if step < warmup:
            rates.append(cfg.lr * (step + 1) / warmup)
        else:
            progress = (step - warmup) / max(total - warmup, 1)
            rates.append(cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress)))
    return rates


def decays(name: str, ndim: int) -> bool:
    """Biases, norm scales and shifts, the position embedding and class token get no weight decay."""
    return ndim > 1 and name.split(".")[-1] not in NO_DECAY_NAMES


def build_optimizer(net, cfg: TrainConfig):
    """AdamW as in PyTorch (bias-corrected moments, decoupled decay). nn.AdamWeightDecay omits the
    bias correction, which makes its first hundreds of steps several times larger than the lr."""
    from mindspore.experimental.optim import AdamW

    params = net.trainable_params()
    groups = [
        {"params": [p for p in params if decays(p.name, p.ndim)], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if not decays(p.name, p.ndim)], "weight_decay": 0.0},
    ]
    return AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def set_learning_rate(optimizer, lr) -> None:
    """Points every parameter group at this step's rate; called inside the jitted step, so the
    schedule is a step input rather than optimizer state."""
    for group_lr in optimizer.lrs:
        ops.assign(group_lr, lr)
