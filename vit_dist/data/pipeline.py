"""The input pipelines: MindSpore's ImageFolderDataset over a scanned split (host.datascan), sharded
by data-parallel replica, with C++ transforms, batched; for training, then random erasing and
mixup/cutmix on each batch (batch_augment.py)."""
from __future__ import annotations

from typing import Optional

import mindspore as ms
import mindspore.dataset as ds
import mindspore.dataset.transforms as transforms_
import mindspore.dataset.vision as vision

from vit_dist.data.batch_augment import BatchAugment
from vit_dist.data.mixup import Mixup
from vit_dist.data.sampler import RepeatedAugmentationSampler
from vit_dist.host.config import Config, DataConfig
from vit_dist.host.datascan import READ_EXTENSIONS, Split
from vit_dist.host.rand_augment import LEVELS, parse_rand_augment

# data.interpolation as MindSpore's resize filter. "bicubic" is PILCUBIC, Pillow's bicubic (antialiased
# when shrinking), which timm, torchvision and Hugging Face resize with: it gives their pixels exactly,
# where Inter.BICUBIC (OpenCV's) differs by one to six levels on average when shrinking a photo.
# MindSpore has no Pillow bilinear: "bilinear" is OpenCV's, not antialiased.
RESIZE = {"bilinear": vision.Inter.BILINEAR, "bicubic": vision.Inter.PILCUBIC}
# RandAugment's rotations, shears and translations (no shrinking) take OpenCV's filters only.
WARP = {"bilinear": vision.Inter.BILINEAR, "bicubic": vision.Inter.BICUBIC}


def _normalize_ops(cfg: DataConfig):
    return [vision.Normalize([m * 255 for m in cfg.mean], [s * 255 for s in cfg.std]), vision.HWC2CHW()]


def train_transforms(cfg: DataConfig) -> list:
    """timm's per-image training transform: random resized crop, flip, then RandAugment or else color
    jitter (timm leaves color jitter out when RandAugment is on); or the eval transform when
    augmentation is off. Random erasing, timm's last per-image op, runs on the batch (batch_augment.py)."""
    if not cfg.augment:
        return eval_transforms(cfg)
    ops = [vision.RandomCropDecodeResize(cfg.image_size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                                         interpolation=RESIZE[cfg.interpolation])]
    if cfg.hflip_prob > 0:
        ops.append(vision.RandomHorizontalFlip(cfg.hflip_prob))
    if cfg.rand_augment is not None:
        ops += rand_augment_ops(cfg)
    elif cfg.color_jitter > 0:
        ops.append(vision.RandomColorAdjust(brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                                            saturation=cfg.color_jitter))
    return ops + _normalize_ops(cfg)


def rand_augment_ops(cfg: DataConfig) -> list:
    """MindSpore's RandAugment for timm's string: magnitude m of timm's 10 levels (11 bins: 0..10), the
    empty area filled with the mean pixel and resized with data.interpolation, as timm does. timm applies
    each of its n ops with probability p; MindSpore's op applies every op it draws, so p < 1 becomes n
    single-op RandAugments, each applied with probability p."""
    spec = parse_rand_augment(cfg.rand_augment)
    fill = tuple(min(255, round(255 * m)) for m in cfg.mean)

    def rand_augment(count: int):
        return vision.RandAugment(num_ops=count, magnitude=spec.magnitude, num_magnitude_bins=LEVELS + 1,
                                  interpolation=WARP[cfg.interpolation], fill_value=fill)

    if spec.prob == 1.0:
        return [rand_augment(spec.num_ops)]
    return [transforms_.RandomApply([rand_augment(1)], prob=spec.prob) for _ in range(spec.num_ops)]


def eval_transforms(cfg: DataConfig) -> list:
    # The decoder always yields 3-channel RGB, whatever the file's mode (L, RGBA, CMYK, P, 16-bit).
    resize = int(cfg.image_size / cfg.eval_crop_fraction)
    return [vision.Decode(), vision.Resize(resize, RESIZE[cfg.interpolation]),
            vision.CenterCrop(cfg.image_size)] + _normalize_ops(cfg)


