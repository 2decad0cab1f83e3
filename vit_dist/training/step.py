"""The training step: one compiled graph from the loss to the optimizer update."""
from __future__ import annotations

import mindspore as ms
from mindspore import ParameterTuple, amp, nn, ops
from mindspore.parallel.nn import GradAccumulation

from vit_dist.parallel.data_parallel import finite_on_every_rank, world_size
from vit_dist.parallel.semi_auto import clip_by_norm, sliced_global_norm, slices_of
from vit_dist.training.precision import scaler_state


class TrainStep(nn.Cell):
    """The step as a Cell that owns every Parameter the step reads or writes: model, optimizer state,
    loss scale and the weights' EMA. MindSpore's compile cache binds a cached graph's Parameters
    through the compiled Cell; Parameters reached only through a jitted function's closure ran on
    unbound memory when a second launch loaded the graph (NaN losses from the first step, updates lost)."""

    def __init__(self, step, net, optimizer, scaler, ema=None):
        super().__init__(auto_prefix=False)  # the Parameters keep their names (checkpoints use them)
        self.step = step
        self.net = net
        self.optimizer = optimizer
        self.scaler_state = ParameterTuple(scaler_state(scaler).values())
        self.ema = ema

    def construct(self, images, labels, lr):
        return self.step(images, labels, lr)


def make_train_step(net, optimizer, loss_fn, reduce_gradients, clip_norm: float, scaler=None,
                    min_loss_scale: float = 1.0, accumulation: int = 1, in_graph_accumulation: bool = False,
                    signal=None, ema=None):
    """TrainStep(images, labels, lr) -> (loss, finite), one graph: loss_fn(logits, labels) -> gradients
    (packed as the optimizer lays them out) -> mean over ranks -> (unscale, overflow check) -> clip by
    global norm -> AdamW at the given learning rate -> the weights' EMA (a training.ema.WeightEMA), if given.
    The clipping norm is the norm of the whole gradients on every rank: under semi_auto each rank holds
    slices of the mp-split gradients (semi_auto.sliced_global_norm adds them up across ranks).
    With a loss scaler, a step whose gradients are not finite on any rank leaves parameters, optimizer
    state, the EMA and the loss scale's decision alike on every rank: the finite flag is
    reduced over all ranks (as MindSpore's loss-scale cells do), since a rank may see only its slices
    or, on Ascend 910A, its own device's overflow status.
    With accumulation k the batch holds k micro-batches whose gradients are averaged before the update:
    one after the other (data mode: `accumulated`), or with in_graph_accumulation through MindSpore's
    GradAccumulation cell (semi_auto: one gradient all-reduce per step, not one per micro-batch).
    With a backends.cpu.kernels.StepSignal the step ends with its mark and each call returns once the step has run."""
    world = world_size()
    slices = tuple(slices_of(p) for p in optimizer.parameters)  # all 1 unless semi_auto strategies were set
    grad_norm = sliced_global_norm(slices, world) if clip_norm > 0 else None
    all_ranks_finite = finite_on_every_rank(world)
    in_graph = in_graph_accumulation and accumulation > 1
    micro = MicroBatchLoss(net, loss_fn, accumulation if in_graph else 1, scaler)
    grad_fn = ms.value_and_grad(GradAccumulation(micro, accumulation) if in_graph else micro, None,
                                optimizer.parameters)
    loss_and_grads = grad_fn if in_graph else accumulated(grad_fn, accumulation)

    def update(grads, lr):
        if clip_norm > 0:
            grads = clip_by_norm(grads, clip_norm, grad_norm(grads))
        updated = optimizer.update(grads, lr)
        return updated if ema is None else ema.update(updated)

    if scaler is None:
        def train_step(images, labels, lr):
            loss, grads = loss_and_grads(images, labels)
            loss = ops.depend(loss, update(reduce_gradients(optimizer.pack(grads)), lr))
            return loss, ops.ones((), ms.bool_)

        return _compiled(train_step, net, optimizer, scaler, signal, ema)

    def scaled_train_step(images, labels, lr):
        scaled_loss, grads = loss_and_grads(images, labels)
        loss = scaled_loss / scaler.scale_value
        grads = scaler.unscale(reduce_gradients(optimizer.pack(grads)))
        finite = all_ranks_finite(amp.all_finite(grads))
        if finite:
            update(grads, lr)
        scaler.adjust(finite)
        loss = ops.depend(loss, ops.assign(scaler.scale_value, ops.maximum(scaler.scale_value, min_loss_scale)))
        return loss, finite

    return _compiled(scaled_train_step, net, optimizer, scaler, signal, ema)


class MicroBatchLoss(nn.Cell):
    """(images, labels) -> loss_fn(net(images), labels) / shares, times the loss scale when given a
    scaler: one micro-batch's share of the step's (scaled) mean loss. A Cell, as MindSpore's
    GradAccumulation takes one."""

    def __init__(self, net, loss_fn, shares: int = 1, scaler=None):
        super().__init__(auto_prefix=False)
        self.net = net
        self.loss_fn = loss_fn
        self.shares = shares
        self.scale_value = None if scaler is None else scaler.scale_value

    def construct(self, images, labels):
        loss = self.loss_fn(self.net(images).astype(ms.float32), labels)
        if self.shares > 1:
            loss = loss / self.shares
        return loss if self.scale_value is None else loss * self.scale_value


def _compiled(step, net, optimizer, scaler, signal, ema):
    """The step as a TrainStep; with a signal, marked at its end (its loss comes after the update and
    the loss-scale write) and paced."""
    if signal is None:
        return TrainStep(step, net, optimizer, scaler, ema)

    def marked_step(images, labels, lr):
        loss, finite = step(images, labels, lr)
        return signal.mark(loss), finite

    return signal.paced(TrainStep(marked_step, net, optimizer, scaler, ema))


def accumulated(grad_fn, accumulation: int):
    """(images, labels) -> (mean loss, mean gradients) over `accumulation` micro-batches, one after the
    other: each micro-batch's input waits for the previous gradients, so only one micro-batch's
    activations are alive at a time."""
    if accumulation == 1:
        return grad_fn

    def micro_batch(x, i):
        return x.reshape((accumulation, -1) + x.shape[1:])[i]

    def loss_and_grads(images, labels):
        loss, grads = grad_fn(micro_batch(images, 0), micro_batch(labels, 0))
        for i in range(1, accumulation):
            after = ops.depend(micro_batch(images, i), grads)
            micro_loss, micro_grads = grad_fn(after, micro_batch(labels, i))
            loss = loss + micro_loss
            grads = tuple(total + g for total, g in zip(grads, micro_grads))
        return loss / accumulation, tuple(g / accumulation for g in grads)

    return loss_and_grads
