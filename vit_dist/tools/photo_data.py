"""An ImageFolder of ImageNet-size JPEG photos cut from the color photos scikit-image ships, for timing
the input pipeline (`vit-dist bench --data`) on files like ImageNet's: about 500x375, JPEG, in class
folders. Not a dataset to learn from: each class is one photo, cut differently every time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vit_dist.host.errors import ConfigError, DependencyError

# scikit-image's natural color photos that its wheel holds (no download), one class each.
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
          "stereo_motorcycle")
SIZE = (500, 375)  # ImageNet's most common shape; a quarter of the cuts are portrait (375x500)
QUALITY = 90
VAL_EVERY = 10  # the first of every 10 cuts of a photo goes to val


def _photos() -> dict[str, Image.Image]:
    try:
        from skimage import data
    except ImportError:
        raise DependencyError("demo-data --photos needs scikit-image; pip install 'vit-dist[bench]'") from None
    photos = {}
    for name in PHOTOS:
        pixels = getattr(data, name)()
        photos[name] = Image.fromarray(pixels[0] if name == "stereo_motorcycle" else pixels)  # (left, right, disparity)
    return photos


def _cut(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop of the photo's shape (75-100% of the largest that fits), resized to 500x375 or
    375x500, mirrored half the time."""
    width, height = SIZE if rng.random() < 0.75 else SIZE[::-1]
    fit = min(photo.width / width, photo.height / height) * rng.uniform(0.75, 1.0)
    w, h = int(width * fit), int(height * fit)
    x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
    image = photo.crop((x, y, x + w, y + h)).resize((width, height), Image.BICUBIC)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def write_photo_data(out: str | Path, count: int, seed: int = 0) -> dict[str, int]:
    """Writes `count` JPEGs (quality 90) as OUT/{train,val}/<photo>/<index>.jpg, the photos taking
    turns; every class has images in both splits. The same count and seed write the same files.
    Returns the images per split."""
    if count < VAL_EVERY * len(PHOTOS):
        raise ConfigError(f"--photos {count}: write at least {VAL_EVERY * len(PHOTOS)} (each of the "
                          f"{len(PHOTOS)} photos {VAL_EVERY} times, one of them for val)")
    photos, rng, out = _photos(), np.random.default_rng(seed), Path(out)
    counts = {"train": 0, "val": 0}
    for index in range(count):
        name = PHOTOS[index % len(PHOTOS)]
        split = "val" if (index // len(PHOTOS)) % VAL_EVERY == 0 else "train"
        folder = out / split / name
        folder.mkdir(parents=True, exist_ok=True)
        _cut(photos[name], rng).save(folder / f"{index:06d}.jpg", quality=QUALITY)
        counts[split] += 1
    return counts
