"""What a rank of a launched job tells its launcher (launch/common.sh) through files in the run
directory: a heartbeat the hang watchdog reads, and, after a stop on a signal, where the run stopped.
No MindSpore here: the launcher's side of the format is bash."""
from __future__ import annotations

import atexit
import os
import shlex
import time
from pathlib import Path
from typing import Sequence

from vit_dist.host.atomic import write_atomic

HEARTBEAT_DIR = ("logs", "heartbeat")
# Written by rank 0 once the ranks stopped on a signal and it saved: "SIGNAME STEP CHECKPOINT". The
# ranks of a launched job then exit 0 (see training.components.Preemption) and the launcher exits 128+signal.
STOPPED_FILE = ("logs", "stopped")
WIDTH = 160  # every line is padded to this, so that an in-place rewrite leaves no tail of a longer one


class Heartbeat:
    """RUN_DIR/logs/heartbeat/<rank>: one line, rewritten in place as the rank makes progress,
    "JOB TIME PID PROGRESS WHAT". JOB is the launcher's id of this attempt (a line an earlier attempt
    left is ignored), TIME this host's clock in seconds (a shared file system's server may set the
    mtime by its own), PROGRESS 2 x steps done, plus 1 once the next batch is in hand (a rank stuck
    before a collective is behind the ranks waiting in it), WHAT for people. Silent until the first
    completed step, since a first step's graph compile may take minutes; removed as the process exits,
    so that a rank done before the others is not taken for a hung one. Outside a launcher (no JOB):
    nothing is written."""

    def __init__(self, run_dir: Path, rank: int, job: str):
        self.path = Path(run_dir).joinpath(*HEARTBEAT_DIR, str(rank))
        self.job = job
        self.fd = None

    def step_done(self, step: int) -> None:
        if self.fd is None and self.job:
            self._arm()
        self._beat(2 * step, f"step {step} done")

    def batch_ready(self, step: int) -> None:
        """The batch of step+1 is in hand: the rank is about to meet the others."""
        self._beat(2 * step + 1, f"batch of step {step + 1} in hand")

    def busy(self, step: int, what: str) -> None:
        """Evaluating or saving after `step`: the others may be waiting, no further ahead."""
        self._beat(2 * step, what)

    def _arm(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        atexit.register(self.path.unlink, missing_ok=True)

    def _beat(self, progress: int, what: str) -> None:
        if self.fd is None:
            return
        line = f"{self.job} {int(time.time())} {os.getpid()} {progress} {what}"[:WIDTH - 1].ljust(WIDTH - 1)
        os.pwrite(self.fd, f"{line}\n".encode(), 0)  # one small write: a reader sees the old line or the new


def write_stopped(run_dir: Path, signal_name: str, step: int, checkpoint: Path | None) -> None:
    path = Path(run_dir).joinpath(*STOPPED_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, f"{signal_name} {step} {checkpoint or 'none'}\n")


def resume_command(argv: Sequence[str], run_dir: Path) -> str:
    """`vit-dist ARGS` as this process was started, resuming in its run directory (later --set
    values override earlier ones)."""
    return shlex.join(["vit-dist", *argv, "--set", "train.resume=auto", f"train.output_dir={run_dir}"])
