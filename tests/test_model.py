"""The ViT's size, shapes and FLOPs, and `vit-dist info`."""
import json

import numpy as np
import pytest

from conftest import ROOT, ok, vit_dist, vit_model
from vit_dist.host.config import load_config
from vit_dist.models.spec import ViTSpec, forward_flops
from vit_dist.models.vit import count_parameters


def test_vit_b16_has_the_reference_parameter_count():
    b16 = ROOT / "vit_dist" / "configs" / "vit_b16_imagenet.yaml"
    result = json.loads(ok(vit_dist("info", str(b16), "--json")).stdout)
    assert result["params"] == 86_567_656
    # 17.56 GMACs per image, the figure the ViT and timm papers give for ViT-B/16 at 224 px.
    assert result["forward_gflops"] == pytest.approx(35.13, abs=0.01)


@pytest.mark.parametrize("variant, patch, size", [("ti", 16, 64), ("s", 32, 64), ("ti", 32, 96)])
def test_variants_and_patch_sizes_give_logits(variant, patch, size):
    import mindspore as ms

    cfg = load_config(None, [f"model.variant={variant}", f"model.patch_size={patch}", f"data.image_size={size}",
                             "model.depth=1"])
    net = vit_model(cfg, 7)
    net.set_train(False)
    logits = net(ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)))
    assert logits.shape == (2, 7)
    embed = cfg.model.embed_dim
    tokens = (size // patch) ** 2 + 1
    assert net.pos_embed.shape == (1, tokens, embed)


def test_flops_formula_matches_the_benchmark_configs():
    # Config B of benchmarks/: 32 px, patch 4, dim 192, depth 6: 2*64*48*192 + 6*(24*65*192^2 + 4*65^2*192) + 2*192*10
    cfg = load_config(None, ["model.variant=ti", "model.patch_size=4", "data.image_size=32", "model.depth=6"])
    assert forward_flops(ViTSpec.of(cfg, 10)) == 2 * 64 * 48 * 192 + 6 * (24 * 65 * 192 ** 2 + 4 * 65 ** 2 * 192) + 3840


def test_parameter_count_matches_the_closed_form():
    cfg = load_config(None, ["model.variant=ti", "model.patch_size=8", "data.image_size=32", "model.depth=3"])
    d, n, classes = 192, 16, 5
    expected = (8 * 8 * 3 * d + d) + d + (n + 1) * d + 3 * (4 * (d * d + d) + 2 * d * 4 * d + 4 * d + d + 4 * d) \
        + 2 * d + d * classes + classes
    assert count_parameters(vit_model(cfg, classes)) == expected


@pytest.mark.parametrize("kind", ["stock", "counted"])
def test_drop_path_drops_whole_samples_in_training_only(kind):
    """The stock DropPath (Ascend, GPU) and the CPU backend's, whose draws are counted (and so resume)."""
    import mindspore as ms

    from vit_dist.backends.cpu.random import CountedDrop
    from vit_dist.models.vit import DropPath

    drop = DropPath(0.5) if kind == "stock" else CountedDrop(0.5, seed=3, per_sample=True)
    x = ms.Tensor(np.ones((64, 3, 4), np.float32))
    drop.set_train(True)
    out = drop(x).asnumpy()
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}  # survivors scaled by 1/keep
    assert (per_sample == per_sample[:, :1]).all() and 0 < (per_sample[:, 0] == 0).sum() < 64
    assert not np.array_equal(drop(x).asnumpy(), out)  # the next draw differs
    if kind == "counted":  # draw 0 again from the restored count: the same mask
        drop.draws.set_data(ms.Tensor(0, ms.int64))
        np.testing.assert_array_equal(drop(x).asnumpy(), out)
    drop.set_train(False)
    assert (drop(x).asnumpy() == 1.0).all()


