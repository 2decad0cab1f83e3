"""The ImageFolder scan: both splits listed as ImageFolderDataset reads them, checked (classes,
bad image files) before anything compiles, so a missing split or a class mismatch is one clear
line; and the shard arithmetic (images per rank, steps per epoch)."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

from vit_dist.host.config import DataConfig
from vit_dist.host.errors import ConfigError, DataError
from vit_dist.host.image_check import find_problems

# What MindSpore's native decoder reads; other files in a class folder are not images to it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# ImageFolderDataset matches extensions exactly: ".jpg" and ".JPG" are read, ".Jpg" is not.
READ_EXTENSIONS = tuple(sorted({e for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper())}))


@dataclass(frozen=True)
class Split:
    """One split as ImageFolderDataset enumerates it, and which of those files the pipeline leaves out."""
    path: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]  # "class/name": class folders in order, names in byte order within each
    hidden: tuple[int, ...] = ()  # positions in files of hidden files (".DS_Store", "._x.jpg")
    bad: tuple[tuple[int, str], ...] = ()  # (position, reason) of files the decoder would fail on
    notes: tuple[str, ...] = ()  # what the scan ignored, to say once

    @property
    def num_images(self) -> int:
        return len(self.files) - len(self.excluded)

    @property
    def excluded(self) -> frozenset[int]:
        return frozenset(self.hidden) | {position for position, _ in self.bad}

    def kept(self) -> list[int]:
        excluded = self.excluded
        return [i for i in range(len(self.files)) if i not in excluded]


def is_image(path: Path) -> bool:
    """A file a user means as an image (any case of extension, not hidden), e.g. for inference."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def has_image_extension(name: str) -> bool:
    return Path(name).suffix in READ_EXTENSIONS


def _class_files(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(files ImageFolderDataset reads, in its byte order; stray files; subfolders) of one class folder.
    It reads every file with an image extension, hidden ones included, and nothing in subfolders."""
    images, stray, subfolders = [], [], []
    for entry in folder.iterdir():
        if entry.is_dir():
            subfolders.append(entry.name)
        elif has_image_extension(entry.name):
            images.append(entry.name)
        else:
            stray.append(entry.name)
    return sorted(images, key=os.fsencode), stray, subfolders


def scan_split(root: Path, split: str) -> Split:
    """Lists root/split as ImageFolderDataset will read it; hidden class folders are not classes."""
    path = root / split
    if not root.is_dir():
        raise DataError(f"data.root {root} does not exist; point data.root at a folder holding train/ and val/ "
                          "(vit-dist demo-data OUT writes one)")
    if not path.is_dir():
        raise DataError(f"data.root {root} has no {split}/ folder; put one folder per class under {path}")
    entries = sorted(path.iterdir(), key=lambda p: os.fsencode(p.name))
    classes = tuple(p.name for p in entries if p.is_dir() and not p.name.startswith("."))
    files, hidden, ignored = [], [], {"stray": [], "subfolders": [], "empty": []}
    ignored["stray"] = [p.name for p in entries if not p.is_dir() or p.name.startswith(".")]
    for name in classes:
        images, stray, subfolders = _class_files(path / name)
        hidden += [len(files) + i for i, image in enumerate(images) if image.startswith(".")]
        files += [f"{name}/{image}" for image in images]
        ignored["stray"] += [f"{name}/{f}" for f in stray]
        ignored["subfolders"] += [f"{name}/{d}" for d in subfolders]
        if len(images) == sum(image.startswith(".") for image in images):
            ignored["empty"].append(name)
    if len(files) == len(hidden):
        raise DataError(f"{path} holds no images in class folders; expected {path}/<class>/<image>.jpg|png")
    notes = _scan_notes(path, [files[i] for i in hidden], ignored)
    return Split(path, classes, tuple(files), tuple(hidden), notes=notes)


def _scan_notes(path: Path, hidden: list[str], ignored: dict[str, list[str]]) -> tuple[str, ...]:
    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    notes = []
    if hidden:
        notes.append(f"{path}: skipping {len(hidden)} hidden file(s) ({some(hidden)})")
    if ignored["stray"]:
        notes.append(f"{path}: ignoring {len(ignored['stray'])} non-image or hidden entries ({some(ignored['stray'])})")
    if ignored["subfolders"]:
        notes.append(f"{path}: ignoring {len(ignored['subfolders'])} folder(s) inside class folders; images must sit "
                     f"directly in a class folder ({some(ignored['subfolders'])})")
    if ignored["empty"]:
        notes.append(f"{path}: class folder(s) with no images: {some(ignored['empty'])}; they stay classes "
                     "(so class indices match the folder list) with no samples")
    return tuple(notes)


def class_indexing(train: Split, val: Split) -> dict[str, int]:
    """One class->index mapping for both splits (sorted folder names), or an error naming the difference."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"class folders differ between {train.path} and {val.path}: "
                          f"only in train {only_train}, only in val {only_val}; give both splits the same classes")
    return {name: index for index, name in enumerate(train.classes)}


