"""The ImageFolder scan, sharding by rank, repeated augmentation, transforms, and the eval padding mask,
on real image files."""
import dataclasses

import mindspore.dataset.vision as vision
import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from vit_dist.data import pipeline, sampler
from vit_dist.host import datascan as data
from vit_dist.host.config import load_config
from vit_dist.host.errors import ConfigError, DataError
from vit_dist.training.evaluate import cross_entropy, real_mask
from vit_dist.host.placement import Placement


def test_scan_counts_classes_and_ignores_hidden_and_stray_files(tiny_data, tmp_path):
    train, val, classes = data.scan_dataset(load_config(None, [f"data.root={tiny_data}"]).data)
    assert (train.num_images, val.num_images) == (48, 9)
    assert classes == {"digit0": 0, "digit1": 1, "digit7": 2}
    root = write_image_folder(tmp_path, {"train": {"a1": 2}, "val": {"a1": 1}})
    (root / "train" / ".hidden").mkdir()
    (root / "train" / "a1" / "notes.txt").write_text("not an image")
    (root / "train" / "a1" / ".DS_Store").write_text("")
    split = data.scan_split(root, "train")
    assert (split.classes, split.files, split.num_images) == (("a1",), ("a1/train_000.png", "a1/train_001.png"), 2)


def test_missing_root_split_and_empty_split_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist; point data.root at a folder holding train/ and val/"):
        data.scan_split(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="has no val/ folder"):
        data.scan_split(tmp_path, "val")
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    assert data.split_problems(data.scan_split(tmp_path, "train")) == [
        f"{tmp_path}/train holds no images in class folders; expected {tmp_path}/train/<class>/<image>.jpg|png"]
    with pytest.raises(DataError, match="train holds no images in class folders"):
        data.scan_dataset(load_config(None, [f"data.root={tmp_path}"]).data)


def test_class_mismatch_names_the_difference(tmp_path):
    root = write_image_folder(tmp_path, {"train": {"d1": 1, "d2": 1}, "val": {"d1": 1, "d3": 1}})
    with pytest.raises(DataError, match=r"only in train \['d2'\], only in val \['d3'\]"):
        data.scan_dataset(load_config(None, [f"data.root={root}"]).data)


def test_batch_larger_than_shard_is_refused():
    assert data.steps_per_epoch(48, 2, 8) == 3
    assert data.steps_per_epoch(9, 2, 2) == 2  # 5 per rank after padding
    with pytest.raises(ConfigError, match="train.batch_size 32 is larger than each rank's shard of 24 images"):
        data.steps_per_epoch(48, 2, 32)


def _shard_labels_and_pixels(cfg, split, classes, rank, world):
    dataset = pipeline._image_folder(split, classes, pipeline.shard_sampler(split, False, rank, world),
                                     pipeline.eval_transforms(cfg.data), 1)
    return [(int(label), image.tobytes()) for image, label in dataset.create_tuple_iterator(output_numpy=True)]


