"""ImageFolder input: scan and check the folders, shard by rank, transform, batch.

The scan (pure Python, no MindSpore) runs before anything compiles, so a missing split or a class
mismatch is one clear line; the pipelines use MindSpore's ImageFolderDataset with C++ transforms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from vit_dist.config import Config, ConfigError, DataConfig

# What MindSpore's native decoder reads; other files in a class folder are not images to it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Split:
    path: Path
    classes: tuple[str, ...]
    num_images: int


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_split(root: Path, split: str) -> Split:
    """Class folders (sorted, hidden ones ignored) and the number of images under root/split."""
    path = root / split
    if not root.is_dir():
        raise ConfigError(f"data.root {root} does not exist; point data.root at a folder holding train/ and val/ "
                          "(vit-dist demo-data OUT writes one)")
    if not path.is_dir():
        raise ConfigError(f"data.root {root} has no {split}/ folder; put one folder per class under {path}")
    classes = tuple(sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")))
    num_images = sum(1 for c in classes for f in (path / c).iterdir() if is_image(f))
    if not classes or num_images == 0:
        raise ConfigError(f"{path} holds no images in class folders; expected {path}/<class>/<image>.jpg|png")
    return Split(path, classes, num_images)


def class_indexing(train: Split, val: Split) -> dict[str, int]:
    """One class->index mapping for both splits (sorted folder names), or an error naming the difference."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ConfigError(f"class folders differ between {train.path} and {val.path}: "
                          f"only in train {only_train}, only in val {only_val}; give both splits the same classes")
    return {name: index for index, name in enumerate(train.classes)}


def shard_size(num_images: int, world_size: int) -> int:
    """Images per rank: ImageFolderDataset pads every shard to this length by repeating images."""
    return math.ceil(num_images / world_size)


def steps_per_epoch(num_images: int, world_size: int, batch_size: int) -> int:
    per_rank = shard_size(num_images, world_size)
    if batch_size > per_rank:
        raise ConfigError(f"train.batch_size {batch_size} is larger than each rank's shard of {per_rank} images "
                          f"({num_images} images over {world_size} ranks); lower train.batch_size")
    return per_rank // batch_size


def _normalize_ops(cfg: DataConfig):
    import mindspore.dataset.vision as vision

    return [vision.Normalize([m * 255 for m in cfg.mean], [s * 255 for s in cfg.std]), vision.HWC2CHW()]


def train_transforms(cfg: DataConfig) -> list:
    """The MindSpore ViT tutorial's augmentation, or the eval transform when augmentation is off."""
    import mindspore.dataset.vision as vision

    if not cfg.augment:
        return eval_transforms(cfg)
    ops = [vision.RandomCropDecodeResize(cfg.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio)]
    if cfg.hflip_prob > 0:
        ops.append(vision.RandomHorizontalFlip(cfg.hflip_prob))
    return ops + _normalize_ops(cfg)


def eval_transforms(cfg: DataConfig) -> list:
    import mindspore.dataset.vision as vision

    # The decoder always yields 3-channel RGB, whatever the file's mode (L, RGBA, CMYK, P, 16-bit).
    resize = int(cfg.image_size / cfg.eval_crop_fraction)
    return [vision.Decode(), vision.Resize(resize), vision.CenterCrop(cfg.image_size)] + _normalize_ops(cfg)


def _image_folder(split: Split, classes: dict[str, int], shuffle: bool, rank: int, world_size: int,
                  transforms: list, num_workers: int):
    import mindspore as ms
    import mindspore.dataset as ds
    import mindspore.dataset.transforms as transforms_

    extensions = sorted({e for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper())})
    dataset = ds.ImageFolderDataset(str(split.path), shuffle=shuffle, num_shards=world_size, shard_id=rank,
                                    class_indexing=classes, extensions=extensions, decode=False)
    dataset = dataset.map(transforms, input_columns="image", num_parallel_workers=num_workers)
    return dataset.map(transforms_.TypeCast(ms.int32), input_columns="label")


def train_dataset(cfg: Config, split: Split, classes: dict[str, int], rank: int, world_size: int):
    """This rank's shard, reshuffled every epoch from train.seed, in batches of train.batch_size."""
    import mindspore.dataset as ds

    # Every rank draws the same permutation, so the shards stay disjoint.
    ds.config.set_seed(cfg.train.seed)
    dataset = _image_folder(split, classes, cfg.data.shuffle, rank, world_size, train_transforms(cfg.data),
                            cfg.data.num_workers)
    return dataset.batch(cfg.train.batch_size, drop_remainder=True)


def eval_dataset(cfg: Config, split: Split, classes: dict[str, int], rank: int, world_size: int, batch_size: int):
    """This rank's shard in file order; rank r's i-th image is the dataset's (i * world + r)-th,
    so the padding ImageFolderDataset appends can be told apart (see evaluate.py)."""
    dataset = _image_folder(split, classes, False, rank, world_size, eval_transforms(cfg.data), cfg.data.num_workers)
    return dataset.batch(batch_size, drop_remainder=False)


def scan_dataset(cfg: DataConfig) -> tuple[Split, Split, dict[str, int]]:
    """Checks data.root before anything is built: both splits present, non-empty, same classes."""
    root = Path(cfg.root)
    train, val = scan_split(root, "train"), scan_split(root, "val")
    return train, val, class_indexing(train, val)
