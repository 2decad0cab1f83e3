"""Mixed precision and loss scaling on the CPU backend: overflow skipping, scale growth, checkpointed
scaler state, fp16 accuracy against fp32."""
import json

import numpy as np
import pytest

from conftest import last_checkpoint, load_params, msrun, ok, tiny_config, vit_dist, vit_model
from vit_dist.host.config import ConfigError, load_config

PER_STEP = {"train": {"log_interval": 1, "epochs": 1}, "checkpoint": {"every_n_steps": 1, "keep_last": 100}}


def _per_step_config(path, data_root, epochs=1, ema_decay=0.0, **precision):
    return tiny_config(path, data_root, data={"augment": False},
                       train={**PER_STEP["train"], "epochs": epochs, "ema_decay": ema_decay},
                       checkpoint=PER_STEP["checkpoint"],
                       precision={"amp_level": "O2", "dtype": "float16", **precision})


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _state(run, step):
    return load_params(run / "checkpoints" / f"step_{step:08d}.safetensors")


def test_bfloat16_on_cpu_is_refused_at_config_time(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="bfloat16 has no CPU kernels"):
        load_config(None, ["parallel.device_target=CPU", "precision.amp_level=O2", "precision.dtype=bfloat16"])
    load_config(None, ["parallel.device_target=Ascend", "precision.amp_level=O2", "precision.dtype=bfloat16"])
    config = tiny_config(tmp_path / "c.yaml", tiny_data, precision={"amp_level": "O3", "dtype": "bfloat16"})
    result = vit_dist("train", str(config), "--set", f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: precision.dtype bfloat16 has no CPU kernels")


@pytest.mark.parametrize("ranks", [1, 2])
def test_an_overflow_skips_the_step_halves_the_scale_and_is_counted(tiny_data, tmp_path, ranks):
    """With a window of 1 the scale doubles after every finite step until float16 gradients
    overflow (near 2**17 for this model), then oscillates: overflows come after trained steps,
    when the optimizer has state to protect. The weights' EMA (decay 0.5) is the numpy recurrence
    of the saved weights over the trained steps and stays as it was over the skipped ones."""
    config = _per_step_config(tmp_path / "c.yaml", tiny_data, epochs=2, ema_decay=0.5, loss_scale="dynamic",
                              loss_scale_value=2.0 ** 14, loss_scale_window=1)
    run = tmp_path / "run"
    batch = f"train.batch_size={8 // ranks}"
    if ranks == 1:
        ok(vit_dist("train", str(config), "--set", batch, f"train.output_dir={run}"))
    else:
        ok(msrun("--ranks-per-node", "2", str(config), "--set", batch, f"train.output_dir={run}"))
    records = _records(run)
    assert [r["step"] for r in records] == list(range(1, 13))
    late_overflows = [r["step"] for r in records[1:] if r["overflows"] == 1]
    assert late_overflows, records
    assert any(r["overflows"] == 0 for r in records), "some steps must train"
    assert [r["skipped_steps"] for r in records] == list(np.cumsum([r["overflows"] for r in records]))
    # The count is checkpointed, so a resumed run goes on counting from it.
    assert [int(_state(run, r["step"])["skipped_steps"]) for r in records] == [r["skipped_steps"] for r in records]
    for before, after in zip(records, records[1:]):
        expected = before["loss_scale"] / 2 if after["overflows"] else before["loss_scale"] * 2
        assert after["loss_scale"] == expected
    for step in late_overflows:
        old, new = _state(run, step - 1), _state(run, step)
        changed = {k for k in old if not k.startswith("loss_scaler.") and not np.array_equal(old[k], new[k])}
        assert changed <= {"step", "epoch", "skipped_steps"}, f"step {step} overflowed but changed {sorted(changed)[:5]}"
    trained = next(r["step"] for r in records[1:] if r["overflows"] == 0)
    old, new = _state(run, trained - 1), _state(run, trained)
    assert not np.array_equal(old["head.weight"], new["head.weight"])
    assert new["adamw.step"] == old["adamw.step"] + 1
    for record in records[1:]:
        if record["overflows"] == 0:
            _ema_recurrence_holds(_state(run, record["step"] - 1), _state(run, record["step"]), decay=0.5)


def _ema_recurrence_holds(old: dict, new: dict, decay: float) -> None:
    """ema.W after a trained step = decay * ema.W before + (1 - decay) * W after, for every weight W."""
    averaged = [name for name in new if name.startswith("ema.")]
    assert averaged
    for name in averaged:
        expected = decay * old[name].astype(np.float64) + (1 - decay) * new[name.removeprefix("ema.")]
        np.testing.assert_allclose(new[name], expected, rtol=1e-6, atol=1e-9, err_msg=name)


def test_the_dynamic_scale_grows_after_each_window_and_is_checkpointed_and_restored(tiny_data, tmp_path):
    from vit_dist.host.checkpoint_files import Progress
    from vit_dist.training import checkpoint
    from vit_dist.training.optim import build_optimizer
    from vit_dist.training.precision import apply_mixed_precision, build_loss_scaler

    config = _per_step_config(tmp_path / "c.yaml", tiny_data, loss_scale="dynamic", loss_scale_value=1.0,
                              loss_scale_window=3)
    ok(vit_dist("train", str(config), "--set", f"train.output_dir={tmp_path / 'run'}"))
    records = _records(tmp_path / "run")
    assert [r["loss_scale"] for r in records] == [1.0, 1.0, 2.0, 2.0, 2.0, 4.0]
    assert all(r["overflows"] == 0 for r in records)
    # Restored into a fresh net, optimizer and scaler: the scale of step 6, the weights and the moments.
    cfg = load_config(config)
    net = apply_mixed_precision(vit_model(cfg, 3), cfg.precision)
    optimizer, scaler = build_optimizer(net, cfg.train, flat=True), build_loss_scaler(cfg.precision)
    path = last_checkpoint(tmp_path / "run")
    assert checkpoint.restore(path, net, optimizer, scaler) == Progress(step=6, epoch=1, skipped_steps=0)
    saved = load_params(path)
    assert float(scaler.scale_value.asnumpy()) == saved["loss_scaler.scale_value"] == 4.0
    params = {p.name: p for p in net.get_parameters()}
    assert np.array_equal(params["head.weight"].asnumpy(), saved["head.weight"])
    moment = optimizer.exp_avg[0]
    assert np.array_equal(moment.asnumpy(), saved[moment.name])


def test_fixed_scale_without_overflow_matches_unscaled_o2(tiny_data, tmp_path):
    """Six float16 steps with and without a 1024 scale differ only by float16 rounding: at most 0.75%
    (relative norm, attn.query.bias) with BiasAdd layers, 1.08% (norm2.beta) with the Add ones."""
    runs = {}
    for name, precision in [("plain", {"loss_scale": "none"}), ("fixed", {"loss_scale": "fixed",
                                                                          "loss_scale_value": 1024.0})]:
        config = _per_step_config(tmp_path / f"{name}.yaml", tiny_data, **precision)
        ok(vit_dist("train", str(config), "--set", f"train.output_dir={tmp_path / name}"))
        runs[name] = tmp_path / name
    assert all(r["overflows"] == 0 for r in _records(runs["fixed"]))
    plain, fixed = load_params(last_checkpoint(runs["plain"])), load_params(last_checkpoint(runs["fixed"]))
    for name in plain:
        if name.startswith(("adamw.exp_avg", "blocks")) and "attn.key.bias" not in name or name == "head.weight":
            diff = np.linalg.norm(plain[name] - fixed[name]) / max(np.linalg.norm(plain[name]), 1e-12)
            assert diff < 2e-2, (name, diff)
    losses = [[r["loss"] for r in _records(run)] for run in runs.values()]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


@pytest.mark.parametrize("level, norm_and_softmax", [("O2", "fp32"), ("O3", "fp16")])
def test_o2_keeps_layernorm_and_softmax_in_float32_and_o3_casts_everything(level, norm_and_softmax):
    from mindspore import nn

    from vit_dist.models.vit import Linear
    from vit_dist.training.precision import apply_mixed_precision

    cfg = load_config(None, ["model.variant=ti", "model.depth=1", "data.image_size=32", f"precision.amp_level={level}",
                             "parallel.device_target=CPU"])
    net = apply_mixed_precision(vit_model(cfg, 3), cfg.precision)
    cells = [cell for _, cell in net.cells_and_names()]
    kept = [c for c in cells if isinstance(c, (nn.LayerNorm, nn.Softmax))]
    dense = [c for c in cells if isinstance(c, Linear)]
    assert len(kept) == 4 and len(dense) == 8
    assert all(c.get_flags().get(norm_and_softmax) for c in kept)
    assert all(c.get_flags().get("fp16") for c in dense)


def test_float16_o2_training_on_the_demo_data_loses_at_most_three_points_to_float32(tmp_path):
    """The demo recipe, shortened to 1 block and 4 epochs on one device (measured: fp32 78.0%, fp16
    78.0%; with 5 epochs 81.7% and 80.8%, with 3 epochs 76.1% and 75.5%: short runs differ by a few of
    the 355 images, in either direction; what must not happen is float16 losing accuracy)."""
    ok(vit_dist("demo-data", str(tmp_path / "digits")))
    top1 = {}
    for name, precision in [("fp32", ["precision.amp_level=O0"]),
                            ("fp16", ["precision.amp_level=O2", "precision.dtype=float16",
                                      "precision.loss_scale=dynamic"])]:
        run = tmp_path / name
        ok(vit_dist("train", "vit_dist/configs/demo.yaml", "--set", f"data.root={tmp_path / 'digits'}", "model.depth=1",
                    "train.epochs=4", "train.warmup_epochs=0.5", "train.eval_every_epochs=0", "train.log_interval=50",
                    f"train.output_dir={run}", *precision, timeout=900))
        top1[name] = json.loads((run / "eval.json").read_text())["top1"]
    assert top1["fp32"] > 0.75, top1  # the comparison means something only once float32 has learned
    assert top1["fp16"] >= top1["fp32"] - 0.03, top1
