"""The fused CPU kernels (vit_dist/backends/cpu/kernels.cc as MindSpore AOT custom ops) against MindSpore's own
LayerNorm and GELU: same outputs and gradients, the same training, and a clear fallback."""
import time

import numpy as np
import pytest

from conftest import vit_model, worst_relative_difference
from vit_dist.host.config import load_config
from vit_dist.host.errors import ConfigError


TINY = ["model.variant=ti", "model.patch_size=8", "data.image_size=32", "model.depth=2", "model.drop_path_rate=0",
        "parallel.device_target=CPU"]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Built afresh (not from the per-user cache), so the compile itself is tested."""
    from vit_dist.backends.cpu.kernels import build_library

    path = build_library(cache_dir=tmp_path_factory.mktemp("kernels"))
    assert path is not None, "g++ is needed to build vit_dist/backends/cpu/kernels.cc"
    return path


def values_and_grads(net, x, w):
    """Loss sum(net(x) * w) and its gradients wrt x and the net's parameters, in graph mode."""
    import mindspore as ms

    def loss(x):
        return (net(x) * w).sum()

    value, (dx, dparams) = ms.jit(ms.value_and_grad(loss, 0, net.trainable_params()))(x)
    return [value.asnumpy(), dx.asnumpy()] + [g.asnumpy() for g in dparams]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dim,heads,tokens", [(96, 2, 33), (72, 3, 17)])  # head widths 48 and 24 (not whole vectors)
def test_a_fused_block_matches_mindspores_ops_forward_and_backward(library, threads, dim, heads, tokens):
    """An encoder block (LayerNorms, attention with q/k/v biases, the MLP with exact GELU) through the
    fused ops gives MindSpore's outputs and gradients."""
    import mindspore as ms

    from vit_dist.backends.cpu.kernels import FusedAttention, FusedLayerNorm, FusedMlp, custom_ops, fused_layers
    from vit_dist.models.spec import ViTSpec
    from vit_dist.models.vit import Block, ViTLayers

    spec = ViTSpec(image_size=32, patch_size=8, embed_dim=dim, depth=1, num_heads=heads, mlp_dim=4 * dim,
                   num_classes=4)
    rng = np.random.default_rng(0)
    x = ms.Tensor(rng.normal(1.0, 3.0, (4, tokens, dim)).astype(np.float32))
    w = ms.Tensor(rng.standard_normal((4, tokens, dim)).astype(np.float32))
    # Biases and norm parameters away from their zero/one initialisation, so each gradient is exercised.
    values = {}
    results, names_by_run = [], []
    for fused in (False, True):
        ms.set_seed(0)
        net = Block(spec, 0.0, fused_layers(custom_ops(library, threads)) if fused else ViTLayers())
        for p in net.trainable_params():
            values.setdefault(p.name, (p.asnumpy() + rng.normal(0.0, 0.5, p.shape)).astype(np.float32))
            p.set_data(ms.Tensor(values[p.name]))
        names = [p.name for p in net.trainable_params()]
        names_by_run.append(names)
        assert isinstance(net.norm1, FusedLayerNorm) is isinstance(net.norm2, FusedLayerNorm) is fused
        assert isinstance(net.attn, FusedAttention) is isinstance(net.mlp, FusedMlp) is fused
        results.append(dict(zip(["loss", "x"] + names, values_and_grads(net, x, w))))
    native, fused = results
    assert names_by_run[0] == names_by_run[1]  # the seam's layers keep the stock layers' Parameters
    # Softmax cancels the key bias (it adds one constant to each query's scores): its gradient is zero
    # but for float rounding, in both.
    key_bias = "attn.key.bias"
    for grads in results:
        assert np.abs(grads[key_bias]).max() < 1e-5 * np.abs(grads["attn.query.bias"]).max() * tokens
    for name in native.keys() - {key_bias}:
        np.testing.assert_allclose(fused[name], native[name], rtol=1e-4, atol=1e-4 * np.abs(native[name]).max(),
                                   err_msg=name)


def test_a_fused_train_step_trains_as_mindspores_ops_do(library):
    """Six steps of the real train step (AdamW, clipping) on the ViT: the same losses and weights."""
    import mindspore as ms

    from vit_dist.host.placement import Placement
    from vit_dist.training.assemble import build_training

    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    labels = ms.Tensor(rng.integers(0, 4, 8).astype(np.int32))
    runs = []
    for fused in (False, True):
        cfg = load_config(None, TINY + [f"parallel.fused_cpu_kernels={str(fused).lower()}"])
        run = build_training(cfg, 4, Placement.single(), print)
        assert run.backend.fused is fused
        losses = [float(run.step(images, labels, ms.Tensor(5e-4, ms.float32))[0].asnumpy()) for _ in range(6)]
        runs.append((losses, {p.name: p.asnumpy() for p in run.net.trainable_params()}))
    (native_losses, native), (fused_losses, fused) = runs
    assert native_losses[-1] < native_losses[0] - 0.1
    assert fused_losses == pytest.approx(native_losses, rel=1e-4)
    # Adam turns float32 rounding in a near-zero gradient into an lr-sized step, so whole tensors compare.
    worst = worst_relative_difference(fused, native)
    assert worst[0] < 1e-4, worst