def shard_sampler(split: Split, shuffle: bool, shard: int, num_shards: int, repeats: int = 1, seed: int = 0):
    """Shard `shard` of `num_shards` of the split's kept files: a DistributedSampler (reshuffled every
    epoch from ds.config's seed when shuffled), or with repeats > 1 the repeated-augmentation sampler
    (reshuffled every epoch from `seed`). Either draws datascan.shard_size(num_images, num_shards) a pass."""
    if repeats > 1:
        sampler = RepeatedAugmentationSampler(split.num_images, repeats, shard, num_shards, seed, shuffle)
    else:
        sampler = ds.DistributedSampler(num_shards=num_shards, shard_id=shard, shuffle=shuffle)
    # The parent's positions index the child's list: the shard is drawn from the kept files only.
    if split.excluded:
        sampler.add_child(ds.SubsetSampler(split.kept()))
    return sampler


def _image_folder(split: Split, classes: dict[str, int], sampler, transforms: list, num_workers: int):
    # A file that fails to decode although the check passed it (changed since, or a decoder quirk) is
    # replaced by a healthy sample, and MindSpore's log names it, instead of ending the job. REPLACE
    # rather than SKIP: every rank keeps its batch count, so no rank waits for another in a collective.
    # The setting is MindSpore's global one; every pipeline here wants it.
    ds.config.set_error_samples_mode(ds.config.ErrorSamplesMode.REPLACE)
    dataset = ds.ImageFolderDataset(str(split.path), sampler=sampler, class_indexing=classes,
                                    extensions=list(READ_EXTENSIONS), decode=False)
    dataset = dataset.map(transforms, input_columns="image", num_parallel_workers=num_workers)
    return dataset.map(transforms_.TypeCast(ms.int32), input_columns="label")


def train_dataset(cfg: Config, split: Split, classes: dict[str, int], shard: int, num_shards: int, batch_size: int):
    """Shard `shard` of `num_shards` (a data-parallel replica's), reshuffled every epoch from train.seed,
    in batches of batch_size (ParallelDims.rank_batch: the train step splits them into micro-batches of
    train.batch_size). Labels are int32 [batch], or with mixup (data.mixes) float32 soft targets
    [batch, classes]."""
    # Every rank draws the same permutation, so the shards stay disjoint.
    ds.config.set_seed(cfg.train.seed)
    # A resumed run (Dataset.set_init_step) replays the consumed batches' random ops too, so it draws the
    # uninterrupted run's crops and flips: fast recovery would skip them and draw others.
    ds.config.set_fast_recovery(False)
    sampler = shard_sampler(split, cfg.data.shuffle, shard, num_shards, cfg.data.repeated_augmentation, cfg.train.seed)
    dataset = _image_folder(split, classes, sampler, train_transforms(cfg.data), cfg.data.num_workers)
    augment = batch_augment(cfg, len(classes), shard)
    if augment is None:
        return dataset.batch(batch_size, drop_remainder=True)
    # Its batches are keyed, not drawn in turn, so the map's threads may take them in any order.
    return dataset.batch(batch_size, drop_remainder=True, per_batch_map=augment, input_columns=["image", "label"],
                         num_parallel_workers=cfg.data.num_workers)


def batch_augment(cfg: Config, num_classes: int, shard: int) -> Optional[BatchAugment]:
    """The batch-level augmentation of the config for this replica's shard, or None when it has none."""
    d = cfg.data
    if d.random_erasing == 0 and not d.mixes:
        return None
    mixup = Mixup(d.mixup_alpha, d.cutmix_alpha, d.mixup_prob, d.mixup_switch_prob, cfg.train.label_smoothing,
                  cfg.model.num_classes or num_classes) if d.mixes else None
    return BatchAugment(cfg.train.seed, shard, cfg.train.batch_size, d.random_erasing, mixup)


def eval_dataset(cfg: Config, split: Split, classes: dict[str, int], rank: int, world_size: int, batch_size: int):
    """This rank's shard in file order; rank r's i-th image is the dataset's (i * world + r)-th,
    so the padding ImageFolderDataset appends can be told apart (see training/evaluate.py)."""
    dataset = _image_folder(split, classes, shard_sampler(split, False, rank, world_size), eval_transforms(cfg.data),
                            cfg.data.num_workers)
    return dataset.batch(batch_size, drop_remainder=False)