def test_counted_dropout_drops_elements_at_its_rate_and_draws_again_from_a_restored_count():
    """The CPU backend's dropout: independent elements, survivors scaled by 1/keep like nn.Dropout's."""
    import mindspore as ms

    from vit_dist.backends.cpu.random import counted_layers

    dropout, _ = counted_layers(seed=0, rank=0)
    drop = dropout(0.25)
    x = ms.Tensor(np.ones((16, 50, 40), np.float32))
    drop.set_train(True)
    out = drop(x).asnumpy()
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
    assert abs((out == 0).mean() - 0.25) < 0.01  # 32000 draws: 5 standard deviations is 0.012
    assert not (out == out[:, :1, :1]).all()  # not per sample
    assert not np.array_equal(drop(x).asnumpy(), out)
    drop.draws.set_data(ms.Tensor(0, ms.int64))
    np.testing.assert_array_equal(drop(x).asnumpy(), out)
    other = dropout(0.25)
    other.set_train(True)
    assert not np.array_equal(other(x).asnumpy(), out)  # the next layer has a seed of its own
    assert type(dropout(0.0)).__name__ == "Dropout"  # no draw count where nothing is drawn


def straightforward_logits(net, images):
    """The ViT as first written: Conv2D patch embedding, nn.Dense-style BiasAdd layers, exact GELU
    with its division, MindSpore's functional ops in PyNative, on the network's own weights."""
    import math

    from mindspore import ops

    p = {param.name: param for param in net.get_parameters()}

    def dense(x, name):  # as nn.Dense: rows of the flattened input
        rows = ops.bias_add(ops.matmul(x.reshape(-1, x.shape[-1]), p[name + ".weight"].T), p[name + ".bias"])
        return rows.reshape(x.shape[:-1] + (-1,))

    def norm(x, name):
        return ops.LayerNorm(-1, -1, net.spec.layer_norm_eps)(x, p[name + ".gamma"], p[name + ".beta"])[0]

    patch = net.spec.patch_size
    x = ops.bias_add(ops.conv2d(images, p["patch_embed.proj.weight"], stride=patch), p["patch_embed.proj.bias"])
    b, d = x.shape[:2]
    x = x.reshape(b, d, -1).transpose(0, 2, 1)
    x = ops.concat((ops.broadcast_to(p["cls_token"], (b, -1, -1)), x), 1) + p["pos_embed"]
    heads = net.spec.num_heads
    for i in range(net.spec.depth):
        prefix = f"blocks.{i}"
        h = norm(x, prefix + ".norm1")
        q, k, v = (dense(h, f"{prefix}.attn.{n}").reshape(b, -1, heads, d // heads).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        weights = ops.softmax(ops.matmul(q, k.transpose(0, 1, 3, 2)) / math.sqrt(d // heads), axis=-1)
        x = x + dense(ops.matmul(weights, v).transpose(0, 2, 1, 3).reshape(b, -1, d), prefix + ".attn.out")
        h = dense(norm(x, prefix + ".norm2"), prefix + ".mlp.fc1")
        x = x + dense(h * 0.5 * (1 + ops.erf(h / math.sqrt(2))), prefix + ".mlp.fc2")
    return dense(norm(x, "norm")[:, 0], "head").asnumpy()


@pytest.mark.parametrize("fused", [False, True])
def test_logits_equal_the_straightforward_computation_within_1e_5(fused):
    """The speed-ups (patch embedding as one matmul, bias by Add, GELU by multiplication, and on the CPU
    backend the fused LayerNorm, bias+GELU and attention kernels) keep the mathematics: same weights,
    same logits. Weights drawn wide so the logits are O(1)."""
    import mindspore as ms

    from vit_dist.host.placement import Placement
    from vit_dist.training.assemble import build_model

    cfg = load_config(None, ["model.variant=ti", "model.patch_size=8", "data.image_size=32", "model.depth=2",
                             "parallel.device_target=CPU", f"parallel.fused_cpu_kernels={str(fused).lower()}"])
    net, backend = build_model(cfg, 10, Placement.single(), print)
    assert backend.fused is fused
    rng = np.random.default_rng(0)
    for param in net.get_parameters():
        param.set_data(ms.Tensor(rng.normal(0, 0.25, param.shape).astype(np.float32)))
    net.set_train(False)
    images = ms.Tensor(rng.standard_normal((4, 3, 32, 32)).astype(np.float32))
    want = straightforward_logits(net, images)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(net(images).asnumpy(), want, rtol=0, atol=1e-5)