def test_a_paced_train_step_returns_once_it_has_run_and_a_silent_one_does_not_hang(library):
    """With a StepSignal each call returns after the step's last op ran (the host then sleeps instead of
    spinning), with the same losses; a step that never signals returns after the timeout."""
    import ctypes

    import mindspore as ms

    from vit_dist.backends.cpu.kernels import StepSignal
    from vit_dist.training.optim import build_optimizer
    from vit_dist.parallel.data_parallel import gradient_reducer
    from vit_dist.host.placement import Placement
    from vit_dist.training.loss import train_loss
    from vit_dist.training.step import make_train_step

    steps_done = ctypes.CDLL(str(library)).vit_dist_steps_done
    steps_done.restype = ctypes.c_uint64
    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    labels = ms.Tensor(rng.integers(0, 4, 8).astype(np.int32))
    losses = []
    for signal in (None, StepSignal(library)):
        cfg = load_config(None, TINY)
        ms.set_seed(0)
        net = vit_model(cfg, 4)
        step = make_train_step(net, build_optimizer(net, cfg.train, flat=True), train_loss(0.1, False),
                               gradient_reducer(Placement.single()), cfg.train.grad_clip_norm,
                               signal=signal)
        run = []
        for _ in range(3):
            before = steps_done()
            loss, _ = step(images, labels, ms.Tensor(5e-4, ms.float32))
            assert steps_done() == before + (signal is not None)  # read before the loss is fetched
            run.append(float(loss.asnumpy()))
        losses.append(run)
    # MindSpore's kernels split reductions over threads as they come free: equal up to float rounding.
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)

    silent = StepSignal(library, first_timeout_s=0.5).paced(lambda: None)
    started = time.perf_counter()
    silent()
    assert 0.5 <= time.perf_counter() - started < 5


def test_only_float32_cpu_training_is_fused_and_a_missing_compiler_falls_back(tmp_path):
    from vit_dist.backends.backend import backend_for
    from vit_dist.backends.cpu.kernels import build_library
    from vit_dist.host.placement import Placement

    for overrides in (["precision.amp_level=O2"], ["parallel.device_target=Ascend"], ["parallel.fused_cpu_kernels=false"]):
        cfg = load_config(None, TINY + overrides)
        assert backend_for(cfg, Placement.single(), print).fused is False
    assert backend_for(load_config(None, TINY), Placement.single(), print, portable=True).fused is False
    assert build_library(compiler="no-such-compiler", cache_dir=tmp_path / "own") is None
    assert list((tmp_path / "own").iterdir()) == []
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)  # writable by anyone: another user could swap the library
    with pytest.raises(ConfigError, match=r"the fused CPU kernels' cache folder .* is not yours alone.*fused_cpu_kernels=false"):
        build_library(cache_dir=shared)
    assert list(shared.iterdir()) == []


def test_recompute_trains_as_without_it_with_stochastic_depth(library):
    """train.recompute recomputes each block's norms, attention and MLP (the fused kernels' custom ops
    included) in the backward pass of the step compiled as training compiles it (graph mode): the same
    losses and weights, stochastic depth on (recomputing whole blocks drew other masks)."""
    import mindspore as ms

    from vit_dist.host.placement import Placement
    from vit_dist.training.assemble import build_training

    rng = np.random.default_rng(0)
    images = ms.Tensor(rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    labels = ms.Tensor(rng.integers(0, 4, 8).astype(np.int32))
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    runs = []
    try:
        for recompute in (False, True):
            cfg = load_config(None, TINY + ["model.drop_path_rate=0.3", "parallel.threads_per_rank=1",
                                            f"train.recompute={str(recompute).lower()}"])
            run = build_training(cfg, 4, Placement.single(), print)
            assert run.backend.fused
            # MindSpore marks the Cells it recomputes by their scope: the four layers of each block, not its drop path.
            assert [[layer._scope == "recompute_" for layer in (b.norm1, b.attn, b.norm2, b.mlp, b.drop_path)]
                    for b in run.net.blocks] == [[recompute] * 4 + [False]] * 2
            losses = [float(run.step(images, labels, ms.Tensor(5e-4, ms.float32))[0].asnumpy()) for _ in range(3)]
            runs.append((losses, {p.name: p.asnumpy() for p in run.net.trainable_params()}))
    finally:
        ms.set_context(mode=mode)
    (plain_losses, plain), (recomputed_losses, recomputed) = runs
    assert recomputed_losses == pytest.approx(plain_losses, rel=1e-6)
    worst = worst_relative_difference(recomputed, plain)
    assert worst[0] < 1e-6, worst
