"""The training loop's components, each owning its cadence and state: IntervalLogger (timing, the
reduced loss, overflow counts, the first step's compile), Checkpointer (resume, every_n_steps and
epoch-end saves, keep_last, keep-best), Evaluator (when to evaluate, exact top-1/top-5) and
Preemption (a stop on SIGTERM or SIGINT that every rank agrees on, with a checkpoint)."""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from vit_dist.host import checkpoint_files as files
from vit_dist.host.checkpoint_files import Progress
from vit_dist.host.config import CheckpointConfig
from vit_dist.host.heartbeat import Heartbeat, resume_command, write_stopped
from vit_dist.host.placement import Placement
from vit_dist.host.run_record import RunRecord, format_eval_line, format_train_line
from vit_dist.host.weights_only import WeightsCard, keep_weights
from vit_dist.parallel.checkpoint_merge import merge
from vit_dist.parallel.data_parallel import all_gather, all_reduce_sum
from vit_dist.training import checkpoint
from vit_dist.training.assemble import Training
from vit_dist.training.evaluate import evaluate


class IntervalLogger:
    """Every log_interval steps (and at the last), rank 0 logs the loss averaged over ranks, the
    interval's throughput and data wait, and the mean step time of the fastest and the slowest rank.
    Every rank must call after_step at every step: the log is a collective, one AllGather of each
    rank's loss sum, step count and step time. The first step's graph compile is kept out of the times."""

    def __init__(self, record: RunRecord, run: Training, placement: Placement, log_interval: int,
                 total_steps: int, learning_rates: list[float], skipped: int):
        self.record, self.run, self.placement = record, run, placement
        self.log_interval, self.total_steps, self.learning_rates = log_interval, total_steps, learning_rates
        self.skipped = skipped  # steps left out for overflow since the run started, the same on every rank
        self.first_step_done = False
        self.restart()

    def restart(self) -> None:
        """Starts a new interval (after a log, or an evaluation whose time is not the step's)."""
        self.started, self.data_wait, self.untimed = time.perf_counter(), 0.0, 0
        self.losses, self.finite = [], []

    def timed(self, batches: Iterable) -> Iterator:
        """The batches, the wait for each counted as data wait."""
        iterator = iter(batches)
        while True:
            fetched = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - fetched
            yield batch

    def after_step(self, step: int, epoch: int, loss, finite) -> None:
        self.losses.append(loss)
        self.finite.append(finite)
        if not self.first_step_done:
            self.first_step_done = True
            self.record.say(f"first step (graph compile included) took {time.perf_counter() - self.started:.1f}s")
            self.run.backend.after_first_step()
            self.started, self.data_wait, self.untimed = time.perf_counter(), 0.0, 1
        if step % self.log_interval == 0 or step == self.total_steps:
            self._log(step, epoch)
            self.restart()

    def _log(self, step: int, epoch: int) -> None:
        losses = sum(float(loss.asnumpy()) for loss in self.losses)  # after every step of the interval has run
        elapsed = time.perf_counter() - self.started
        timed = len(self.losses) - self.untimed
        ranks = all_gather([losses, len(self.losses), elapsed / timed if timed else float("nan")], self.placement)
        loss_sum, count = ranks[:, :2].sum(axis=0)
        rank_times = ranks[:, 2].astype(np.float64)
        step_time = float(rank_times[self.placement.rank])
        overflows = sum(not bool(finite.asnumpy()) for finite in self.finite)
        self.skipped += overflows
        entry = {"step": step, "epoch": epoch, "total_steps": self.total_steps, "loss": float(loss_sum / count),
                 "lr": float(self.learning_rates[step - 1]),
                 "images_per_sec": self.run.dims.global_batch / step_time, "data_wait": self.data_wait / elapsed,
                 "eta_s": (self.total_steps - step) * step_time, "step_time_fastest_s": float(rank_times.min()),
                 "step_time_slowest_s": float(rank_times.max()), "slowest_rank": int(rank_times.argmax())}
        if self.run.scaler is not None:
            entry.update(loss_scale=float(self.run.scaler.scale_value.asnumpy()), overflows=overflows,
                         skipped_steps=self.skipped)
        self.record.log(entry, format_train_line(entry))


