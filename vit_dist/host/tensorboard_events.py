"""train.tensorboard: rank 0's metrics records as TensorBoard scalars in RUN_DIR/tensorboard, keyed by
global step, through the tensorboard package's own event writer (the optional `tensorboard` extra, which
also views them; it needs neither TensorFlow nor torch)."""
from __future__ import annotations

import importlib.util
import secrets
import time
from pathlib import Path

from vit_dist.host.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
INSTALL = "pip install 'vit-dist[tensorboard]'"
# metrics.jsonl key -> TensorBoard tag; a record's other keys (counts, eta) are not curves worth a panel.
TAGS = {
    "loss": "train/loss", "lr": "train/lr", "images_per_sec": "train/images_per_sec", "data_wait": "train/data_wait",
    "loss_scale": "train/loss_scale", "step_time_fastest_s": "train/step_time_fastest_s",
    "step_time_slowest_s": "train/step_time_slowest_s",
    "top1": "val/top1", "top5": "val/top5", "val_loss": "val/loss",
    "ema_top1": "val/ema_top1", "ema_top5": "val/ema_top5", "ema_val_loss": "val/ema_loss",
}


def require_tensorboard() -> None:
    """train.tensorboard without the tensorboard package: one line with the install command, before anything
    starts."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(f"train.tensorboard needs the tensorboard package, which is not installed; {INSTALL}, or "
                          "set train.tensorboard=false")


class TensorBoardEvents:
    """One event file per attempt in run_dir/tensorboard. A resumed attempt from step S marks its file
    with purge step S+1: TensorBoard then hides what an earlier attempt logged after S (the steps the
    resume trains again), so a curve shows each step once."""

    def __init__(self, run_dir: Path, start_step: int):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        # The writer opens its file with "wb" under a predictable name (second, host, pid): an unguessable
        # suffix keeps a link planted at that name from being written through.
        self.writer = EventFileWriter(str(run_dir / TENSORBOARD_DIR), filename_suffix=f".{secrets.token_hex(8)}")
        if start_step:
            self.writer.add_event(Event(wall_time=time.time(), step=start_step + 1,
                                        session_log=SessionLog(status=SessionLog.START)))

    def write(self, record: dict) -> None:
        """The record's curves at its step, flushed (a log interval's few scalars: a crash loses none)."""
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=float(record[key])) for key, tag in TAGS.items()
                  if record.get(key) is not None]
        self.writer.add_event(Event(wall_time=time.time(), step=record["step"], summary=Summary(value=values)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
