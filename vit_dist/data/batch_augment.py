"""The training pipeline's batch-level augmentation (its `per_batch_map`): timm's random erasing on each
image, then timm's mixup/cutmix on each micro-batch, in that order as in timm (erasing is the last
per-image transform, mixing happens on the loader's batch).

Every draw comes from a generator keyed by (train.seed, data-parallel replica, epoch, batch of the
epoch): a pure function of where the batch sits in the run. So each replica mixes its own shard with
its own draws, and a run resumed with Dataset.set_init_step draws exactly what the uninterrupted run drew
for the same batch (MindSpore tells the map its epoch and batch, replayed or not)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from vit_dist.data.erasing import random_erase
from vit_dist.data.mixup import Mixup


def batch_generator(seed: int, replica: int, epoch: int, batch: int) -> np.random.RandomState:
    """The batch's own generator. numpy's RandomState: its streams are frozen across numpy versions
    (NEP 19), and its methods are the ones timm draws with from numpy's global generator."""
    return np.random.RandomState(np.random.MT19937(np.random.SeedSequence((seed, replica, epoch, batch))))


@dataclass(frozen=True)
class BatchAugment:
    """per_batch_map(images, labels, batch_info) -> (images float32 [B, C, H, W], labels): int32 [B],
    or with mixup float32 soft targets [B, classes]. Micro-batches of `micro_batch` rows (the train
    step's slices under accumulation) are mixed each on its own, as timm mixes each loader batch."""
    seed: int
    replica: int
    micro_batch: int
    erasing_prob: float
    mixup: Optional[Mixup]

    def __call__(self, images: list, labels: list, batch_info) -> tuple[np.ndarray, np.ndarray]:
        rng = batch_generator(self.seed, self.replica, batch_info.get_epoch_num(), batch_info.get_batch_num())
        images, labels = np.stack(images), np.asarray(labels)
        if self.erasing_prob > 0:
            for image in images:
                random_erase(image, self.erasing_prob, rng)
        if self.mixup is None:
            return images, labels
        parts = range(0, len(images), self.micro_batch)
        targets = [self.mixup(images[i:i + self.micro_batch], labels[i:i + self.micro_batch], rng) for i in parts]
        return images, np.concatenate(targets)
