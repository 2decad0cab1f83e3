"""The ImageFolder scan, sharding by rank, transforms, and the eval padding mask, on real image files."""
import mindspore.dataset.vision as vision
import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from vit_dist.data import pipeline
from vit_dist.host import datascan as data
from vit_dist.host.config import load_config
from vit_dist.host.errors import ConfigError, DataError
from vit_dist.training.evaluate import real_mask
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
    dataset = pipeline._image_folder(split, classes, False, rank, world, pipeline.eval_transforms(cfg.data), 1)
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
        dataset = pipeline._image_folder(train, classes, False, 0, 1, transforms, 1)
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
