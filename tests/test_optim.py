"""The learning-rate schedule, which parameters get weight decay, layer-wise decay against timm's, and
the two AdamW layouts."""
import math
import re

import pytest

from vit_dist.host.config import load_config
from vit_dist.training.optim import decays, lr_schedule, param_groups
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
    # Without layer decay: these two groups under the names checkpoints have always used.
    assert [p.name for p in flat.exp_avg] == ["adamw.exp_avg.decay", "adamw.exp_avg.no_decay"]
    assert flat.lr_scales == optimizer.lr_scales == (1.0, 1.0)


def timm_name(name: str) -> str:
    """Our parameter's name in timm's VisionTransformer: one fused qkv projection, attn.proj for
    attn.out, LayerNorm weight and bias for gamma and beta."""
    name = re.sub(r"\.attn\.(query|key|value)\.", ".attn.qkv.", name).replace(".attn.out.", ".attn.proj.")
    return re.sub(r"(norm\d?)\.(gamma|beta)$", lambda m: f"{m[1]}.{'weight' if m[2] == 'gamma' else 'bias'}", name)


def test_layer_decay_groups_and_scales_are_timms_for_a_vit_b():
    """Every parameter of our ViT-B gets the lr scale and weight decay timm's param_groups_layer_decay
    gives its counterpart in timm's vit_base_patch16_224 (weight decay exempt as timm's
    no_weight_decay() names), in as many groups. Both models are built without initialising their
    weights: only names and shapes count."""
    import timm
    import torch
    from mindspore.nn.utils import no_init_parameters
    from timm.optim import param_groups_layer_decay

    with torch.device("meta"):
        theirs = timm.create_model("vit_base_patch16_224", pretrained=False)
    names = {id(p): name for name, p in theirs.named_parameters()}
    their_groups = param_groups_layer_decay(theirs, weight_decay=0.05, no_weight_decay_list=theirs.no_weight_decay(),
                                            layer_decay=0.75)
    expected = {names[id(p)]: {(g["lr_scale"], g["weight_decay"])} for g in their_groups for p in g["params"]}
    cfg = load_config(None, ["model.variant=b", "train.weight_decay=0.05", "train.layer_decay=0.75"])
    with no_init_parameters():
        ours = vit_model(cfg, 1000)
    our_groups = param_groups(ours.trainable_params(), cfg.train)
    got: dict[str, set] = {}
    for group in our_groups:
        for p in group.params:  # query, key and value all land on timm's qkv: they must agree
            got.setdefault(timm_name(p.name), set()).add((group.lr_scale, group.weight_decay))
    assert got == expected
    assert len(our_groups) == len(their_groups) == 28  # 14 layers: embeddings, 12 blocks, head; decay or not
    assert {g.name for g in our_groups} >= {"decay.layer0", "no_decay.layer13"}


def test_flat_adamw_makes_the_per_parameter_update():
    """Five real train steps (clipping on, a growing lr, layer-wise decay) from the same start: the flat
    layout, with its bias correction folded into the fused kernel's inputs, lands on the per-parameter
    AdamW's weights. Its first step is checked on its own too: Adam's first step moves a weight by
    lr x scale x g/(|g| + eps) after the decoupled decay, so the largest move is lr x its group's scale.
    Key biases are left out: their true gradient is zero (softmax ignores them), so Adam turns
    rounding noise into lr-sized steps in either layout."""
    import mindspore as ms
    import numpy as np

    from vit_dist.training.optim import build_optimizer
    from vit_dist.parallel.data_parallel import gradient_reducer
    from vit_dist.host.placement import Placement
    from vit_dist.training.loss import train_loss
    from vit_dist.training.step import make_train_step

    cfg = load_config(None, SMALL + ["train.grad_clip_norm=1.0", "train.weight_decay=0.3", "train.layer_decay=0.5"])
    one_device = gradient_reducer(Placement.single())
    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    labels = ms.Tensor(rng.integers(0, 3, 8).astype(np.int32))
    weights = {}
    for flat in (True, False):
        ms.set_seed(0)
        net = vit_model(cfg, 3)
        optimizer = build_optimizer(net, cfg.train, flat=flat)
        step = make_train_step(net, optimizer, train_loss(0.0, False), one_device, cfg.train.grad_clip_norm)
        start = {p.name: p.asnumpy().copy() for p in net.trainable_params()}  # asnumpy() may share memory
        step(images, labels, ms.Tensor(1e-3, ms.float32))
        if flat:
            _first_adam_step_moves_by_the_scaled_lr(param_groups(net.trainable_params(), cfg.train), start, 1e-3)
        for i in range(1, 5):
            step(images, labels, ms.Tensor(1e-3 * (i + 1), ms.float32))
        weights[flat] = {p.name: p.asnumpy() for p in net.trainable_params() if not p.name.endswith("key.bias")}
    start = vit_model(cfg, 3)
    assert any(np.abs(weights[True][p.name] - p.asnumpy()).max() > 1e-3 for p in start.trainable_params()
               if p.name in weights[True])
    for name, expected in weights[False].items():
        np.testing.assert_allclose(weights[True][name], expected, rtol=1e-4, atol=1e-6, err_msg=name)


def _first_adam_step_moves_by_the_scaled_lr(groups, before: dict, lr: float) -> None:
    import numpy as np

    assert len({g.lr_scale for g in groups}) == 3  # the embeddings, the block (with the final norm), the head
    for group in groups:
        for p in group.params:
            if not p.name.endswith("key.bias"):
                decayed = before[p.name] * (1 - lr * group.lr_scale * group.weight_decay)
                assert np.abs(p.asnumpy() - decayed).max() == pytest.approx(lr * group.lr_scale, rel=1e-3), p.name