class Checkpointer:
    """Rank 0 saves the training state (under semi_auto every rank its slices) every every_n_steps
    steps within an epoch and at every epoch end, after that epoch's evaluation, keeping the last
    keep_last and the best: by val top-1, the model's or its EMA's, whichever is higher
    (checkpoint_files.best_score). With a card (not under semi_auto, whose ranks hold slices), rank 0
    also keeps the last and the best weights alone, described by the card (host.weights_only)."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, run: Training, placement: Placement,
                 steps_per_epoch: int, digest: str, heartbeat: Heartbeat, card: Optional[WeightsCard] = None):
        self.cfg, self.run_dir, self.run, self.steps_per_epoch, self.digest = cfg, run_dir, run, steps_per_epoch, digest
        self.heartbeat = heartbeat
        self.saves = placement.is_main or run.dims.semi_auto  # semi_auto: every rank holds slices of its own
        self.slice_rank = placement.rank if run.dims.semi_auto else None
        self.card = card if placement.is_main and not run.dims.semi_auto else None
        self.last: Optional[Path] = None
        self.newest: tuple[int, Optional[Path]] = (0, None)  # the step and file training could resume from
        self.best = files.best_checkpoint(run_dir) if placement.is_main else None  # (path, best_score)

    def restore(self, resume: Optional[str], say) -> Progress:
        """Loads train.resume (a path, or auto: the newest verified checkpoint) into the run; returns
        where training stood (the start, without one)."""
        path = files.resume_path(resume, self.run_dir)
        if path is None:
            if resume == "auto":
                say(f"no verified checkpoint in {files.checkpoint_dir(self.run_dir)}: starting from scratch")
            return Progress(0, 0)
        ema, saved_ema = self.run.ema, files.holds_ema(path)
        progress = checkpoint.restore(path, self.run.net, self.run.optimizer, self.run.scaler,
                                      ema if saved_ema else None)
        self.newest = progress.step, path
        say(f"resumed from {path}: step {progress.step}, epoch {progress.epoch}")
        if ema is not None and not saved_ema:
            ema.start_from_weights()
            say(f"{path} holds no EMA (it was written with train.ema_decay 0): the EMA starts from its weights")
        elif ema is None and saved_ema:
            say(f"{path} holds an EMA, which train.ema_decay 0 leaves unused")
        written_under = files.read_manifest(path).get("config")
        if written_under not in (None, self.digest):
            say(f"warning: {path} was written under another config (digest {written_under}, now {self.digest}); "
                "the run continues with the current one")
        return progress

    def after_step(self, progress: Progress) -> None:
        """A mid-epoch save every every_n_steps; the epoch's last step is saved at its end."""
        every = self.cfg.every_n_steps
        if every and progress.step % every == 0 and progress.step % self.steps_per_epoch:
            self.save(progress)

    def at_epoch_end(self, progress: Progress, evaluation: Optional[dict]) -> None:
        """Saves this step (unless already saved) and keeps it as the best if its evaluation is."""
        if self.last != files.checkpoint_path(self.run_dir, progress.step, self.slice_rank):
            self.save(progress)
        if evaluation is None or self.last is None:
            return
        score = files.best_score(evaluation)[0]
        if self.best is None or score > self.best[1]:
            self.best = files.keep_best(self.run_dir, self.last, evaluation), score
            if self.card is not None:
                self._keep_weights("best", replace(self.card, step=progress.step,
                                                   weights=files.best_score(evaluation)[1]))

    def save_on_stop(self, progress: Progress) -> Optional[Path]:
        """The stop's checkpoint: this step's, unless nothing was trained since the newest one; returns it."""
        if progress.step != self.newest[0]:
            self.save(progress)
        return self.newest[1]

    def save(self, progress: Progress) -> None:
        if self.saves:
            self.heartbeat.busy(progress.step, f"saving the checkpoint of step {progress.step}")
            self.last = checkpoint.save(self.run_dir, self.run.net, self.run.optimizer, self.run.scaler, self.run.ema,
                                        progress, self.cfg.keep_last, self.digest, self.slice_rank)
            self.newest = progress.step, self.last
            if self.card is not None:
                self._keep_weights("last", replace(self.card, step=progress.step))
            self.heartbeat.busy(progress.step, f"saved the checkpoint of step {progress.step}")

    def _keep_weights(self, kind: str, card: WeightsCard) -> None:
        """The weights the card names, from memory: they are those of the checkpoint just written."""
        ema = self.run.ema if card.weights == "ema" else None
        keep_weights(self.run_dir, kind, checkpoint.live_weights(self.run.net, ema), card)

    def summary(self, placement: Placement) -> dict:
        """The last and best checkpoints (with an EMA, also whose weights made the best: "ema" or
        "model"); under semi_auto, once every rank has saved its slices, the last ones merged into one
        checkpoint by rank 0 (vit-dist eval takes it)."""
        if self.run.dims.semi_auto:
            all_reduce_sum([1], placement)
            return {"checkpoint": str(merge(self.run_dir)) if placement.is_main else None}
        result = {"checkpoint": str(self.last) if self.last else None,
                  "best_checkpoint": str(self.best[0]) if self.best else None}
        if self.best and self.run.ema is not None:
            result["best_weights"] = files.best_score(files.read_manifest(self.best[0]))[1]
        return result