def shard_size(num_images: int, world_size: int) -> int:
    """Images per rank: ImageFolderDataset pads every shard to this length by repeating images."""
    return math.ceil(num_images / world_size)


def steps_per_epoch(num_images: int, world_size: int, batch_size: int, accumulation: int = 1) -> int:
    """Optimizer steps per epoch; world_size counts data-parallel ranks, each step reads
    accumulation micro-batches of batch_size."""
    per_rank = shard_size(num_images, world_size)
    if batch_size * accumulation > per_rank:
        micro = f" x parallel.grad_accumulation {accumulation}" if accumulation > 1 else ""
        raise ConfigError(f"train.batch_size {batch_size}{micro} is larger than each rank's shard of {per_rank} images "
                          f"({num_images} images over {world_size} data-parallel ranks); lower train.batch_size"
                          f"{' or parallel.grad_accumulation' if micro else ''}")
    return per_rank // (batch_size * accumulation)


def scan_dataset(cfg: DataConfig) -> tuple[Split, Split, dict[str, int]]:
    """Checks data.root before anything is built: both splits present, non-empty, same classes."""
    root = Path(cfg.root)
    train, val = scan_split(root, "train"), scan_split(root, "val")
    return train, val, class_indexing(train, val)


@dataclass(frozen=True)
class DataScan:
    """Both splits with their bad images found; fresh: found now rather than read from the run's record."""
    train: Split
    val: Split
    classes: dict[str, int]
    digest: str  # of the file listing the bad-image lists belong to
    fresh: bool

    def bad_files(self) -> list[str]:
        return [f"{split.path}/{split.files[i]}: {reason}" for split in (self.train, self.val)
                for i, reason in split.bad]

    def report(self) -> list[str]:
        """What the scan ignored or will skip, in a few lines."""
        bad = self.bad_files()
        lines = list(self.train.notes + self.val.notes)
        if bad:
            lines.append(f"skipping {len(bad)} image file(s) the decoder would fail on ({bad[0]}"
                         f"{', ...' if len(bad) > 1 else ''}); vit-dist check-data {self.train.path.parent} lists them")
        return lines

    def record(self) -> dict:
        """What the run directory keeps, so that the workers of a job need not read every header again."""
        return {"digest": self.digest,
                "bad": {"train": [list(b) for b in self.train.bad], "val": [list(b) for b in self.val.bad]}}


def check_images(split: Split) -> Split:
    """The split with every file the decoder would fail on marked bad, with the reason."""
    candidates = [i for i in range(len(split.files)) if i not in split.hidden]
    problems = find_problems([split.path / split.files[i] for i in candidates])
    return dataclasses.replace(split, bad=tuple((candidates[j], reason) for j, reason in sorted(problems.items())))


def scan_and_check(cfg: DataConfig, record: dict | None = None) -> DataScan:
    """scan_dataset, then the bad-image check; a record (DataScan.record) of the same file listing
    stands in for the check."""
    train, val, classes = scan_dataset(cfg)
    listing = (str(Path(cfg.root).resolve()),) + train.files + ("",) + val.files
    digest = hashlib.sha256("\n".join(listing).encode()).hexdigest()
    if record and record.get("digest") == digest:
        bad = {split: tuple((int(i), str(reason)) for i, reason in record["bad"][split]) for split in ("train", "val")}
        return DataScan(dataclasses.replace(train, bad=bad["train"]), dataclasses.replace(val, bad=bad["val"]),
                        classes, digest, fresh=False)
    return DataScan(check_images(train), check_images(val), classes, digest, fresh=True)
