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
from vit_dist.host.image_check import find_problems, printable

# What MindSpore's native decoder reads; other files in a class folder are not images to it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# ImageFolderDataset matches extensions exactly: ".jpg" and ".JPG" are read, ".Jpg" is not.
READ_EXTENSIONS = tuple(sorted({e for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper())}))


@dataclass(frozen=True)
class Split:
    """One split as ImageFolderDataset enumerates it, and which of those files the pipeline leaves out.
    Names are str as os.fsdecode gives them (bytes that are not UTF-8 as surrogates); printable() shows them."""
    path: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]  # "class/name": class folders in order, names in byte order within each
    hidden: tuple[int, ...] = ()  # positions in files of hidden files (".DS_Store", "._x.jpg")
    bad: tuple[tuple[int, str], ...] = ()  # (position, reason) of files the decoder would fail on
    stray: tuple[str, ...] = ()  # entries that are neither class folders nor images: ignored
    subfolders: tuple[str, ...] = ()  # folders inside class folders, which ImageFolderDataset does not read
    empty_classes: tuple[str, ...] = ()  # class folders with no image files

    @property
    def num_images(self) -> int:
        return len(self.files) - len(self.excluded)

    @property
    def excluded(self) -> frozenset[int]:
        return frozenset(self.hidden) | {position for position, _ in self.bad}

    def kept(self) -> list[int]:
        excluded = self.excluded
        return [i for i in range(len(self.files)) if i not in excluded]

    def notes(self, limit: int | None = 3) -> list[str]:
        """What the scan ignored, one line per kind, naming up to `limit` entries (None: all)."""
        def some(names) -> str:
            shown = [printable(n) for n in (names if limit is None else names[:limit])]
            return ", ".join(shown) + (", ..." if len(shown) < len(names) else "")

        path, hidden, notes = printable(self.path), [self.files[i] for i in self.hidden], []
        if hidden:
            notes.append(f"{path}: skipping {len(hidden)} hidden file(s) ({some(hidden)})")
        if self.stray:
            notes.append(f"{path}: ignoring {len(self.stray)} non-image or hidden entries ({some(self.stray)})")
        if self.subfolders:
            notes.append(f"{path}: ignoring {len(self.subfolders)} folder(s) inside class folders; images must sit "
                         f"directly in a class folder ({some(self.subfolders)})")
        if self.empty_classes:
            notes.append(f"{path}: class folder(s) with no images: {some(self.empty_classes)}; they stay classes "
                         "(so class indices match the folder list) with no samples")
        return notes


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
    """Lists root/split as ImageFolderDataset will read it; hidden class folders are not classes.
    Raises DataError only if the folder is missing; an empty split is found by split_problems."""
    path = root / split
    if not root.is_dir():
        raise DataError(f"data.root {printable(root)} does not exist; point data.root at a folder holding train/ "
                        "and val/ (vit-dist demo-data OUT writes one)")
    if not path.is_dir():
        raise DataError(f"data.root {printable(root)} has no {split}/ folder; put one folder per class under "
                        f"{printable(path)}")
    entries = sorted(path.iterdir(), key=lambda p: os.fsencode(p.name))
    classes = tuple(p.name for p in entries if p.is_dir() and not p.name.startswith("."))
    files, hidden, subfolders, empty = [], [], [], []
    stray = [p.name for p in entries if not p.is_dir() or p.name.startswith(".")]
    for name in classes:
        images, strays, folders = _class_files(path / name)
        hidden += [len(files) + i for i, image in enumerate(images) if image.startswith(".")]
        files += [f"{name}/{image}" for image in images]
        stray += [f"{name}/{f}" for f in strays]
        subfolders += [f"{name}/{d}" for d in folders]
        if len(images) == sum(image.startswith(".") for image in images):
            empty.append(name)
    return Split(path, classes, tuple(files), tuple(hidden), stray=tuple(stray), subfolders=tuple(subfolders),
                 empty_classes=tuple(empty))


