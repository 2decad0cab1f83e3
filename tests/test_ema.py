"""The weights' EMA in checkpoints (ema.<name> tensors), on resume (restored, or started from the
weights of a checkpoint without one) and behind --ema. The update itself is checked against numpy in
the real compiled step (test_precision.py, overflow steps included) and resumed exactly
(test_resume.py, with eval --ema)."""
import numpy as np
import pytest

from conftest import load_params, tiny_config, vit_model
from vit_dist.host.config import load_config

TINY = ["model.variant=ti", "model.patch_size=4", "data.image_size=16", "model.embed_dim=32", "model.depth=1",
        "model.num_heads=2", "train.ema_decay=0.9"]


def _training(seed: int, ema: bool = True):
    """A tiny model's training state as build_training makes it, without a compiled step."""
    import mindspore as ms

    from vit_dist.host.placement import ParallelDims
    from vit_dist.training.assemble import Training
    from vit_dist.training.ema import WeightEMA
    from vit_dist.training.optim import build_optimizer

    cfg = load_config(None, TINY)
    ms.set_seed(seed)
    net = vit_model(cfg, 3)
    average = WeightEMA(net.trainable_params(), cfg.train.ema_decay) if ema else None
    return Training(net, build_optimizer(net, cfg.train, flat=True), None, None, None,
                    ParallelDims.split(1, 1, 8, 1, False), average)


def _values(params) -> dict:
    return {p.name: p.asnumpy().copy() for p in params}


def _checkpointer(run, run_dir, card=None):
    from vit_dist.host.heartbeat import Heartbeat
    from vit_dist.host.placement import Placement
    from vit_dist.training.components import Checkpointer

    config = load_config(None, TINY)
    return Checkpointer(config.checkpoint, run_dir, run, Placement.single(), 6, "digest", Heartbeat(run_dir, 0, ""),
                        card)


def test_a_checkpoint_holds_the_ema_by_weight_name_and_resume_restores_it(tmp_path):
    from vit_dist.host.checkpoint_files import Progress, holds_ema

    saved_run = _training(seed=1)
    for average in saved_run.ema.average:  # an EMA unlike the weights, so a mix-up shows
        average.set_data(average * 0.5 + 1.0)
    checkpointer = _checkpointer(saved_run, tmp_path)
    checkpointer.save(Progress(step=6, epoch=1))
    saved = load_params(checkpointer.last)
    weights = [p.name for p in saved_run.net.trainable_params()]
    assert {name for name in saved if name.startswith("ema.")} == {f"ema.{name}" for name in weights}
    assert holds_ema(checkpointer.last)
    for name, value in _values(saved_run.ema.average).items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
        assert not np.array_equal(value, saved[name.removeprefix("ema.")]), name

    resumed = _training(seed=2)
    said = []
    assert _checkpointer(resumed, tmp_path).restore("auto", said.append) == Progress(step=6, epoch=1)
    assert said == [f"resumed from {checkpointer.last}: step 6, epoch 1"]
    for name, value in _values(resumed.ema.average).items():
        np.testing.assert_array_equal(value, saved[name], err_msg=name)


def test_fine_tuning_from_a_checkpoint_loads_its_weights_and_passes_over_its_ema(tmp_path):
    from vit_dist.host.checkpoint_files import Progress
    from vit_dist.training.checkpoint import load_pretrained

    trained = _training(seed=1)
    for average in trained.ema.average:
        average.set_data(average * 0.5 + 1.0)
    checkpointer = _checkpointer(trained, tmp_path)
    checkpointer.save(Progress(step=6, epoch=1))
    fresh = _training(seed=2, ema=False)
    said = []
    load_pretrained(fresh.net, checkpointer.last, said.append)
    expected = _values(trained.net.trainable_params())
    for name, value in _values(fresh.net.trainable_params()).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert len(said) == 1 and "ema." not in said[0], said


def test_a_checkpoint_without_ema_resumes_with_one_started_from_its_weights_and_says_so_once(tmp_path):
    from vit_dist.host.checkpoint_files import Progress, holds_ema

    plain = _checkpointer(_training(seed=1, ema=False), tmp_path)
    plain.save(Progress(step=6, epoch=1))
    assert not holds_ema(plain.last)
    resumed = _training(seed=2)
    said = []
    _checkpointer(resumed, tmp_path).restore(str(plain.last), said.append)
    assert said[1:] == [f"{plain.last} holds no EMA (it was written with train.ema_decay 0): the EMA starts from "
                        "its weights"]
    saved = load_params(plain.last)
    for average in resumed.ema.average:
        np.testing.assert_array_equal(average.asnumpy(), saved[average.name.removeprefix("ema.")])


