"""Rank 0's run record: the resolved config, one log line and one JSON object per interval (and, with
train.tensorboard, TensorBoard scalars from the same records), eval.json.

Every rank calls the same methods; only the main rank writes, so callers never branch on rank. Also
what a run directory holds before its run gets going, and its removal after a command that failed
before it started.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from vit_dist.host.atomic import write_atomic
from vit_dist.host.config import Config, dump_yaml
from vit_dist.host.errors import OutputError, UserError
from vit_dist.host.tensorboard_events import TENSORBOARD_DIR, TensorBoardEvents

CONFIG_FILE = "config.yaml"
DATA_CHECK_FILE = "data_check.json"
EVAL_FILE = "eval.json"
METRICS_FILE = "metrics.jsonl"
CLASSES_FILE = "classes.json"  # class names in index order: written by training and import-weights, read by infer
# RUN_DIR/logs/pids/<pid> holds "RANK JOB" of the worker with that pid (bootstrap.announce_worker).
PIDS_DIR = ("logs", "pids")
# What a command writes into its run directory before the run gets going: its first step, its result.
START_UP_FILES = (CONFIG_FILE, CLASSES_FILE, DATA_CHECK_FILE)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):  # no timed step yet in the interval
        return "?"
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_train_line(record: dict) -> str:
    line = (f"step {record['step']}/{record['total_steps']} epoch {record['epoch']} loss {record['loss']:.4f} "
            f"lr {record['lr']:.3e} img/s {record['images_per_sec']:.1f} "
            f"data {100 * record['data_wait']:.0f}% eta {format_duration(record['eta_s'])} "
            f"step time {_ms(record['step_time_fastest_s'])}-{_ms(record['step_time_slowest_s'])} ms "
            f"(slowest rank {record['slowest_rank']})")
    if "loss_scale" in record:
        line += f" scale {record['loss_scale']:g} overflows {record['overflows']} skipped {record['skipped_steps']}"
    return line


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}" if math.isfinite(seconds) else "?"


def format_eval_line(record: dict) -> str:
    line = (f"eval epoch {record['epoch']} top1 {100 * record['top1']:.2f}% top5 {100 * record['top5']:.2f}% "
            f"loss {record['val_loss']:.4f} images {record['images']}")
    if "ema_top1" in record:
        line += (f" ema top1 {100 * record['ema_top1']:.2f}% top5 {100 * record['ema_top5']:.2f}% "
                 f"loss {record['ema_val_loss']:.4f}")
    return line


def stamped(line: str) -> str:
    """The line behind the time in UTC, `2026-12-05 21:03:07 `. An `error: ` line stays as it is: errors are
    one line that starts with `error: `, wherever they come from."""
    if line.startswith("error: "):
        return line
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} {line}"


def say(message: str, is_main: bool) -> None:
    """One line on the job's console, stamped: rank 0's stderr."""
    if is_main:
        print(stamped(message), file=sys.stderr, flush=True)


class RunRecord:
    def __init__(self, run_dir: Path, is_main: bool):
        self.run_dir = run_dir
        self.is_main = is_main
        self.tensorboard = None

    def open_tensorboard(self, start_step: int) -> None:
        """From now on log() also writes TensorBoard scalars (rank 0); start_step: where training stands."""
        if self.is_main:
            self.tensorboard = TensorBoardEvents(self.run_dir, start_step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def write_config(self, cfg: Config, note: str = "") -> None:
        """RUN_DIR/config.yaml, loadable as a config; `note`, if any, as a comment line above it."""
        self._write(CONFIG_FILE, (f"# {note}\n" if note else "") + dump_yaml(cfg))

    def write_classes(self, classes: dict[str, int]) -> None:
        """The class names in index order, so that inference can name predictions without the dataset."""
        self._write(CLASSES_FILE, json.dumps(sorted(classes, key=classes.get)) + "\n")

    def log(self, record: dict, line: str) -> None:
        """Prints the line, stamped, and appends the record to metrics.jsonl (and its curves to TensorBoard)."""
        if not self.is_main:
            return
        print(stamped(line), flush=True)
        path = self.run_dir / METRICS_FILE
        with _writing(path):
            # O_NOFOLLOW: a planted symlink does not redirect the append; a reader skips a partial last line.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            with os.fdopen(fd, "a") as out:
                out.write(json.dumps(_finite(record)) + "\n")
        if self.tensorboard is not None:
            with _writing(self.run_dir / TENSORBOARD_DIR):
                self.tensorboard.write(_finite(record))

    def write_data_check(self, record: dict) -> None:
        self._write(DATA_CHECK_FILE, json.dumps(record))

    def write_eval(self, result: dict, name: str = EVAL_FILE) -> None:
        """The evaluation's result as RUN_DIR/<name>, atomically."""
        self._write(name, json.dumps(result) + "\n")

    def _write(self, name: str, text: str) -> None:
        if self.is_main:
            with _writing(self.run_dir / name):
                write_atomic(self.run_dir / name, text)

    def write_plot(self) -> None:
        """RUN_DIR/curves.png; a missing matplotlib (the optional `plot` extra) is one line, not a failure."""
        if not self.is_main:
            return
        from vit_dist.tools.plot import plot_run

        try:
            self.say(f"wrote {plot_run(self.run_dir)}")
        except UserError as err:  # no matplotlib, or nothing to plot
            self.say(f"no plot: {err}")

    def say(self, message: str) -> None:
        say(message, self.is_main)


@contextmanager
def _writing(path: Path):
    """A failed write of a run file (a full disk, say) as one line with the fix."""
    try:
        yield
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror}); free disk space or set train.output_dir "
                          "elsewhere, then resume with train.resume=auto: the checkpoints are intact") from None


def _finite(record: dict) -> dict:
    # JSON has no NaN/inf: a diverged loss is written as null rather than breaking readers.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def read_data_check(run_dir: Path) -> dict | None:
    """The run's data-scan record, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((run_dir / DATA_CHECK_FILE).read_text())
    except (OSError, ValueError):
        return None


def remove_unstarted_run_dir(run_dir: Path) -> None:
    """Removes run_dir if it holds nothing but what a command writes before its run gets going (the
    resolved config, the class names, the data check, pid files; empty folders): the trace of a command
    that failed before it started. Anything else, a checkpoint, metrics, a heartbeat or a result, keeps
    the directory whole."""
    for folder, _, files in os.walk(run_dir):
        where = Path(folder).relative_to(run_dir)
        if files and not (where == Path(*PIDS_DIR) or where == Path(".") and set(files) <= set(START_UP_FILES)):
            return
    shutil.rmtree(run_dir, ignore_errors=True)
