"""Every check of a job that needs no MindSpore, run once by the launcher and again (cheaply) by each
worker before its backend starts: data folders and image files, batch against shard, pretrained
weights, the run directory."""
from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

from vit_dist.host import datascan
from vit_dist.host.checkpoint_files import SUFFIX, checkpoint_dir
from vit_dist.host.config import Config, check_profile_steps, scaled_lr
from vit_dist.host.errors import ConfigError, DataError
from vit_dist.host.placement import ParallelDims
from vit_dist.host.run_record import RunRecord, read_data_check
from vit_dist.host.tensorboard_events import require_tensorboard


def resolve_run_dir(cfg: Config) -> Path:
    """train.output_dir, or a new runs/<timestamp>-<random> that no other run can collide with."""
    if cfg.train.output_dir is None:
        cfg.train.output_dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    return Path(cfg.train.output_dir)


def prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to train.output_dir {run_dir}: {err.strerror}; "
                          "choose a writable directory with --set train.output_dir=PATH") from None


def refuse_used_run_dir(run_dir: Path) -> None:
    """One run per directory: a new run into a folder that holds another run's checkpoints or metrics
    would overwrite the one and mix into the other (and report its best checkpoint)."""
    used = [name for name in ("metrics.jsonl", "eval.json") if (run_dir / name).exists()]
    used += [f"checkpoints/{p.name}" for p in sorted(checkpoint_dir(run_dir).glob(f"*{SUFFIX}"))[:1]]
    if used:
        raise ConfigError(f"train.output_dir {run_dir} already holds a run ({', '.join(used)}); continue it with "
                          f"--set train.resume=auto, or start this one in a new train.output_dir")


def preflight(cfg: Config, world_size: int, is_main: bool, reuse_record: bool, cache: Path,
              training: bool = False) -> tuple[Path, datascan.DataScan]:
    """Checks the data and the run for a job of world_size ranks. The main process says what the data
    scan found once and records it in the run directory; with reuse_record, that record (for the same
    file listing) stands in for decoding every image again; `cache` is the user's cache folder. A training run that does not resume
    must have a run directory of its own. Returns (run directory, scan)."""
    run_dir = resolve_run_dir(cfg)
    cores = os.cpu_count() or 1
    if cfg.data.num_workers > cores:  # MindSpore's own refusal comes later, as a traceback
        raise ConfigError(f"data.num_workers {cfg.data.num_workers} is more than this machine's {cores} cores; "
                          f"set data.num_workers to at most {cores}")
    if is_main and training and cfg.train.resume is None:
        refuse_used_run_dir(run_dir)
    scan = datascan.scan_and_check(cfg.data, cache, read_data_check(run_dir) if reuse_record else None, is_main)
    bad = scan.bad_files()
    if bad and cfg.data.on_bad_image == "error":
        raise DataError(f"{len(bad)} image file(s) the decoder would fail on, the first {bad[0]}; remove them "
                        f"(vit-dist check-data {cfg.data.root} lists all) or set data.on_bad_image=skip")
    if is_main and scan.fresh:
        for line in scan.report():
            print(line, file=sys.stderr, flush=True)
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        raise ConfigError(f"model.pretrained {cfg.model.pretrained} does not exist; write it with vit-dist "
                          "import-weights, or set model.pretrained=null")
    dims = ParallelDims.of(cfg, world_size)
    per_epoch = datascan.steps_per_epoch(scan.train.num_images, dims.dp, cfg.train.batch_size,
                                         cfg.parallel.grad_accumulation)
    if training:
        scaled_lr(cfg.train, dims.global_batch)  # a rate scaled below train.min_lr: one line before anything starts
        check_profile_steps(cfg.train, per_epoch)
        if cfg.train.tensorboard:
            require_tensorboard()
    if cfg.model.num_classes is not None and cfg.model.num_classes < len(scan.classes):
        raise ConfigError(f"model.num_classes {cfg.model.num_classes} is less than the {len(scan.classes)} class "
                          f"folders in {scan.train.path}; set model.num_classes to null or >= {len(scan.classes)}")
    if is_main:
        prepare_run_dir(run_dir)
        if scan.fresh:
            RunRecord(run_dir, True).write_data_check(scan.record())
    return run_dir, scan
