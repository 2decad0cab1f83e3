"""The learning-rate schedule, which parameters get weight decay, and the two AdamW layouts."""
import math

import pytest

from vit_dist.host.config import load_config
from vit_dist.training.optim import decays, lr_schedule
from conftest import vit_model


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


SMALL = ["model.variant=ti", "model.depth=1", "data.image_size=32", "model.patch_size=16"]
DECAYED = {"patch_embed.proj.weight", "blocks.0.attn.query.weight", "blocks.0.attn.key.weight",
           "blocks.0.attn.value.weight", "blocks.0.attn.out.weight", "blocks.0.mlp.fc1.weight",
           "blocks.0.mlp.fc2.weight", "head.weight"}


def test_the_built_model_splits_as_intended():
    from vit_dist.training.optim import build_optimizer

    cfg = load_config(None, SMALL)
    optimizer = build_optimizer(vit_model(cfg, 3), cfg.train, flat=False)
    decayed, plain = ({p.name for p in group["params"]} for group in optimizer.param_groups)
    assert decayed == DECAYED
    assert {"pos_embed", "cls_token", "head.bias", "norm.gamma"} <= plain
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.train.weight_decay, 0.0]
    flat = build_optimizer(vit_model(cfg, 3), cfg.train, flat=True)
    assert {p.name for p in flat.group_params[0]} == DECAYED
    assert [p.shape for p in flat.exp_avg] == [(sum(p.size for p in g),) for g in flat.group_params]


def test_flat_adamw_makes_the_per_parameter_update():
    """Five real train steps (clipping on, a growing lr) from the same start: the flat layout, with its
    bias correction folded into the fused kernel's inputs, lands on the per-parameter AdamW's weights.
    Key biases are left out: their true gradient is zero (softmax ignores them), so Adam turns
    rounding noise into lr-sized steps in either layout."""
    import mindspore as ms
    import numpy as np

    from vit_dist.training.optim import build_optimizer
    from vit_dist.parallel.data_parallel import gradient_reducer
    from vit_dist.host.placement import Placement
    from vit_dist.training.step import make_train_step

    cfg = load_config(None, SMALL + ["train.grad_clip_norm=1.0", "train.weight_decay=0.3"])
    one_device = gradient_reducer(Placement.single())
    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    labels = ms.Tensor(rng.integers(0, 3, 8).astype(np.int32))
    weights = {}
    for flat in (True, False):
        ms.set_seed(0)
        net = vit_model(cfg, 3)
        optimizer = build_optimizer(net, cfg.train, flat=flat)
        step = make_train_step(net, optimizer, one_device, 0.0, cfg.train.grad_clip_norm)
        for i in range(5):
            step(images, labels, ms.Tensor(1e-3 * (i + 1), ms.float32))
        weights[flat] = {p.name: p.asnumpy() for p in net.trainable_params() if not p.name.endswith("key.bias")}
    start = vit_model(cfg, 3)
    assert any(np.abs(weights[True][p.name] - p.asnumpy()).max() > 1e-3 for p in start.trainable_params()
               if p.name in weights[True])
    for name, expected in weights[False].items():
        np.testing.assert_allclose(weights[True][name], expected, rtol=1e-4, atol=1e-6, err_msg=name)
