"""The training loop: step, log, maybe save, and at each epoch's end evaluate, then save. Every rank
runs the same loop; the gradient all-reduce inside the step keeps the replicas equal, and the run
record writes only on rank 0."""
from __future__ import annotations

from pathlib import Path

import mindspore as ms

from vit_dist.data import pipeline
from vit_dist.host.checkpoint_files import Progress
from vit_dist.host.config import Config, config_digest, total_steps, with_scaled_lr
from vit_dist.host.datascan import DataScan, steps_per_epoch
from vit_dist.host.heartbeat import Heartbeat
from vit_dist.host.placement import ParallelDims, Placement
from vit_dist.host.rand_augment import parse_rand_augment, start_note
from vit_dist.host.run_record import RunRecord
from vit_dist.host.weights_only import WeightsCard
from vit_dist.parallel.checkpoint_merge import strategy_file
from vit_dist.training.assemble import build_training
from vit_dist.training.components import Checkpointer, Evaluator, IntervalLogger, Preemption
from vit_dist.training.optim import lr_schedule
from vit_dist.training.profiling import StepProfiler


def train(cfg: Config, placement: Placement, run_dir: Path, scan: DataScan) -> dict:
    """Trains, checkpoints and evaluates; returns the final evaluation, the last checkpoint and the
    best one (Checkpointer's rule; under semi_auto: the merged checkpoint only)."""
    record = RunRecord(run_dir, placement.is_main)
    # Before anything reads train.lr (the optimizer, the schedule, the config digest).
    cfg, scaling = with_scaled_lr(cfg, ParallelDims.of(cfg, placement.world_size).global_batch)
    record.write_config(cfg, scaling)
    record.write_classes(scan.classes)
    num_classes = cfg.model.num_classes or len(scan.classes)
    run = build_training(cfg, num_classes, placement, record.say, strategy_file(run_dir, placement.rank))
    dims = run.dims
    per_epoch = steps_per_epoch(scan.train.num_images, dims.dp, dims.micro_batch, dims.accumulation)
    total = total_steps(cfg.train, per_epoch)
    rates = lr_schedule(cfg.train, per_epoch)
    heartbeat = Heartbeat(run_dir, placement.rank, placement.job)
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, run, placement, per_epoch, config_digest(cfg), heartbeat,
                                WeightsCard.of(cfg, num_classes, sorted(scan.classes, key=scan.classes.get)))
    start = checkpointer.restore(cfg.train.resume, record.say)
    if cfg.train.tensorboard:
        record.open_tensorboard(start.step)
    if dims.semi_auto:
        record.say("note: no weights-only RUN_DIR/weights/ under semi_auto (each rank saves slices); vit-dist "
                   "export-weights takes the merged checkpoint the run ends with")
    logger = IntervalLogger(record, run, placement, cfg.train.log_interval, total, rates, start.skipped_steps)
    evaluator = Evaluator(cfg.train.eval_every_epochs, run, pipeline.eval_dataset(
        cfg, scan.val, scan.classes, placement.rank, placement.world_size, cfg.train.eval_batch),
        cfg.train.eval_batch, placement, scan.val.num_images, record, heartbeat)
    dataset = pipeline.train_dataset(cfg, scan.train, scan.classes, dims.replica(placement.rank), dims.dp,
                                     dims.rank_batch)
    dataset.set_init_step(start.step)  # skips the batches already consumed, keeps each epoch's order
    batches = dataset.create_tuple_iterator(num_epochs=cfg.train.epochs)  # each pass yields one epoch
    preemption = Preemption(placement, checkpointer, heartbeat, run_dir, record.say)
    profiler = StepProfiler(cfg.train.profile_steps, run_dir, placement, cfg.parallel.device_target, start.step,
                            record.say)
    if cfg.data.rand_augment is not None:
        record.say(start_note(parse_rand_augment(cfg.data.rand_augment), cfg.data.color_jitter))
    left_out = len(scan.train.bad) + len(scan.val.bad)
    record.say(f"training {total} steps ({per_epoch} per epoch, global batch {dims.global_batch}, peak learning "
               f"rate {cfg.train.lr:g}) on {placement.world_size} rank(s); run directory {run_dir}"
               + (f"; {scaling}" if scaling else "")
               + (f"; {left_out} bad image file(s) left out" if left_out else ""))

    step, epoch = start.step, min(start.step // per_epoch + 1, cfg.train.epochs)
    while step < total:
        for images, labels in logger.timed(batches):
            preemption.before_step(Progress(step, epoch, logger.skipped))
            loss, finite = run.step(images, labels, ms.Tensor(rates[step], ms.float32))
            step += 1
            heartbeat.step_done(step)
            logger.after_step(step, epoch, loss, finite)
            profiler.after_step(step)
            if step == total:
                break
            checkpointer.after_step(Progress(step, epoch, logger.skipped))
        progress = Progress(step, epoch, logger.skipped)
        evaluation = evaluator.maybe_evaluate(progress, final=step == total)
        logger.restart()  # the evaluation's time is not the steps'
        checkpointer.at_epoch_end(progress, evaluation)
        epoch += 1
    if step == start.step:  # resumed with nothing left to train
        evaluation = evaluator.maybe_evaluate(Progress(step, epoch, logger.skipped), final=True)
    result = {**(evaluation or {}), **checkpointer.summary(placement)}
    if evaluation is not None:
        record.write_eval(evaluation)
        record.write_plot()
    record.close()
    return result
