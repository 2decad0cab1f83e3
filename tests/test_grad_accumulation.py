"""Gradient accumulation in the real jitted train step: k micro-batches of b make the update of one
batch of k*b (no dropout), checked on parameters and AdamW moments with clipping off, since Adam's
normalised step and clipping would hide a wrongly scaled gradient."""
import numpy as np
import pytest

from conftest import vit_model, worst_relative_difference
from vit_dist.host.config import ConfigError, load_config

TINY = ["model.variant=ti", "model.patch_size=4", "data.image_size=16", "model.embed_dim=32", "model.depth=1",
        "model.num_heads=2", "model.drop_path_rate=0", "train.grad_clip_norm=0", "train.label_smoothing=0.1"]


def trained_state(accumulation: int, scaled: bool, images, labels, steps: int = 2, soft_targets: bool = False,
                  in_graph: bool = False) -> dict:
    import mindspore as ms

    from vit_dist.training.optim import build_optimizer
    from vit_dist.training.precision import build_loss_scaler
    from vit_dist.parallel.data_parallel import gradient_reducer
    from vit_dist.host.placement import Placement
    from vit_dist.training.loss import train_loss
    from vit_dist.training.step import make_train_step

    cfg = load_config(None, TINY + (["precision.loss_scale=fixed", "precision.loss_scale_value=1024"] if scaled else []))
    ms.set_seed(3)
    net = vit_model(cfg, 5)
    optimizer = build_optimizer(net, cfg.train, flat=True)
    one_device = gradient_reducer(Placement.single())
    step = make_train_step(net, optimizer, train_loss(cfg.train.label_smoothing, soft_targets), one_device,
                           cfg.train.grad_clip_norm, build_loss_scaler(cfg.precision), accumulation=accumulation,
                           in_graph_accumulation=in_graph)
    losses = [float(step(ms.Tensor(images), ms.Tensor(labels), ms.Tensor(1e-3, ms.float32))[0].asnumpy())
              for _ in range(steps)]
    state = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    state.update({name: p.asnumpy().copy() for name, p in optimizer.checkpoint_state().items()})
    return {"losses": losses, "state": state}


def test_two_micro_batches_make_the_update_of_one_double_batch():
    """With a (fixed) loss scale, so the scaled path's loss/gradient plumbing is covered too."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 16).astype(np.int32)
    whole = trained_state(1, True, images, labels)
    micro = trained_state(2, True, images, labels)
    assert micro["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert any(k.startswith("adamw.exp_avg") for k in whole["state"])
    worst = worst_relative_difference(micro["state"], whole["state"])
    assert worst[0] < 1e-5, worst


def test_mindspores_accumulation_cell_makes_the_same_update():
    """semi_auto accumulates through MindSpore's GradAccumulation cell (one gradient all-reduce per step
    there). Its parallel pass needs Ascend; the cell itself runs here, in the same jitted step: its
    micro-batch losses, shares of the mean and loss scaling make the update of one batch of k*b."""
    rng = np.random.default_rng(1)
    images = rng.standard_normal((12, 3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 5, 12).astype(np.int32)
    whole = trained_state(1, True, images, labels)
    cell = trained_state(3, True, images, labels, in_graph=True)
    assert cell["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    worst = worst_relative_difference(cell["state"], whole["state"])
    assert worst[0] < 1e-5, worst


def test_each_step_reads_k_micro_batches_per_replica(tiny_data):
    """48 images, 2 ranks x mp 1, batch 4 x k 3: 12 images per rank and step, 2 steps per epoch; a
    shard smaller than batch x k is one line before anything compiles."""
    from vit_dist.data import pipeline
    from vit_dist.host import datascan as data
    from vit_dist.host.placement import ParallelDims

    cfg = load_config(None, TINY + [f"data.root={tiny_data}", "train.batch_size=4", "parallel.grad_accumulation=3",
                                    "data.num_workers=1"])
    layout = ParallelDims.of(cfg, 2)
    assert (layout.dp, layout.replica(1), layout.rank_batch, layout.global_batch) == (2, 1, 12, 24)
    train_split, _, classes = data.scan_dataset(cfg.data)
    assert data.steps_per_epoch(train_split.num_images, layout.dp, 4, 3) == 2
    dataset = pipeline.train_dataset(cfg, train_split, classes, layout.replica(1), layout.dp, layout.rank_batch)
    assert [images.shape[0] for images, _ in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)] == [12, 12]
    with pytest.raises(ConfigError, match=r"^train\.batch_size 4 x parallel\.grad_accumulation 3 is larger than each "
                                          r"rank's shard of 6 images \(48 images over 8 data-parallel ranks\); lower "
                                          r"train\.batch_size or parallel\.grad_accumulation$"):
        data.steps_per_epoch(train_split.num_images, 8, 4, 3)