def test_rank_shards_are_disjoint_and_cover_the_dataset(tiny_data):
    cfg = load_config(None, [f"data.root={tiny_data}", "data.image_size=16"])
    train, _, classes = data.scan_dataset(cfg.data)
    whole = _shard_labels_and_pixels(cfg, train, classes, 0, 1)
    shards = [_shard_labels_and_pixels(cfg, train, classes, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 24
    assert sorted(shards[0] + shards[1]) == sorted(whole)
    assert not set(shards[0]) & set(shards[1])


def test_shuffled_shards_stay_disjoint_and_reshuffle_each_epoch(tiny_data):
    cfg = load_config(None, [f"data.root={tiny_data}", "data.image_size=16", "data.augment=false",
                             "train.batch_size=4", "data.num_workers=1"])
    train, _, classes = data.scan_dataset(cfg.data)
    epochs = []
    for rank in range(2):
        batches = pipeline.train_dataset(cfg, train, classes, rank, 2, 4).create_tuple_iterator(num_epochs=2,
                                                                                        output_numpy=True)
        epochs.append([[image.tobytes() for images, _ in batches for image in images] for _ in range(2)])
    for epoch in range(2):
        assert len(set(epochs[0][epoch]) | set(epochs[1][epoch])) == 48
    assert epochs[0][0] != epochs[0][1]


@pytest.mark.parametrize("images, repeats, ranks", [(48, 3, 4), (50, 2, 2), (47, 3, 3), (45, 4, 8), (45, 2, 3)])
def test_repeated_augmentation_deals_each_images_copies_to_different_ranks_of_one_step(images, repeats, ranks):
    draws = np.array([sampler.repeated_indices(images, repeats, rank, ranks, epoch=0, seed=5) for rank in range(ranks)])
    # Each rank draws a DistributedSampler shard's worth, so the loop's steps per epoch hold.
    assert draws.shape == (ranks, data.shard_size(images, ranks))
    # The draws of one step position, rank after rank, are runs of one image `repeats` long: every rank
    # took its position of one shared order (with another order per rank the runs would break up).
    dealt = draws.T.reshape(-1)
    runs = [dealt[i:i + repeats] for i in range(0, len(dealt), repeats)]
    assert all(len(set(run)) == 1 for run in runs)
    assert len({run[0] for run in runs}) == len(runs)  # no image comes back in a later run
    # So each drawn image has `repeats` copies (but the last, cut by the epoch's length), each on another
    # rank, at the same or the next step position; no rank sees an image twice in the epoch.
    copies = {int(image): np.argwhere(draws == image) for image in np.unique(draws)}
    assert sorted(len(where) for where in copies.values())[1:] == [repeats] * (len(copies) - 1)
    for where in copies.values():
        ranks_of_copies, positions = where[:, 0], where[:, 1]
        assert len(set(ranks_of_copies)) == len(where) and positions.max() - positions.min() <= 1
    assert len(copies) == -(-draws.size // repeats)


def test_repeated_augmentation_reshuffles_by_epoch_and_seed_alone():
    first = sampler.repeated_indices(40, 3, 1, 2, epoch=0, seed=5)
    np.testing.assert_array_equal(sampler.repeated_indices(40, 3, 1, 2, epoch=0, seed=5), first)
    assert not np.array_equal(sampler.repeated_indices(40, 3, 1, 2, epoch=1, seed=5), first)
    assert not np.array_equal(sampler.repeated_indices(40, 3, 1, 2, epoch=0, seed=6), first)
    # Unshuffled: the file order, repeated and dealt.
    assert sampler.repeated_indices(10, 2, 1, 2, epoch=3, seed=5, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def _draws(cfg, split, classes, shard, epochs, init_step=0):
    """The images (bytes) of each batch shard `shard` of 2 reads in `epochs` epochs, from init_step on."""
    dataset = pipeline.train_dataset(cfg, split, classes, shard, 2, cfg.train.batch_size)
    dataset.set_init_step(init_step)
    iterator = dataset.create_tuple_iterator(num_epochs=epochs, output_numpy=True)
    per_epoch = dataset.get_dataset_size()
    return [[image.tobytes() for image in images] for _ in range(epochs - init_step // per_epoch)
            for images, _ in iterator]


def test_the_pipeline_draws_the_repeated_shards_of_the_kept_files_and_resumes_exactly(tiny_data):
    """Two shards of the 48 tiny images with 6 of them excluded as bad, N=2: each draws the sampler's
    positions in the kept files (told apart by their pixels, augmentation off); with random crops on, a
    pipeline resumed mid-epoch (set_init_step) draws the uninterrupted run's images, crops included."""
    overrides = [f"data.root={tiny_data}", "data.image_size=16", "train.batch_size=4", "data.num_workers=1",
                 "data.repeated_augmentation=2", "train.seed=3"]
    cfg = load_config(None, overrides + ["data.augment=false"])
    scanned, _, classes = data.scan_dataset(cfg.data)
    split = dataclasses.replace(scanned, bad=tuple((i, "test") for i in (0, 5, 17, 30, 31, 47)))
    kept = split.kept()
    pixels = [image.tobytes() for image, _ in pipeline._image_folder(
        scanned, classes, pipeline.shard_sampler(scanned, False, 0, 1), pipeline.eval_transforms(cfg.data), 1
    ).create_tuple_iterator(output_numpy=True)]
    file_of = {image: i for i, image in enumerate(pixels)}
    per_epoch = data.steps_per_epoch(split.num_images, 2, 4)
    for shard in range(2):
        drawn = [file_of[image] for batch in _draws(cfg, split, classes, shard, 2) for image in batch]
        expected = [kept[i] for epoch in range(2)
                    for i in sampler.repeated_indices(42, 2, shard, 2, epoch, seed=3)[:per_epoch * 4]]
        assert drawn == expected
    cfg = load_config(None, overrides)
    whole = _draws(cfg, split, classes, 1, 2)
    assert len(whole) == 2 * per_epoch
    for step in (per_epoch - 1, per_epoch + 2):
        assert _draws(cfg, split, classes, 1, 2, init_step=step) == whole[step:]


@pytest.mark.parametrize("mode, suffix, kwargs", [
    ("L", ".png", {}), ("RGBA", ".png", {}), ("P", ".png", {}), ("CMYK", ".jpg", {}),
    ("RGB", ".jpg", {"progressive": True}), ("I;16", ".png", {}), ("LA", ".png", {}), ("RGB", ".bmp", {}),
    ("RGB", ".tif", {"compression": "tiff_lzw"}),
])
def test_any_image_mode_becomes_rgb(tmp_path, mode, suffix, kwargs):
    rgb = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    image = Image.fromarray((np.arange(2000).reshape(40, 50) * 30).astype(np.uint16)) if mode == "I;16" \
        else rgb.convert(mode)
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
        image.save(tmp_path / split / "c" / f"x{suffix}", **kwargs)
    cfg = load_config(None, [f"data.root={tmp_path}", "data.image_size=16"])
    train, val, classes = data.scan_dataset(cfg.data)
    for transforms in (pipeline.train_transforms(cfg.data), pipeline.eval_transforms(cfg.data)):
        dataset = pipeline._image_folder(train, classes, pipeline.shard_sampler(train, False, 0, 1), transforms, 1)
        (out, _), = list(dataset.create_tuple_iterator(output_numpy=True))
        assert out.shape == (3, 16, 16) and out.dtype == np.float32


def test_the_train_crop_resizes_with_data_interpolation(tmp_path):
    """With the crop fixed to the whole image, the train transform is a resize with data.interpolation:
    bicubic gives Pillow's bicubic pixels exactly (timm's and torchvision's resize); bilinear is
    OpenCV's, another filter."""
    photo = Image.fromarray((np.random.default_rng(0).random((30, 40, 3)) * 255).astype(np.uint8))
    photo.resize((400, 300), Image.BICUBIC).save(tmp_path / "photo.png")  # smooth, as photos are
    crops = {}
    for interpolation in ("bicubic", "bilinear"):
        cfg = load_config(None, [f"data.interpolation={interpolation}", "data.image_size=96", "data.crop_scale=[1,1]",
                                 f"data.crop_ratio=[{4 / 3!r},{4 / 3!r}]"])
        (crop,) = [op for op in pipeline.train_transforms(cfg.data) if isinstance(op, vision.RandomCropDecodeResize)]
        crops[interpolation] = crop(np.fromfile(tmp_path / "photo.png", np.uint8))
    with Image.open(tmp_path / "photo.png") as photo:
        assert np.array_equal(crops["bicubic"], np.asarray(photo.resize((96, 96), Image.BICUBIC)))
    assert not np.array_equal(crops["bilinear"], crops["bicubic"])


def test_real_mask_drops_exactly_the_wrapped_padding():
    # 9 images on 2 ranks: rank 0 gets 0,2,4,6,8; rank 1 gets 1,3,5,7 and image 0 again as padding.
    rank0 = real_mask(0, 5, 5, Placement("msrun", 0, 2, 0, 2), 9)
    rank1 = real_mask(0, 5, 5, Placement("msrun", 1, 2, 1, 2), 9)
    assert rank0.tolist() == [True] * 5 and rank1.tolist() == [True] * 4 + [False]
    assert real_mask(2, 2, 1, Placement("msrun", 1, 2, 1, 2), 9).tolist() == [False]  # local sample 4


def test_val_cross_entropy_is_torchs_on_the_same_logits():
    """Without label smoothing, per sample; large logits too (float32 logits of a confident model)."""
    import torch

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 10)) * np.array([[1.0]] * 32 + [[300.0]] * 32)).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(labels),
                                                 reduction="none").numpy()
    assert np.allclose(cross_entropy(logits, labels), expected, rtol=1e-12, atol=1e-12)
