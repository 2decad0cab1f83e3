"""What each of the recipe's augmentation options costs in vit-dist's training input pipeline.

On a folder of JPEG photos of ImageNet size (500x375, cut from the colour photos scikit-image ships;
made on the first run), times benchmark config A's pipeline (224 px, batch 32, 2 workers, decode +
crop + flip + the option + batch) once per option per round, each in a fresh process, and prints a
Markdown table: CPU time per image over all the pipeline's threads (the figure that holds on a busy
machine), and wall images/s. Medians over the rounds.

    python benchmarks/augment_cost.py [--root /tmp/augment_jpegs] [--rounds 3] [--batches 40]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RECIPE = ["data.interpolation=bicubic", "data.rand_augment=rand-m9-mstd0.5-inc1", "data.random_erasing=0.25",
          "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0"]
OPTIONS = {
    "crop + flip (base)": [],
    "+ interpolation bicubic": ["data.interpolation=bicubic"],
    "+ color_jitter 0.3": ["data.color_jitter=0.3"],
    "+ rand_augment rand-m9-mstd0.5-inc1": ["data.rand_augment=rand-m9-mstd0.5-inc1"],
    "+ random_erasing 0.25": ["data.random_erasing=0.25"],
    "+ mixup_alpha 0.8, cutmix_alpha 1.0": ["data.mixup_alpha=0.8", "data.cutmix_alpha=1.0"],
    "DeiT's recipe (all but color jitter)": RECIPE,
}

# One measurement: the pipeline's first batch (start-up) untimed, then `batches` batches.
MEASURE = r'''
import json, sys, time
from vit_dist.data import pipeline
from vit_dist.host import datascan
from vit_dist.host.config import load_config
root, batches, *overrides = sys.argv[1:]
cfg = load_config("vit_dist/configs/bench/vit_ti16_224.yaml", [f"data.root={root}", "train.batch_size=32",
                                                      "data.num_workers=2", *overrides])
split, _, classes = datascan.scan_dataset(cfg.data)
iterator = pipeline.train_dataset(cfg, split, classes, 0, 1, 32).create_tuple_iterator(num_epochs=100,
                                                                                       output_numpy=True)
stream = (batch for _ in range(100) for batch in iterator)
next(stream)
wall, cpu = time.perf_counter(), time.process_time()
for _ in range(int(batches)):
    next(stream)
images = int(batches) * 32
print(json.dumps({"cpu_ms": 1000 * (time.process_time() - cpu) / images,
                  "images_per_s": images / (time.perf_counter() - wall)}))
'''


def make_photos(root: Path, per_class: int = 128) -> None:
    """2 classes of 500x375 JPEGs (quality 90), random crops of scikit-image's colour photos."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [Image.fromarray(p[..., :3]) for p in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
                                                    data.hubble_deep_field(), data.immunohistochemistry(),
                                                    data.retina(), data.colorwheel())]
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 8)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                photo = photos[rng.integers(len(photos))]
                scale = rng.uniform(1.0, 2.0) * max(500 / photo.width, 375 / photo.height)
                big = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1), Image.BICUBIC)
                x, y = rng.integers(0, big.width - 499), rng.integers(0, big.height - 374)
                big.crop((x, y, x + 500, y + 375)).save(folder / f"{i:03d}.jpg", quality=90)


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/augment_jpegs"), help="made on the first run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=40, help="timed batches of 32 per measurement")
    args = p.parse_args()
    if not (args.root / "train").is_dir():
        make_photos(args.root)
    repo = Path(__file__).resolve().parents[1]
    runs = {name: [] for name in OPTIONS}
    for _ in range(args.rounds):
        for name, overrides in OPTIONS.items():
            out = subprocess.run([sys.executable, "-c", MEASURE, str(args.root), str(args.batches), *overrides],
                                 cwd=repo, capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    base = median([r["cpu_ms"] for r in runs["crop + flip (base)"]])
    print("| pipeline | CPU ms per image | added | images/s per core | wall images/s, 2 workers |")
    print("| --- | --- | --- | --- | --- |")
    for name, results in runs.items():
        cpu = median([r["cpu_ms"] for r in results])
        print(f"| {name} | {cpu:.2f} | {cpu - base:+.2f} | {1000 / cpu:.0f} | "
              f"{median([r['images_per_s'] for r in results]):.0f} |")


if __name__ == "__main__":
    main()