class Evaluator:
    """Exact top-1/top-5 and val loss of the model (and, with train.ema_decay, of its EMA: ema_top1,
    ema_top5, ema_val_loss) on every rank's val shard, every eval_every_epochs epochs and at the end;
    none under semi_auto (its slices are evaluated after the merge)."""

    def __init__(self, eval_every_epochs: int, run: Training, dataset, batch_size: int, placement: Placement,
                 num_images: int, record: RunRecord, heartbeat: Heartbeat):
        self.every, self.run, self.dataset, self.batch_size = eval_every_epochs, run, dataset, batch_size
        self.placement, self.num_images, self.record, self.heartbeat = placement, num_images, record, heartbeat

    def maybe_evaluate(self, progress: Progress, final: bool) -> Optional[dict]:
        if self.run.dims.semi_auto or not (final or (self.every and progress.epoch % self.every == 0)):
            return None
        batches = _Heartbeating(self.dataset, self.heartbeat, progress.step)
        result = evaluate(self.run.net, batches, self.batch_size, self.placement, self.num_images)
        if self.run.ema is not None:
            with self.run.ema.swapped():  # the EMA through the model's own evaluation graph
                averaged = evaluate(self.run.net, batches, self.batch_size, self.placement, self.num_images)
            result.update(ema_top1=averaged["top1"], ema_top5=averaged["top5"], ema_val_loss=averaged["val_loss"])
        self.record.log({"step": progress.step, "epoch": progress.epoch, **result},
                        format_eval_line({"epoch": progress.epoch, **result}))
        return result


class _Heartbeating:
    """The eval dataset as evaluate() reads it, stamping the heartbeat at each batch: an evaluation
    is progress to the hang watchdog."""

    def __init__(self, dataset, heartbeat: Heartbeat, step: int):
        self.dataset, self.heartbeat, self.step = dataset, heartbeat, step

    def create_tuple_iterator(self, **kwargs) -> Iterator:
        for index, batch in enumerate(self.dataset.create_tuple_iterator(**kwargs), 1):
            self.heartbeat.busy(self.step, f"evaluating batch {index} after step {self.step}")
            yield batch


class Preemption:
    """SIGTERM or SIGINT asks the run to stop. A signal reaches the ranks at different times, so they
    agree: at the same steps every rank all-reduces its stop request, about once per second of
    training and at least every MOST_STEPS_BETWEEN steps (a cadence each rank derives from the same
    reduced step time, once a step has been timed); then every rank has
    finished the same step, rank 0 saves, and the run ends. On one device with status 128+signal; in
    a launched job with 0 and RUN_DIR/logs/stopped, which the launcher turns into 128+signal, since
    msrun and mpirun kill every rank once one exits non-zero and could cut rank 0's save short."""

    AGREE_EVERY_S = 1.0
    MOST_STEPS_BETWEEN = 32  # however fast the steps, a stop waits for no more of them

    def __init__(self, placement: Placement, checkpointer: Checkpointer, heartbeat: Heartbeat, run_dir: Path, say):
        self.placement, self.checkpointer, self.heartbeat, self.run_dir, self.say = (
            placement, checkpointer, heartbeat, run_dir, say)
        self.requested = 0  # the first signal received
        self.every, self.countdown, self.since = 1, 1, time.perf_counter()
        self.timed = False  # the first agreement comes before any step: its interval times no step
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._request)

    def _request(self, signum: int, _frame) -> None:
        self.requested = self.requested or signum

    def before_step(self, progress: Progress) -> None:
        """Every rank, before every step: stops the run here if the ranks agree to."""
        self.heartbeat.batch_ready(progress.step)
        self.countdown -= 1
        if self.countdown == 0:
            self._agree(progress)

    def _agree(self, progress: Progress) -> None:
        elapsed = time.perf_counter() - self.since
        terms, interrupts, total = all_reduce_sum([self.requested == signal.SIGTERM,
                                                   self.requested == signal.SIGINT, elapsed], self.placement)
        if terms or interrupts:
            self._stop(progress, signal.SIGTERM if terms else signal.SIGINT)
        if self.timed:
            step_time = float(total) / self.placement.world_size / self.every  # the same on every rank
            self.every = min(self.MOST_STEPS_BETWEEN, max(1, int(self.AGREE_EVERY_S / max(step_time, 1e-6))))
        self.timed = True
        self.countdown, self.since = self.every, time.perf_counter()

    def _stop(self, progress: Progress, signum: int) -> None:
        name = signal.Signals(signum).name
        saved = self.checkpointer.save_on_stop(progress)
        if self.placement.is_main:
            write_stopped(self.run_dir, name, progress.step, saved)
        if self.placement.distributed:
            self.say(f"stopped by {name} after step {progress.step}; checkpoint {saved}")
            raise SystemExit(0)
        self.say(f"error: stopped by {name} after step {progress.step} (checkpoint {saved}); resume with: "
                 f"{resume_command(sys.argv[1:], self.run_dir)}")
        raise SystemExit(128 + signum)
