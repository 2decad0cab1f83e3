"""timm's Mixup in batch mode, in numpy: per batch, with probability `prob`, mixup or cutmix with the
batch's mirror (x[::-1]), lambda ~ Beta(alpha, alpha), the cutmix lambda corrected to the clipped box's
area, and label smoothing folded into the soft targets (timm's `mixup_target`).

MindSpore's MixUpBatch and CutMixBatch do not fit: neither switches between the two, corrects lambda or
folds in label smoothing, and both draw from the pipeline's generator, which a resumed run cannot key
by step. Here every draw comes from the generator the caller passes (batch_augment.py keys it by batch),
in the order timm draws from numpy's global one, so the same seed gives timm's lambda, box and pairing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

Box = tuple[int, int, int, int]  # rows yl:yh, columns xl:xh


@dataclass(frozen=True)
class Mixup:
    """timm.data.Mixup(mode='batch', correct_lam=True) with these settings."""
    mixup_alpha: float
    cutmix_alpha: float
    prob: float
    switch_prob: float
    label_smoothing: float
    num_classes: int

    def __call__(self, images: np.ndarray, labels: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        """Mixes images (float32 [B, C, H, W]) in place; returns the soft targets, float32 [B, classes]."""
        lam, box = self.draw(rng, images.shape[-2:])
        if box is not None:
            yl, yh, xl, xh = box
            images[:, :, yl:yh, xl:xh] = images[::-1, :, yl:yh, xl:xh].copy()  # the mirror as it was before
        elif lam != 1.0:
            mirror = images[::-1] * np.float32(1.0 - lam)
            images *= np.float32(lam)
            images += mirror
        return soft_targets(labels, self.num_classes, lam, self.label_smoothing)

    def draw(self, rng: np.random.RandomState, size: tuple[int, int]) -> tuple[float, Optional[Box]]:
        """(lambda, cutmix box or None), drawn as timm's _params_per_batch and rand_bbox draw them;
        lambda 1.0: the batch is left as it is."""
        if rng.rand() >= self.prob:
            return 1.0, None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = rng.rand() < self.switch_prob
        else:
            cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not cutmix or lam == 1.0:
            return lam, None
        return cutmix_box(rng, lam, size)


def cutmix_box(rng: np.random.RandomState, lam: float, size: tuple[int, int]) -> tuple[float, Box]:
    """timm's rand_bbox: a box of (1 - lam) of the area around a uniform centre, clipped to the image;
    and lambda corrected to what the clipped box leaves of the image."""
    height, width = size
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randint(0, height), rng.randint(0, width)
    yl, yh = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + (cut_h + 1) // 2, 0, height)
    xl, xh = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + (cut_w + 1) // 2, 0, width)
    return 1.0 - (yh - yl) * (xh - xl) / float(height * width), (int(yl), int(yh), int(xl), int(xh))


def soft_targets(labels: np.ndarray, num_classes: int, lam: float, smoothing: float) -> np.ndarray:
    """timm's mixup_target: smoothed one-hot targets (off = smoothing / classes, on = 1 - smoothing + off)
    mixed with the mirror's by lambda."""
    off = smoothing / num_classes
    one_hot = np.full((len(labels), num_classes), off, np.float32)
    one_hot[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return one_hot * np.float32(lam) + one_hot[::-1] * np.float32(1.0 - lam)
