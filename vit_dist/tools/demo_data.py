"""The built-in demo dataset: scikit-learn's 1797 real handwritten digits as an ImageFolder of PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vit_dist.host.errors import DependencyError

VAL_EVERY = 5  # every 5th image of a class goes to val: a deterministic 80/20 split


def write_demo_data(out: str | Path, image_size: int = 32) -> dict[str, int]:
    """Writes OUT/{train,val}/<digit>/<index>.png (grayscale, upscaled from 8x8); returns counts per split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DependencyError("demo-data needs scikit-learn; pip install 'vit-dist[demo]'") from None
    digits = load_digits()
    out = Path(out)
    counts = {"train": 0, "val": 0}
    seen_per_class: dict[int, int] = {}
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        label = int(label)
        nth = seen_per_class.get(label, 0)
        seen_per_class[label] = nth + 1
        split = "val" if nth % VAL_EVERY == VAL_EVERY - 1 else "train"
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        # Values are 0..16 ink levels; scale to 0..255 and upscale smoothly to the model's size.
        image = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        image.resize((image_size, image_size), Image.BICUBIC).save(folder / f"{index:04d}.png")
        counts[split] += 1
    return counts
