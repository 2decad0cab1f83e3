"""The training step (one jit-compiled graph) and the loop around it.

Every rank runs the same loop; the gradient all-reduce inside the step keeps the replicas equal,
and the RunRecord writes only on rank 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from vit_dist import checkpoint, data
from vit_dist.config import Config
from vit_dist.evaluate import evaluate
from vit_dist.metrics import RunRecord, format_eval_line, format_train_line
from vit_dist.models import build_model
from vit_dist.optim import build_optimizer, lr_schedule, set_learning_rate
from vit_dist.parallel.data_parallel import all_reduce_sum, gradient_reducer
from vit_dist.precision import apply_mixed_precision, build_loss_scaler
from vit_dist.runtime import Placement


def make_train_step(net, optimizer, reduce_gradients, label_smoothing: float, clip_norm: float,
                    scaler=None, min_loss_scale: float = 1.0):
    """train_step(images, labels, lr) -> (loss, finite), one graph: loss -> gradients -> mean over
    ranks -> (unscale, overflow check) -> clip by global norm -> AdamW at the given learning rate.
    With a loss scaler, a step whose gradients are not finite leaves parameters and optimizer state
    untouched; every rank sees the same reduced gradients, so every rank decides alike."""
    import mindspore as ms
    from mindspore import amp, nn, ops

    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def loss_of(images, labels):
        return loss_fn(net(images).astype(ms.float32), labels)

    def update(grads, lr):
        if clip_norm > 0:
            grads = ops.clip_by_global_norm(grads, clip_norm)
        set_learning_rate(optimizer, lr)
        return optimizer(grads)

    if scaler is None:
        grad_fn = ms.value_and_grad(loss_of, None, optimizer.parameters)

        @ms.jit
        def train_step(images, labels, lr):
            loss, grads = grad_fn(images, labels)
            loss = ops.depend(loss, update(reduce_gradients(grads), lr))
            return loss, ops.ones((), ms.bool_)

        return train_step

    def scaled_loss(images, labels):
        loss = loss_of(images, labels)
        return scaler.scale(loss), loss

    scaled_grad_fn = ms.value_and_grad(scaled_loss, None, optimizer.parameters, has_aux=True)

    @ms.jit
    def scaled_train_step(images, labels, lr):
        (_, loss), grads = scaled_grad_fn(images, labels)
        grads = scaler.unscale(reduce_gradients(grads))
        finite = amp.all_finite(grads)
        if finite:
            update(grads, lr)
        scaler.adjust(finite)
        ops.assign(scaler.scale_value, ops.maximum(scaler.scale_value, min_loss_scale))
        return loss, finite

    return scaled_train_step


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


def train(cfg: Config, placement: Placement, run_dir: Path) -> dict:
    """Trains, checkpoints and evaluates; returns the final evaluation and the last checkpoint."""
    import mindspore as ms

    record = RunRecord(run_dir, placement.is_main)
    record.write_config(cfg)
    train_split, val_split, classes = data.scan_dataset(cfg.data)
    record.write_classes(classes)
    steps_per_epoch = data.steps_per_epoch(train_split.num_images, placement.world_size, cfg.train.batch_size)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    ms.set_seed(cfg.train.seed)  # the same seed on every rank: identical initial parameters
    net = build_model(cfg, cfg.model.num_classes or len(classes))
    if cfg.model.pretrained:
        checkpoint.load_pretrained(net, cfg.model.pretrained, record.say)
    net = apply_mixed_precision(net, cfg.precision)
    net.set_train(True)
    learning_rates = lr_schedule(cfg.train, steps_per_epoch)
    optimizer = build_optimizer(net, cfg.train)
    scaler = build_loss_scaler(cfg.precision)
    train_step = make_train_step(net, optimizer, gradient_reducer(optimizer.parameters, placement),
                                 cfg.train.label_smoothing, cfg.train.grad_clip_norm, scaler,
                                 cfg.precision.min_loss_scale)
    dataset = data.train_dataset(cfg, train_split, classes, placement.rank, placement.world_size)
    eval_data = data.eval_dataset(cfg, val_split, classes, placement.rank, placement.world_size,
                                  cfg.train.eval_batch)
    global_batch = cfg.train.batch_size * placement.world_size
    record.say(f"training {total_steps} steps ({steps_per_epoch} per epoch, global batch {global_batch}) "
               f"on {placement.world_size} rank(s); run directory {run_dir}")

    def run_eval(epoch: int) -> dict:
        result = evaluate(net, eval_data, cfg.train.eval_batch, placement,
                          val_split.num_images)
        record.log({"step": step, "epoch": epoch, **result}, format_eval_line({"epoch": epoch, **result}))
        return result

    step = _resume(cfg, run_dir, record, net, optimizer, scaler)
    # The pipeline skips the batches already consumed and keeps each epoch's shuffle order.
    dataset.set_init_step(step)
    # A multi-epoch iterator: each `for` over it yields (the rest of) one epoch, reshuffled.
    batches = dataset.create_tuple_iterator(num_epochs=cfg.train.epochs)
    skipped, saved, first_step = 0, None, step
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
                interval.started, interval.data_wait, interval.untimed_steps = time.perf_counter(), 0.0, 1
            if step % cfg.train.log_interval == 0 or step == total_steps:
                skipped += _log_interval(record, interval, placement, step, epoch, total_steps,
                                         learning_rates[step - 1], global_batch, scaler, skipped)
                interval = Interval.start()
            if cfg.checkpoint.every_n_steps and step % cfg.checkpoint.every_n_steps == 0 and placement.is_main:
                saved = checkpoint.save(run_dir, net, optimizer, scaler, step, epoch, cfg.checkpoint.keep_last)
            if step == total_steps:
                break
            fetched = time.perf_counter()
        if placement.is_main and (saved is None or saved != checkpoint.checkpoint_path(run_dir, step)):
            saved = checkpoint.save(run_dir, net, optimizer, scaler, step, epoch, cfg.checkpoint.keep_last)
        if step == total_steps:
            break
        if cfg.train.eval_every_epochs and epoch % cfg.train.eval_every_epochs == 0:
            run_eval(epoch)
            interval = Interval.start()
    result = run_eval(epoch)
    record.write_eval(result)
    record.write_plot()
    return {**result, "checkpoint": str(saved) if saved else None}


def _resume(cfg: Config, run_dir: Path, record: RunRecord, net, optimizer, scaler) -> int:
    """Restores model, optimizer and loss scaler from train.resume; returns the step to continue from."""
    path = checkpoint.resume_path(cfg.train.resume, run_dir)
    if path is None:
        if cfg.train.resume == "auto":
            record.say(f"no verified checkpoint in {checkpoint.checkpoint_dir(run_dir)}: starting from scratch")
        return 0
    step, epoch = checkpoint.restore(path, net, optimizer, scaler)
    record.say(f"resumed from {path}: step {step}, epoch {epoch}")
    return step


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
