"""The training step (one compiled graph) and the loop around it.

Every rank runs the same loop; the gradient all-reduce inside the step keeps the replicas equal,
and the RunRecord writes only on rank 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
from mindspore import ParameterTuple, amp, nn, ops

from vit_dist import checkpoint, data
from vit_dist.checkpoint import Progress
from vit_dist.config import Config, config_digest
from vit_dist.cpu_kernels import apply_fused_cpu_kernels, step_signal
from vit_dist.evaluate import evaluate
from vit_dist.metrics import RunRecord, format_eval_line, format_train_line
from vit_dist.models import build_model
from vit_dist.optim import build_optimizer, lr_schedule
from vit_dist.parallel.data_parallel import all_reduce_sum, gradient_reducer
from vit_dist.parallel.checkpoint_merge import merge, strategy_file
from vit_dist.parallel.layout import RankLayout
from vit_dist.precision import apply_mixed_precision, build_loss_scaler, scaler_state
from vit_dist.runtime import Placement, yield_cores_to_kernels


class TrainStep(nn.Cell):
    """The step as a Cell that owns every Parameter the step reads or writes: model, optimizer state
    and loss scale. MindSpore's compile cache binds a cached graph's Parameters through the compiled
    Cell; Parameters reached only through a jitted function's closure ran on unbound memory when a
    second launch loaded the graph (NaN losses from the first step, updates lost)."""

    def __init__(self, step, net, optimizer, scaler):
        super().__init__(auto_prefix=False)  # the Parameters keep their names (checkpoints use them)
        self.step = step
        self.net = net
        self.optimizer = optimizer
        self.scaler_state = ParameterTuple(scaler_state(scaler).values())

    def construct(self, images, labels, lr):
        return self.step(images, labels, lr)


def make_train_step(net, optimizer, reduce_gradients, label_smoothing: float, clip_norm: float,
                    scaler=None, min_loss_scale: float = 1.0, accumulation: int = 1, replicas: int = 1,
                    signal=None):
    """TrainStep(images, labels, lr) -> (loss, finite), one graph: loss -> gradients (packed as the
    optimizer lays them out) -> mean over ranks -> (unscale, overflow check) -> clip by global norm
    -> AdamW at the given learning rate.
    With a loss scaler, a step whose gradients are not finite leaves parameters and optimizer state
    untouched; every rank sees the same reduced gradients, so every rank decides alike. With
    accumulation k the batch holds k micro-batches whose gradients are averaged before the update.
    With a cpu_kernels.StepSignal the step ends with its mark and each call returns once the step has run."""
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss_of(images, labels):
        return loss_fn(net(images).astype(ms.float32), labels)

    def update(grads, lr):
        if clip_norm > 0:
            grads = ops.clip_by_global_norm(grads, clip_norm)
        return optimizer.update(grads, lr)

    if scaler is None:
        grad_fn = ms.value_and_grad(loss_of, None, optimizer.parameters)
        loss_and_grads = accumulated(grad_fn, accumulation, replicas)

        def train_step(images, labels, lr):
            loss, grads = loss_and_grads(images, labels)
            loss = ops.depend(loss, update(reduce_gradients(optimizer.pack(grads)), lr))
            return loss, ops.ones((), ms.bool_)

        return _compiled(train_step, net, optimizer, scaler, signal)

    def scaled_loss(images, labels):
        loss = loss_of(images, labels)
        return scaler.scale(loss), loss

    scaled_grad_fn = ms.value_and_grad(scaled_loss, None, optimizer.parameters, has_aux=True)

    def unscaled_loss_grad_fn(images, labels):
        (_, loss), grads = scaled_grad_fn(images, labels)
        return loss, grads

    loss_and_grads = accumulated(unscaled_loss_grad_fn, accumulation, replicas)

    def scaled_train_step(images, labels, lr):
        loss, grads = loss_and_grads(images, labels)
        grads = scaler.unscale(reduce_gradients(optimizer.pack(grads)))
        finite = amp.all_finite(grads)
        if finite:
            update(grads, lr)
        scaler.adjust(finite)
        loss = ops.depend(loss, ops.assign(scaler.scale_value, ops.maximum(scaler.scale_value, min_loss_scale)))
        return loss, finite

    return _compiled(scaled_train_step, net, optimizer, scaler, signal)


def _compiled(step, net, optimizer, scaler, signal):
    """The step as a TrainStep; with a signal, marked at its end (its loss comes after the update and
    the loss-scale write) and paced."""
    if signal is None:
        return TrainStep(step, net, optimizer, scaler)

    def marked_step(images, labels, lr):
        loss, finite = step(images, labels, lr)
        return signal.mark(loss), finite

    return signal.paced(TrainStep(marked_step, net, optimizer, scaler))


def accumulated(grad_fn, accumulation: int, replicas: int):
    """(images, labels) -> (mean loss, mean gradients) over `accumulation` micro-batches, one after the
    other: each micro-batch's input waits for the previous gradients, so only one micro-batch's
    activations are alive at a time. The batch is `replicas` blocks (semi_auto's graph sees the global
    batch, one block per data-parallel replica; 1 in data mode) of `accumulation` micro-batches each."""
    if accumulation == 1:
        return grad_fn

    def micro_batch(x, i):
        blocks = x.reshape((replicas, accumulation, -1) + x.shape[1:])[:, i]
        return blocks.reshape((-1,) + x.shape[1:])

    def loss_and_grads(images, labels):
        loss, grads = grad_fn(micro_batch(images, 0), micro_batch(labels, 0))
        for i in range(1, accumulation):
            after = ops.depend(micro_batch(images, i), grads)
            micro_loss, micro_grads = grad_fn(after, micro_batch(labels, i))
            loss = loss + micro_loss
            grads = tuple(total + g for total, g in zip(grads, micro_grads))
        return loss / accumulation, tuple(g / accumulation for g in grads)

    return loss_and_grads


@dataclass
class Interval:
    """One log interval: the steps' losses and finite flags (device tensors, read once at the log)
    and the time split."""
    started: float
    losses: list
    finite: list
    data_wait: float = 0.0
    untimed_steps: int = 0  # the first step: its graph compile is kept out of the throughput

    @classmethod
    def start(cls) -> "Interval":
        return cls(time.perf_counter(), [], [])


def train(cfg: Config, placement: Placement, run_dir: Path, scan: data.DataScan) -> dict:
    """Trains, checkpoints and evaluates; returns the final evaluation, the last checkpoint and the
    best one by val top-1. Under semi_auto every rank saves its slices, there is no evaluation, and
    rank 0 merges the last slices into one checkpoint (vit-dist eval takes it)."""
    record = RunRecord(run_dir, placement.is_main)
    record.write_config(cfg)
    train_split, val_split, classes = scan.train, scan.val, scan.classes
    record.write_classes(classes)
    layout = RankLayout.of(cfg, placement.rank, placement.world_size)
    steps_per_epoch = data.steps_per_epoch(train_split.num_images, layout.dp, cfg.train.batch_size,
                                           cfg.parallel.grad_accumulation)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    ms.set_seed(cfg.train.seed)  # the same seed on every rank: identical initial parameters
    net = build_model(cfg, cfg.model.num_classes or len(classes))
    if layout.semi_auto:
        from vit_dist.parallel import semi_auto

        semi_auto.apply_strategies(net, layout.dp, layout.mp, cfg.parallel.head)
    if cfg.model.pretrained:
        checkpoint.load_pretrained(net, cfg.model.pretrained, record.say)
    net = apply_mixed_precision(net, cfg.precision)
    apply_fused_cpu_kernels(net, cfg, placement.local_world_size, record.say)
    net.set_train(True)
    learning_rates = lr_schedule(cfg.train, steps_per_epoch)
    optimizer = build_optimizer(net, cfg.train, flat=not layout.semi_auto)
    scaler = build_loss_scaler(cfg.precision)
    reduce_gradients = gradient_reducer(placement)
    if layout.semi_auto:  # its graph sees the global batch
        reduce_gradients = semi_auto.reduced_by_mindspore
    train_step = make_train_step(net, optimizer, reduce_gradients, cfg.train.label_smoothing,
                                 cfg.train.grad_clip_norm, scaler, cfg.precision.min_loss_scale,
                                 cfg.parallel.grad_accumulation, layout.dp if layout.semi_auto else 1,
                                 step_signal(cfg))
    if layout.semi_auto:
        train_step = semi_auto.parallelize(train_step, cfg.parallel, layout.dp,
                                           strategy_file(run_dir, placement.rank))
    dataset = data.train_dataset(cfg, train_split, classes, layout.replica, layout.dp)
    eval_data = data.eval_dataset(cfg, val_split, classes, placement.rank, placement.world_size,
                                  cfg.train.eval_batch)
    global_batch = layout.global_batch
    saves = placement.is_main or layout.semi_auto  # semi_auto: every rank holds slices of its own
    slice_rank = placement.rank if layout.semi_auto else None
    digest = config_digest(cfg)
    progress = _resume(cfg, run_dir, record, net, optimizer, scaler, digest)
    left_out = len(train_split.bad) + len(val_split.bad)
    record.say(f"training {total_steps} steps ({steps_per_epoch} per epoch, global batch {global_batch}) "
               f"on {placement.world_size} rank(s); run directory {run_dir}"
               + (f"; {left_out} bad image file(s) left out" if left_out else ""))
    best = checkpoint.best_checkpoint(run_dir) if placement.is_main else None

    def run_eval(epoch: int) -> dict:
        result = evaluate(net, eval_data, cfg.train.eval_batch, placement, val_split.num_images)
        record.log({"step": step, "epoch": epoch, **result}, format_eval_line({"epoch": epoch, **result}))
        return result

    def keep_if_best(result: dict) -> None:
        """Rank 0 keeps the checkpoint of this step, saved after its evaluation, as the best when its top-1 is."""
        nonlocal best
        if saved is not None and (best is None or result["top1"] > best[1]):
            best = checkpoint.keep_best(run_dir, saved, result["top1"]), result["top1"]

    def save() -> Path:
        return checkpoint.save(run_dir, net, optimizer, scaler, Progress(step, epoch, skipped),
                               cfg.checkpoint.keep_last, digest, slice_rank)

    step, skipped, saved, first_step = progress.step, progress.skipped_steps, None, progress.step
    # The pipeline skips the batches already consumed and keeps each epoch's shuffle order.
    dataset.set_init_step(step)
    # A multi-epoch iterator: each `for` over it yields (the rest of) one epoch, reshuffled.
    batches = dataset.create_tuple_iterator(num_epochs=cfg.train.epochs)
    first_epoch = step // steps_per_epoch + 1
    epoch = min(first_epoch, cfg.train.epochs)  # reported when a resumed run has nothing left to train
    interval = Interval.start()
    for epoch in range(first_epoch, cfg.train.epochs + 1):
        if step >= total_steps:
            break
        fetched = time.perf_counter()
        for images, labels in batches:
            interval.data_wait += time.perf_counter() - fetched
            loss, finite = train_step(images, labels, ms.Tensor(learning_rates[step], ms.float32))
            interval.losses.append(loss)
            interval.finite.append(finite)
            step += 1
            if step == first_step + 1:
                record.say(f"first step (graph compile included) took {time.perf_counter() - interval.started:.1f}s")
                yield_cores_to_kernels(cfg.parallel.device_target)
                interval.started, interval.data_wait, interval.untimed_steps = time.perf_counter(), 0.0, 1
            if step % cfg.train.log_interval == 0 or step == total_steps:
                skipped += _log_interval(record, interval, placement, step, epoch, total_steps,
                                         learning_rates[step - 1], global_batch, scaler, skipped)
                interval = Interval.start()
            if step == total_steps:
                break
            # The epoch's last step is saved below, after the epoch's evaluation.
            if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0 and saves \
                    and step % steps_per_epoch:
                saved = save()
            fetched = time.perf_counter()
        # Evaluation first, then the checkpoint: a run killed in between resumes before the evaluation
        # and makes it again, rather than from a checkpoint whose evaluation never happened.
        evaluated = None
        if step < total_steps and cfg.train.eval_every_epochs and epoch % cfg.train.eval_every_epochs == 0 \
                and not layout.semi_auto:
            evaluated = run_eval(epoch)
            interval = Interval.start()
        if saves and (saved is None or saved != checkpoint.checkpoint_path(run_dir, step, slice_rank)):
            saved = save()
        if evaluated is not None:
            keep_if_best(evaluated)
        if step == total_steps:
            break
    if layout.semi_auto:
        all_reduce_sum([1], placement)  # every rank has saved its slices
        return {"checkpoint": str(merge(run_dir)) if placement.is_main else None}
    result = run_eval(epoch)
    keep_if_best(result)
    record.write_eval(result)
    record.write_plot()
    return {**result, "checkpoint": str(saved) if saved else None,
            "best_checkpoint": str(best[0]) if best else None}


def _resume(cfg: Config, run_dir: Path, record: RunRecord, net, optimizer, scaler, digest: str) -> Progress:
    """Restores model, optimizer and loss scaler from train.resume; returns where training stood."""
    path = checkpoint.resume_path(cfg.train.resume, run_dir)
    if path is None:
        if cfg.train.resume == "auto":
            record.say(f"no verified checkpoint in {checkpoint.checkpoint_dir(run_dir)}: starting from scratch")
        return Progress(0, 0)
    progress = checkpoint.restore(path, net, optimizer, scaler)
    record.say(f"resumed from {path}: step {progress.step}, epoch {progress.epoch}")
    written_under = checkpoint.read_manifest(path).get("config")
    if written_under not in (None, digest):
        record.say(f"warning: {path} was written under another config (digest {written_under}, now {digest}); "
                    "the run continues with the current one")
    return progress


def _log_interval(record: RunRecord, interval: Interval, placement: Placement, step: int, epoch: int,
                  total_steps: int, lr: float, global_batch: int, scaler, skipped_before: int) -> int:
    """All ranks reduce their losses (a collective: every rank must call this at the same step).
    Returns the number of steps skipped for overflow in the interval (the same on every rank)."""
    loss_sum, count = all_reduce_sum([sum(float(loss.asnumpy()) for loss in interval.losses),
                                      len(interval.losses)], placement)
    overflows = sum(not bool(finite.asnumpy()) for finite in interval.finite)
    elapsed = time.perf_counter() - interval.started
    timed = len(interval.losses) - interval.untimed_steps
    step_time = elapsed / timed if timed else float("nan")
    entry = {"step": step, "epoch": epoch, "total_steps": total_steps, "loss": float(loss_sum / count), "lr": float(lr),
             "images_per_sec": global_batch / step_time, "data_wait": interval.data_wait / elapsed,
             "eta_s": (total_steps - step) * step_time}
    if scaler is not None:
        entry.update(loss_scale=float(scaler.scale_value.asnumpy()), overflows=overflows,
                     skipped_steps=skipped_before + overflows)
    record.log(entry, format_train_line(entry))
    return overflows
