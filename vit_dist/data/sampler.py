"""Repeated augmentation (Hoffer et al. 2019; DeiT's RASampler, timm's RepeatAugSampler): each epoch
shows fewer distinct images, each several times, the copies spread over the data-parallel shards of
one step so that they are augmented differently on different ranks, and the epoch keeps its length."""
from __future__ import annotations

import mindspore.dataset as ds
import numpy as np

from vit_dist.host.datascan import shard_size


def repeated_indices(num_images: int, repeats: int, shard: int, num_shards: int, epoch: int, seed: int,
                     shuffle: bool = True) -> np.ndarray:
    """The positions (in [0, num_images)) shard `shard` of `num_shards` reads in epoch `epoch`, in order.

    timm's RepeatAugSampler with selected_round=0: one order of the images per epoch (the same on every
    shard), each position repeated `repeats` times in a row, the list padded from its start to a
    multiple of num_shards and dealt round-robin, so the i-th draws of all shards are one contiguous
    run of the list: the copies of an image go to different shards of the same step while repeats <=
    num_shards. Each shard keeps its first ceil(num_images / num_shards) draws, the length of a
    DistributedSampler shard (datascan.shard_size), so steps per epoch do not change. DeiT's default
    (selected_round=256) would trim the epoch to a multiple of 256 images (none at all below 256);
    batching with drop_remainder already trims the epoch to whole steps, so nothing is gained by it.
    The order is drawn from (seed, epoch), as torch's samplers seed with seed + epoch, but as a pair
    so that no two (seed, epoch) pairs share an order."""
    order = np.random.default_rng([seed, epoch]).permutation(num_images) if shuffle else np.arange(num_images)
    repeated = np.repeat(order, repeats)
    padded = np.resize(repeated, -(-len(repeated) // num_shards) * num_shards)  # wraps around: timm's padding
    return padded[shard::num_shards][:shard_size(num_images, num_shards)]


class RepeatedAugmentationSampler(ds.Sampler):
    """repeated_indices as a MindSpore sampler, one epoch per pass. MindSpore asks a Python sampler for
    a pass at the start of every epoch, also when a resumed pipeline (Dataset.set_init_step without
    fast recovery) replays the epochs before the resumed step, so counting passes gives the epoch and
    a resumed run draws what the uninterrupted run drew. Each iterator runs on its own copy of the
    sampler, so every iterator starts at epoch 0."""

    def __init__(self, num_images: int, repeats: int, shard: int, num_shards: int, seed: int, shuffle: bool = True):
        self.arguments = (num_images, repeats, shard, num_shards)
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        super().__init__(num_samples=shard_size(num_images, num_shards))

    def __iter__(self):
        indices = repeated_indices(*self.arguments, self.epoch, self.seed, self.shuffle)
        self.epoch += 1
        return iter(indices.tolist())

    def __len__(self) -> int:
        return self.num_samples
