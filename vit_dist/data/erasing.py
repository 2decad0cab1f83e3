"""timm's RandomErasing as DeiT uses it (mode 'pixel', one box), in numpy, on a normalised CHW image.

MindSpore's vision.RandomErasing does not fit: it draws the aspect ratio uniformly in [0.3, 3.3] (timm
log-uniformly, so wide and tall boxes are equally likely), and it draws from Python's and numpy's global
generators, shared by the map's worker threads in whatever order they run, so neither a rerun nor a
resumed run draws the same boxes. Here the generator is the caller's (batch_augment.py keys it by batch)."""
from __future__ import annotations

import math

import numpy as np

AREA = (0.02, 1 / 3)  # of the image
LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ATTEMPTS = 10


def random_erase(image: np.ndarray, prob: float, rng: np.random.RandomState) -> None:
    """With probability prob, replaces a box of the image (float32 [C, H, W], in place) by standard
    normal values, one per pixel and channel; draws as timm's RandomErasing._erase draws from `random`
    (uniform area and log aspect, up to 10 tries for a box that fits, then its top-left corner)."""
    if rng.random_sample() > prob:
        return
    channels, height, width = image.shape
    for _ in range(ATTEMPTS):
        area = rng.uniform(*AREA) * height * width
        aspect = math.exp(rng.uniform(*LOG_ASPECT))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
            top, left = rng.randint(0, height - h + 1), rng.randint(0, width - w + 1)
            image[:, top:top + h, left:left + w] = rng.standard_normal((channels, h, w))
            return