def test_keep_best_takes_the_higher_of_the_model_and_its_ema_and_keeps_those_weights_alone(tmp_path):
    """The best checkpoint is the higher scorer's, and RUN_DIR/weights/best.safetensors holds exactly
    the weights that scored it (the EMA's under the weights' names, or the model's), saying which;
    weights/last.safetensors holds the model's of the last save."""
    from vit_dist.host.checkpoint_files import Progress, best_checkpoint, read_manifest
    from vit_dist.host.weights_only import WeightsCard, read_card, weights_path

    run = _training(seed=1)
    for average in run.ema.average:  # an EMA unlike the weights, so a mix-up shows
        average.set_data(average * 0.5 + 1.0)
    model, ema = _values(run.net.trainable_params()), {p.name[len("ema."):]: p.asnumpy() for p in run.ema.average}
    checkpointer = _checkpointer(run, tmp_path, WeightsCard.of(load_config(None, TINY), 3))
    evaluations = [{"top1": 0.5, "ema_top1": 0.6}, {"top1": 0.55, "ema_top1": 0.5}, {"top1": 0.7, "ema_top1": 0.7}]
    kept = []
    for step, evaluation in enumerate(evaluations, 1):
        checkpointer.save(Progress(step=step, epoch=step))
        checkpointer.at_epoch_end(Progress(step=step, epoch=step), evaluation)
        path, score = best_checkpoint(tmp_path)
        best = weights_path(tmp_path, "best")
        values = load_params(best)
        card = read_card(best)
        assert values.keys() == model.keys()
        assert all(np.array_equal(values[n], (ema if card.weights == "ema" else model)[n]) for n in model)
        kept.append((path.name, score, read_manifest(path)["best_weights"], card.weights, card.step))
    assert kept == [("best_step_00000001.safetensors", 0.6, "ema", "ema", 1),
                    ("best_step_00000001.safetensors", 0.6, "ema", "ema", 1),
                    ("best_step_00000003.safetensors", 0.7, "model", "model", 3)]
    assert checkpointer.summary(None)["best_weights"] == "model"
    last = load_params(weights_path(tmp_path, "last"))
    assert all(np.array_equal(last[n], model[n]) for n in model)
    assert (read_card(weights_path(tmp_path, "last")).weights, read_card(weights_path(tmp_path, "last")).step) == \
           ("model", 3)

    # export-weights of the run directory: its weights/best (the model's now), or with --ema the EMA
    # of its best full checkpoint (which needs the run's config.yaml), the head as transformers' classifier.
    from vit_dist.cli import main
    from vit_dist.host.config import dump_yaml

    (tmp_path / "config.yaml").write_text(dump_yaml(load_config(None, TINY)))
    for flags, want in (([], model), (["--ema"], ema)):
        out = tmp_path / f"hf{len(flags)}"
        assert main(["export-weights", str(tmp_path), "--to", "hf", "--out", str(out), *flags]) == 0
        exported = load_params(out / "model.safetensors")
        assert np.array_equal(exported["classifier.weight"], want["head.weight"])
        assert np.array_equal(exported["vit.encoder.layer.0.attention.attention.key.bias"],
                              want["blocks.0.attn.key.bias"])


@pytest.mark.parametrize("command", ["eval", "infer", "export"])
def test_ema_on_a_checkpoint_without_one_is_one_line_before_anything_starts(tiny_data, tmp_path, capsys, command):
    from vit_dist import cli
    from vit_dist.host.checkpoint_files import Progress

    plain = _checkpointer(_training(seed=1, ema=False), tmp_path / "run")
    plain.save(Progress(step=6, epoch=1))
    config = tiny_config(tmp_path / "c.yaml", tiny_data)
    image = next((tiny_data / "val").rglob("*.png"))
    extra = ["--images", str(image)] if command == "infer" else []
    assert cli.main([command, str(config), "--ckpt", str(plain.last), "--ema", *extra]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {plain.last} holds no EMA weights (ema.* tensors: written "
                                       "with train.ema_decay 0); leave out --ema\n")
