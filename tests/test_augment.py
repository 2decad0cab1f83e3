"""The recipe's augmentation against timm's own code: mixup/cutmix images and soft targets, random
erasing, the soft-target loss; the real pipeline with RandAugment, color jitter, erasing and mixing;
and the exact resume of mixed batches."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import timm.data.random_erasing
import torch
from timm.data import Mixup as TimmMixup
from timm.loss import SoftTargetCrossEntropy as TimmSoftTargetCrossEntropy

from conftest import worst_relative_difference
from vit_dist.data.batch_augment import BatchAugment, batch_generator
from vit_dist.data.erasing import random_erase
from vit_dist.data.mixup import Mixup, soft_targets
from vit_dist.host.config import ConfigError, load_config

CLASSES = 5


def _batch(seed: int, size: int = 8, side: int = 12):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((size, 3, side, side)).astype(np.float32), rng.integers(0, CLASSES, size)


def _timm_mixed(mixup: Mixup, images: np.ndarray, labels: np.ndarray):
    """timm's Mixup in batch mode on a copy, drawing from numpy's global generator as it stands."""
    timm_mixup = TimmMixup(mixup_alpha=mixup.mixup_alpha, cutmix_alpha=mixup.cutmix_alpha, prob=mixup.prob,
                           switch_prob=mixup.switch_prob, mode="batch", label_smoothing=mixup.label_smoothing,
                           num_classes=mixup.num_classes)
    x, target = timm_mixup(torch.from_numpy(images.copy()), torch.from_numpy(labels))
    return x.numpy(), target.numpy()


MIXES = {  # (mixup_alpha, cutmix_alpha, prob, switch_prob, label_smoothing)
    "mixup": (0.8, 0.0, 1.0, 0.5, 0.0),
    "cutmix": (0.0, 1.0, 1.0, 0.5, 0.0),
    "switch": (0.8, 1.0, 1.0, 0.5, 0.1),
    "sometimes": (0.8, 1.0, 0.5, 0.5, 0.1),
}


@pytest.mark.parametrize("name", list(MIXES))
def test_mixup_and_cutmix_equal_timms_for_the_same_draws(name):
    """Seeded alike, timm (numpy's global generator) and ours (a RandomState) draw the same lambda, box
    and pairing: images and soft targets equal timm's; each kind the settings allow occurs."""
    mixup = Mixup(*MIXES[name], num_classes=CLASSES)
    seen = set()
    for seed in range(12):
        images, labels = _batch(seed)
        np.random.seed(seed)
        timm_images, timm_targets = _timm_mixed(mixup, images, labels)
        lam, box = mixup.draw(np.random.RandomState(seed), images.shape[-2:])
        seen.add("cutmix" if box else "none" if lam == 1.0 else "mixup")
        targets = mixup(images, labels, np.random.RandomState(seed))
        np.testing.assert_allclose(images, timm_images, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(targets, timm_targets, rtol=1e-6, atol=1e-7)
        assert targets.dtype == np.float32 and targets.sum(axis=1) == pytest.approx(np.ones(8), rel=1e-6)
    expected = {"mixup": {"mixup"}, "cutmix": {"cutmix"}, "switch": {"mixup", "cutmix"},
                "sometimes": {"mixup", "cutmix", "none"}}[name]
    assert seen == expected


def test_an_unmixed_batch_passes_through_with_timms_smoothed_one_hot_targets():
    mixup = Mixup(0.8, 1.0, 0.0, 0.5, label_smoothing=0.1, num_classes=CLASSES)
    images, labels = _batch(0)
    original = images.copy()
    targets = mixup(images, labels, np.random.RandomState(0))
    assert np.array_equal(images, original)
    expected = timm.data.mixup.mixup_target(torch.from_numpy(labels), CLASSES, 1.0, 0.1).numpy()
    np.testing.assert_allclose(targets, expected, rtol=1e-7)
    assert targets[0, labels[0]] == pytest.approx(0.9 + 0.1 / CLASSES)


def test_each_micro_batch_is_mixed_as_timm_mixes_each_loader_batch():
    """A batch of 2 micro-batches is timm's Mixup called on each in turn from the batch's generator;
    another replica draws otherwise for the same batch."""
    mixup = Mixup(0.8, 1.0, 1.0, 0.5, label_smoothing=0.1, num_classes=CLASSES)
    images, labels = _batch(1)
    np.random.set_state(batch_generator(7, 1, 2, 3).get_state())
    timm_parts = [_timm_mixed(mixup, images[i:i + 4], labels[i:i + 4]) for i in (0, 4)]
    augment = BatchAugment(seed=7, replica=1, micro_batch=4, erasing_prob=0.0, mixup=mixup)
    info = SimpleNamespace(get_epoch_num=lambda: 2, get_batch_num=lambda: 3)
    mixed, targets = augment(list(images), list(labels), info)
    np.testing.assert_allclose(mixed, np.concatenate([p[0] for p in timm_parts]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, np.concatenate([p[1] for p in timm_parts]), rtol=1e-6, atol=1e-7)
    other, _ = BatchAugment(7, 0, 4, 0.0, mixup)(list(images), list(labels), info)
    assert not np.allclose(other, mixed)


class _PythonRandomFrom:
    """The part of Python's `random` module timm's RandomErasing uses, drawing from a RandomState."""

    def __init__(self, rng: np.random.RandomState):
        self.rng = rng

    def random(self):
        return self.rng.random_sample()

    def uniform(self, low, high):
        return self.rng.uniform(low, high)

    def randint(self, low, high):  # inclusive, as Python's
        return self.rng.randint(low, high + 1)


def test_random_erasing_equals_timms_for_the_same_draws(monkeypatch):
    """timm's RandomErasing(mode='pixel'), its `random` and normal pixels fed from the same generator
    as ours: the same boxes and values, on square and oblong images; about prob of them erased."""
    erased = 0
    for seed in range(40):
        image = np.random.default_rng(seed).standard_normal((3, 12, 20) if seed % 2 else (3, 16, 16)).astype(np.float32)
        source = np.random.RandomState(seed)
        monkeypatch.setattr(timm.data.random_erasing, "random", _PythonRandomFrom(source))
        monkeypatch.setattr(timm.data.random_erasing, "_get_pixels", lambda per_pixel, rand_color, size, dtype, device:
                            torch.from_numpy(source.standard_normal(size).astype(np.float32)))
        reference = timm.data.random_erasing.RandomErasing(0.25, mode="pixel", device="cpu")(
            torch.from_numpy(image.copy())).numpy()
        ours = image.copy()
        random_erase(ours, 0.25, np.random.RandomState(seed))
        np.testing.assert_array_equal(ours, reference)
        erased += not np.array_equal(ours, image)
    assert 4 <= erased <= 18


def test_soft_target_loss_equals_timms_and_one_hot_targets_equal_the_label_loss():
    import mindspore as ms
    from mindspore import nn

    from vit_dist.training.loss import SoftTargetCrossEntropy, train_loss

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, CLASSES)).astype(np.float32) * 3
    targets = rng.dirichlet(np.ones(CLASSES), 6).astype(np.float32)
    ours = float(SoftTargetCrossEntropy()(ms.Tensor(logits), ms.Tensor(targets)).asnumpy())
    reference = float(TimmSoftTargetCrossEntropy()(torch.from_numpy(logits), torch.from_numpy(targets)))
    assert ours == pytest.approx(reference, rel=1e-6)
    labels = rng.integers(0, CLASSES, 6).astype(np.int32)
    for smoothing in (0.0, 0.1):
        smoothed = soft_targets(labels, CLASSES, 1.0, smoothing)
        soft = train_loss(smoothing, soft_targets=True)(ms.Tensor(logits), ms.Tensor(smoothed))
        hard = nn.CrossEntropyLoss(label_smoothing=smoothing)(ms.Tensor(logits), ms.Tensor(labels))
        assert float(soft.asnumpy()) == pytest.approx(float(hard.asnumpy()), rel=1e-6)
    assert isinstance(train_loss(0.1, soft_targets=False), nn.CrossEntropyLoss)


def _images_and_labels(tiny_data, *overrides, shard: int = 0, init_step: int = 0, batches: int = 6,
                       batch: int = 8):
    """The training pipeline's first batches (from init_step on) of shard `shard` of 2, over epochs."""
    from vit_dist.data import pipeline
    from vit_dist.host import datascan

    cfg = load_config(None, [f"data.root={tiny_data}", "data.image_size=16", "data.num_workers=1",
                             "train.batch_size=4", "train.seed=5", *overrides])
    split, _, classes = datascan.scan_dataset(cfg.data)
    dataset = pipeline.train_dataset(cfg, split, classes, shard, 2, batch)
    dataset.set_init_step(init_step)
    iterator = dataset.create_tuple_iterator(num_epochs=2, output_numpy=True)
    stream = (batch for _ in range(2) for batch in iterator)
    return [next(stream) for _ in range(batches)]


# A fixed whole-image crop and no flip: the only randomness left is the op under test.
FIXED_CROP = ["data.crop_scale=[1,1]", "data.crop_ratio=[1,1]", "data.hflip_prob=0"]


@pytest.mark.parametrize("option", ["data.random_erasing=1.0", "data.rand_augment=rand-m9-mstd0.5-inc1",
                                    "data.rand_augment=rand-n2-m9-p1", "data.color_jitter=0.4"])
def test_image_augmentations_change_images_and_keep_labels(tiny_data, option):
    plain = _images_and_labels(tiny_data, *FIXED_CROP, batches=3)
    augmented = _images_and_labels(tiny_data, *FIXED_CROP, option, batches=3)
    changed = 0
    for (images, labels), (plain_images, plain_labels) in zip(augmented, plain):
        assert np.array_equal(labels, plain_labels) and labels.dtype == np.int32
        assert images.shape == plain_images.shape and images.dtype == np.float32
        changed += sum(not np.allclose(a, b) for a, b in zip(images, plain_images))
    assert changed >= 12 if option.startswith("data.random_erasing") else changed >= 6


RECIPE = ["data.rand_augment=rand-m9-mstd0.5-inc1", "data.random_erasing=0.25", "data.mixup_alpha=0.8",
          "data.cutmix_alpha=1.0", "data.interpolation=bicubic"]


def test_mixed_batches_resume_exactly_and_differ_by_replica(tiny_data):
    """Batches of 2 micro-batches of 4 over 2 epochs (3 per epoch on this shard): a pipeline resumed at
    step 2 (mid-epoch) or 4 (in the second epoch) yields the uninterrupted pipeline's batches from there,
    RandAugment, erasing, mixup and cutmix included; soft targets carry the label smoothing."""
    whole = _images_and_labels(tiny_data, *RECIPE, shard=1)
    assert whole[0][1].shape == (8, 3) and whole[0][1].dtype == np.float32
    assert np.allclose(whole[0][1].sum(axis=1), 1.0) and whole[0][1].min() >= 0.1 / 3 - 1e-6
    for start in (2, 4):
        resumed = _images_and_labels(tiny_data, *RECIPE, shard=1, init_step=start, batches=6 - start)
        for (images, targets), (expected_images, expected_targets) in zip(resumed, whole[start:]):
            np.testing.assert_array_equal(images, expected_images)
            np.testing.assert_array_equal(targets, expected_targets)
    other = _images_and_labels(tiny_data, *RECIPE, shard=0, batches=1)
    assert not np.array_equal(other[0][0], whole[0][0])


def test_soft_targets_through_the_accumulated_step_equal_int_labels():
    """One-hot soft targets with the smoothing folded in, in 2 micro-batches, make the step (loss,
    parameters, AdamW moments) that int labels with smoothed cross entropy make in one batch: the step
    slices [batch, classes] labels as it slices images."""
    from test_grad_accumulation import trained_state

    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 8).astype(np.int32)
    hard = trained_state(1, False, images, labels, steps=1)
    soft = trained_state(2, False, images, soft_targets(labels, CLASSES, 1.0, 0.1), steps=1, soft_targets=True)
    assert soft["losses"] == pytest.approx(hard["losses"], rel=1e-5)
    worst = worst_relative_difference(soft["state"], hard["state"])
    assert worst[0] < 1e-5, worst


@pytest.mark.parametrize("overrides, message", [
    (["data.augment=false", "data.random_erasing=0.25"], r"data\.random_erasing need\(s\) data\.augment=true"),
    (["data.augment=false", "data.rand_augment=rand-m9"], r"data\.rand_augment need\(s\) data\.augment=true"),
    (["data.mixup_alpha=0.8", "train.batch_size=7"], r"needs an even train\.batch_size, got 7"),
])
def test_combinations_that_cannot_work_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_the_run_says_what_rand_augment_honours():
    from vit_dist.host.rand_augment import parse_rand_augment, start_note

    note = start_note(parse_rand_augment("rand-m9-mstd0.5-inc1"), color_jitter=0.3)
    assert note.startswith("data.rand_augment rand-m9-mstd0.5-inc1: MindSpore's RandAugment honours n=2 ops at "
                           "magnitude m=9/10, each applied with probability 0.5; not honoured: mstd0.5")
    assert "inc0" not in note and "color_jitter 0.3 is off" in note and "\n" not in note
    assert "inc0" in start_note(parse_rand_augment("rand-m7-n3"), 0.0)
    assert not math.isfinite(parse_rand_augment("rand-mstd101").magnitude_std)
