"""The ViT's size, shapes and FLOPs, and `vit-dist info`."""
import json

import numpy as np
import pytest

from conftest import ROOT, ok, vit_dist
from vit_dist.config import load_config
from vit_dist.models import build_model, vit_spec
from vit_dist.models.vit import count_parameters, forward_flops


def test_vit_b16_has_the_reference_parameter_count():
    result = json.loads(ok(vit_dist("info", str(ROOT / "configs" / "vit_b16_imagenet.yaml"), "--json")).stdout)
    assert result["params"] == 86_567_656
    # 17.56 GMACs per image, the figure the ViT and timm papers give for ViT-B/16 at 224 px.
    assert result["forward_gflops"] == pytest.approx(35.13, abs=0.01)


@pytest.mark.parametrize("variant, patch, size", [("ti", 16, 64), ("s", 32, 64), ("ti", 32, 96)])
def test_variants_and_patch_sizes_give_logits(variant, patch, size):
    import mindspore as ms

    cfg = load_config(None, [f"model.variant={variant}", f"model.patch_size={patch}", f"data.image_size={size}",
                             "model.depth=1"])
    net = build_model(cfg, 7)
    net.set_train(False)
    logits = net(ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)))
    assert logits.shape == (2, 7)
    embed = cfg.model.embed_dim
    tokens = (size // patch) ** 2 + 1
    assert net.pos_embed.shape == (1, tokens, embed)


def test_flops_formula_matches_the_benchmark_configs():
    # Config B of ../shared/bench: 32 px, patch 4, dim 192, depth 6: 2*64*48*192 + 6*(24*65*192^2 + 4*65^2*192) + 2*192*10
    cfg = load_config(None, ["model.variant=ti", "model.patch_size=4", "data.image_size=32", "model.depth=6"])
    assert forward_flops(vit_spec(cfg, 10)) == 2 * 64 * 48 * 192 + 6 * (24 * 65 * 192 ** 2 + 4 * 65 ** 2 * 192) + 3840


def test_parameter_count_matches_the_closed_form():
    cfg = load_config(None, ["model.variant=ti", "model.patch_size=8", "data.image_size=32", "model.depth=3"])
    d, n, classes = 192, 16, 5
    expected = (8 * 8 * 3 * d + d) + d + (n + 1) * d + 3 * (4 * (d * d + d) + 2 * d * 4 * d + 4 * d + d + 4 * d) \
        + 2 * d + d * classes + classes
    assert count_parameters(build_model(cfg, classes)) == expected


def test_drop_path_drops_whole_samples_in_training_only():
    import mindspore as ms

    from vit_dist.models.vit import DropPath

    drop = DropPath(0.5)
    x = ms.Tensor(np.ones((64, 3, 4), np.float32))
    drop.set_train(True)
    out = drop(x).asnumpy()
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}  # survivors scaled by 1/keep
    assert (per_sample == per_sample[:, :1]).all() and 0 < (per_sample[:, 0] == 0).sum() < 64
    drop.set_train(False)
    assert (drop(x).asnumpy() == 1.0).all()
