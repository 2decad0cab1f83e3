"""The learning-rate schedule and which parameters get weight decay."""
import math

import pytest

from vit_dist.config import load_config
from vit_dist.optim import decays, lr_schedule


def test_warmup_then_cosine_per_step():
    cfg = load_config(None, ["train.epochs=10", "train.warmup_epochs=2", "train.lr=1e-3", "train.min_lr=1e-5"]).train
    rates = lr_schedule(cfg, steps_per_epoch=5)
    assert len(rates) == 50
    assert rates[:10] == pytest.approx([1e-3 * (i + 1) / 10 for i in range(10)])
    assert rates[10] == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 39 / 40)))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_no_warmup_starts_at_peak():
    cfg = load_config(None, ["train.epochs=1", "train.warmup_epochs=0"]).train
    assert lr_schedule(cfg, steps_per_epoch=4)[0] == pytest.approx(cfg.lr)


@pytest.mark.parametrize("name, ndim, expected", [
    ("blocks.0.attn.query.weight", 2, True), ("patch_embed.proj.weight", 4, True), ("head.weight", 2, True),
    ("blocks.0.attn.query.bias", 1, False), ("blocks.3.norm1.gamma", 1, False), ("norm.beta", 1, False),
    ("pos_embed", 3, False), ("cls_token", 3, False),
])
def test_weight_decay_skips_biases_norms_position_embedding_and_class_token(name, ndim, expected):
    assert decays(name, ndim) is expected


def test_the_built_model_splits_as_intended():
    from vit_dist.models import build_model
    from vit_dist.optim import build_optimizer

    cfg = load_config(None, ["model.variant=ti", "model.depth=1", "data.image_size=32", "model.patch_size=16"])
    optimizer = build_optimizer(build_model(cfg, 3), cfg.train)
    decayed, plain = ({p.name for p in group["params"]} for group in optimizer.param_groups)
    assert decayed == {"patch_embed.proj.weight", "blocks.0.attn.query.weight", "blocks.0.attn.key.weight",
                       "blocks.0.attn.value.weight", "blocks.0.attn.out.weight", "blocks.0.mlp.fc1.weight",
                       "blocks.0.mlp.fc2.weight", "head.weight"}
    assert {"pos_embed", "cls_token", "head.bias", "norm.gamma"} <= plain
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.train.weight_decay, 0.0]
