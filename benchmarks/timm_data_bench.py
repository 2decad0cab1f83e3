"""timm's training input pipeline, timed as `vit-dist bench CONFIG --data` times vit-dist's.

torchvision's ImageFolder reads ROOT/train with PIL; timm's create_transform(is_training=True) crops,
flips and augments each image; a DataLoader batches them with --workers worker processes; timm's
Mixup mixes each batch in the main process (as timm's train.py does without its CUDA prefetcher).
The first batch (worker start-up) is not timed; then --batches batches are, and images/s is their
images over their time. Per core is images/s over --workers; CPU per image is the CPU time of the
main process and its workers over the timed batches, per image.

Each option mirrors the vit-dist data.* key of the same name and default, so that one recipe reads
the same in both programs (benchmarks/README.md lists the pairs). Two differences are timm's own:
random erasing uses per-pixel random values (timm's re_mode "pixel"), and create_transform drops
color jitter whenever --rand-augment is set (as timm's and DeiT's training do).

Needs torch, torchvision and timm (the test extra); of vit-dist only its CPU-time reader
(vit_dist.host.cpu_time, which imports no MindSpore), so both programs count CPU alike.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="an ImageFolder root holding train/<class>/*.jpg (vit-dist demo-data OUT --photos N)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--batches", type=int, default=20, help="timed batches (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic"))
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0))
    p.add_argument("--crop-ratio", type=float, nargs=2, default=(0.75, 1.333))
    p.add_argument("--hflip-prob", type=float, default=0.5)
    p.add_argument("--color-jitter", type=float, default=0.0)
    p.add_argument("--rand-augment", help='timm\'s RandAugment string, e.g. "rand-m9-mstd0.5-inc1" (default: none)')
    p.add_argument("--random-erasing", type=float, default=0.0, help="probability (timm's re_prob)")
    p.add_argument("--mixup-alpha", type=float, default=0.0)
    p.add_argument("--cutmix-alpha", type=float, default=0.0)
    p.add_argument("--mixup-prob", type=float, default=1.0)
    p.add_argument("--mixup-switch-prob", type=float, default=0.5)
    p.add_argument("--label-smoothing", type=float, default=0.1, help="folded into Mixup's soft targets")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line, last")
    args = p.parse_args()
    if not (Path(args.root) / "train").is_dir():
        p.error(f"{args.root}/train does not exist; write a folder with vit-dist demo-data OUT --photos N")
    if args.batches < 1 or args.workers < 1:
        p.error("--batches and --workers must be at least 1")
    return args


def build_loader(args):
    """ImageFolder with timm's train transform, in a shuffled DataLoader; and timm's Mixup, or None."""
    import torch
    from timm.data import Mixup, create_transform
    from torchvision.datasets import ImageFolder

    transform = create_transform(
        args.image_size, is_training=True, scale=tuple(args.crop_scale), ratio=tuple(args.crop_ratio),
        hflip=args.hflip_prob, color_jitter=args.color_jitter or None, auto_augment=args.rand_augment,
        interpolation=args.interpolation, re_prob=args.random_erasing, re_mode="pixel", re_count=1)
    dataset = ImageFolder(str(Path(args.root) / "train"), transform=transform)
    # Persistent workers: a pass into a second epoch does not restart them inside the timed batches.
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    mixup = None
    if args.mixup_alpha > 0 or args.cutmix_alpha > 0:
        mixup = Mixup(mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, label_smoothing=args.label_smoothing,
                      num_classes=len(dataset.classes))
    return transform, loader, mixup


def batches(loader, mixup):
    """Batches forever, epoch after epoch, mixed when mixup is on."""
    while True:
        for images, labels in loader:
            yield mixup(images, labels) if mixup else (images, labels)


def main() -> None:
    args = parse_args()
    import torch

    from vit_dist.host.cpu_time import cpu_seconds

    torch.manual_seed(args.seed)
    transform, loader, mixup = build_loader(args)
    stream = batches(loader, mixup)
    started = time.perf_counter()
    next(stream)
    startup = time.perf_counter() - started
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for _ in range(args.batches):
        next(stream)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    images = args.batches * args.batch_size
    rate = images / elapsed
    result = {"system": "timm", "images_per_sec": rate, "images_per_sec_per_core": rate / args.workers,
              "cpu_ms_per_image": 1000 * cpu / images,
              "workers": args.workers, "batches": args.batches, "batch_size": args.batch_size,
              "startup_s": startup, "mixup": mixup is not None,
              "transform": [type(t).__name__ for t in transform.transforms]}
    print(f"timm input pipeline: {rate:.1f} images/s ({args.workers} workers: {rate / args.workers:.1f} per core; "
          f"{result['cpu_ms_per_image']:.2f} ms CPU per image; {args.batches} batches of {args.batch_size}; "
          f"start-up {startup:.1f} s; "
          f"{' '.join(result['transform'])}{' + Mixup' if mixup else ''})", flush=True)
    if args.json:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