def _encodes(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def split_problems(split: Split) -> list[str]:
    """What stops training on this split, besides bad files: names MindSpore cannot be given (it takes
    paths and class names as UTF-8), or no image to read at all, or none that decodes."""
    path = printable(split.path)
    problems = []
    if not _encodes(str(split.path.resolve())):
        problems.append(f"{path}: the path is not UTF-8, which MindSpore cannot open; rename the folders on it")
    problems += [f"{printable(split.path / name)}: the class folder's name is not UTF-8, which MindSpore cannot "
                 "take as a class; rename it" for name in split.classes if not _encodes(name)]
    if len(split.files) == len(split.hidden):
        problems.append(f"{path} holds no images in class folders; expected {path}/<class>/<image>.jpg|png")
    elif split.num_images == 0 and split.bad:
        problems.append(f"{path}: all {len(split.bad)} image files are ones the decoder would fail on, the first "
                        f"{printable(split.files[split.bad[0][0]])} ({split.bad[0][1]}); replace them "
                        f"(vit-dist check-data {printable(split.path.parent)} lists all)")
    return problems


def class_mismatch(train: Split, val: Split) -> str | None:
    """The difference between the splits' class folders, as a problem, or None if they match."""
    if train.classes == val.classes:
        return None
    only_train = [printable(c) for c in sorted(set(train.classes) - set(val.classes), key=os.fsencode)]
    only_val = [printable(c) for c in sorted(set(val.classes) - set(train.classes), key=os.fsencode)]
    return (f"class folders differ between {printable(train.path)} and {printable(val.path)}: "
            f"only in train {only_train}, only in val {only_val}; give both splits the same classes")


def class_indexing(train: Split, val: Split) -> dict[str, int]:
    """One class->index mapping for both splits (sorted folder names), or an error naming the difference."""
    mismatch = class_mismatch(train, val)
    if mismatch:
        raise DataError(mismatch)
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


def _refuse(problems: list[str]) -> None:
    if problems:
        raise DataError(problems[0])


def _structure_problems(train: Split, val: Split) -> list[str]:
    mismatch = class_mismatch(train, val)
    return split_problems(train) + split_problems(val) + ([mismatch] if mismatch else [])


def scan_dataset(cfg: DataConfig) -> tuple[Split, Split, dict[str, int]]:
    """Checks data.root before anything is built: both splits present, non-empty, same classes."""
    root = Path(cfg.root)
    train, val = scan_split(root, "train"), scan_split(root, "val")
    _refuse(_structure_problems(train, val))
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
        return [f"{printable(split.path / split.files[i])}: {reason}" for split in (self.train, self.val)
                for i, reason in split.bad]

    def report(self) -> list[str]:
        """What the scan ignored or will skip, in a few lines."""
        bad = self.bad_files()
        lines = self.train.notes() + self.val.notes()
        if bad:
            lines.append(f"skipping {len(bad)} image file(s) the decoder would fail on ({bad[0]}"
                         f"{', ...' if len(bad) > 1 else ''}); vit-dist check-data "
                         f"{printable(self.train.path.parent)} lists them")
        return lines

    def record(self) -> dict:
        """What the run directory keeps, so that the workers of a job need not decode every image again.
        JSON escapes names that are not UTF-8 (\\udcNN), and reads them back the same."""
        return {"digest": self.digest,
                "bad": {"train": [list(b) for b in self.train.bad], "val": [list(b) for b in self.val.bad]}}


def check_images(split: Split, cache: Path, show: bool = False) -> Split:
    """The split with every file the decoder would fail on marked bad, with the reason (answers kept in
    the user's cache folder `cache`; progress on stderr if `show`)."""
    candidates = [i for i in range(len(split.files)) if i not in split.hidden]
    problems = find_problems(split.path, [split.files[i] for i in candidates], cache, show=show)
    return dataclasses.replace(split, bad=tuple((candidates[j], reason) for j, reason in problems.items()))


def _listing_digest(root: Path, train: Split, val: Split) -> str:
    listing = (os.fsencode(root.resolve()),) + tuple(map(os.fsencode, train.files + ("",) + val.files))
    return hashlib.sha256(b"\n".join(listing)).hexdigest()


def scan_and_check(cfg: DataConfig, cache: Path, record: dict | None = None, show: bool = False) -> DataScan:
    """Lists both splits and refuses, in one line, what stops training (a class mismatch, an empty
    split, a name MindSpore cannot take) before the slow part; then finds the bad images, or takes
    them from a record (DataScan.record) of the same file listing (progress on stderr if `show`); then
    refuses a split with no good image."""
    root = Path(cfg.root)
    train, val = scan_split(root, "train"), scan_split(root, "val")
    _refuse(_structure_problems(train, val))
    classes, digest = class_indexing(train, val), _listing_digest(root, train, val)
    if record and record.get("digest") == digest:
        bad = {split: tuple((int(i), str(reason)) for i, reason in record["bad"][split]) for split in ("train", "val")}
        scan = DataScan(dataclasses.replace(train, bad=bad["train"]), dataclasses.replace(val, bad=bad["val"]),
                        classes, digest, fresh=False)
    else:
        scan = DataScan(check_images(train, cache, show), check_images(val, cache, show), classes, digest, fresh=True)
    _refuse(split_problems(scan.train) + split_problems(scan.val))
    return scan


@dataclass(frozen=True)
class Survey:
    """Everything vit-dist check-data says about a data.root: notes (what is ignored, harmless) and
    problems (what stops or changes training: bad files, missing or mismatched splits, names)."""
    notes: list[str]
    problems: list[str]
    bad: int
    checked: int


def survey(root: Path, cache: Path) -> Survey:
    """Every problem of data.root at once: nothing here stops at the first. Progress goes to stderr."""
    splits, problems = [], []
    for name in ("train", "val"):
        try:
            splits.append(check_images(scan_split(root, name), cache, show=True))
        except DataError as err:  # a missing split: say so, and check the other
            if not root.is_dir():
                raise
            problems.append(str(err))
    bad = [f"{printable(s.path / s.files[i])}: {reason}" for s in splits for i, reason in s.bad]
    problems = bad + problems + [p for s in splits for p in split_problems(s)]
    if len(splits) == 2 and class_mismatch(*splits):
        problems.append(class_mismatch(*splits))
    return Survey([n for s in splits for n in s.notes(limit=None)], problems, len(bad),
                  sum(len(s.files) - len(s.hidden) for s in splits))
