"""The training step: one compiled graph from the loss to the optimizer update."""
from __future__ import annotations

import mindspore as ms
from mindspore import ParameterTuple, amp, nn, ops

from vit_dist.parallel.data_parallel import finite_on_every_rank, world_size
from vit_dist.parallel.semi_auto import clip_by_norm, sliced_global_norm, slices_of
from vit_dist.training.loss import train_loss
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


def make_train_step(net, optimizer, reduce_gradients, label_smoothing: float, clip_norm: float,
                    scaler=None, min_loss_scale: float = 1.0, accumulation: int = 1, replicas: int = 1,
                    signal=None, soft_targets: bool = False, ema=None):
    """TrainStep(images, labels, lr) -> (loss, finite), one graph: loss -> gradients (packed as the
    optimizer lays them out) -> mean over ranks -> (unscale, overflow check) -> clip by global norm
    -> AdamW at the given learning rate -> the weights' EMA (a training.ema.WeightEMA), if given.
    The clipping norm is the norm of the whole gradients on every rank: under semi_auto each rank holds
    slices of the mp-split gradients (semi_auto.sliced_global_norm adds them up across ranks).
    With a loss scaler, a step whose gradients are not finite on any rank leaves parameters, optimizer
    state, the EMA and the loss scale's decision alike on every rank: the finite flag is
    reduced over all ranks (as MindSpore's loss-scale cells do), since a rank may see only its slices
    or, on Ascend 910A, its own device's overflow status. With
    accumulation k the batch holds k micro-batches whose gradients are averaged before the update.
    With a backends.cpu.kernels.StepSignal the step ends with its mark and each call returns once the step has run.
    soft_targets: the labels are float [batch, classes] soft targets (mixup), label_smoothing already in them."""
    loss_fn = train_loss(label_smoothing, soft_targets)
    world = world_size()
    slices = tuple(slices_of(p) for p in optimizer.parameters)  # all 1 unless semi_auto strategies were set
    grad_norm = sliced_global_norm(slices, world) if clip_norm > 0 else None
    all_ranks_finite = finite_on_every_rank(world)

    def loss_of(images, labels):
        return loss_fn(net(images).astype(ms.float32), labels)

    def update(grads, lr):
        if clip_norm > 0:
            grads = clip_by_norm(grads, clip_norm, grad_norm(grads))
        updated = optimizer.update(grads, lr)
        return updated if ema is None else ema.update(updated)

    if scaler is None:
        grad_fn = ms.value_and_grad(loss_of, None, optimizer.parameters)
        loss_and_grads = accumulated(grad_fn, accumulation, replicas)

        def train_step(images, labels, lr):
            loss, grads = loss_and_grads(images, labels)
            loss = ops.depend(loss, update(reduce_gradients(optimizer.pack(grads)), lr))
            return loss, ops.ones((), ms.bool_)

        return _compiled(train_step, net, optimizer, scaler, signal, ema)

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
        finite = all_ranks_finite(amp.all_finite(grads))
        if finite:
            update(grads, lr)
        scaler.adjust(finite)
        loss = ops.depend(loss, ops.assign(scaler.scale_value, ops.maximum(scaler.scale_value, min_loss_scale)))
        return loss, finite

    return _compiled(scaled_train_step, net, optimizer, scaler, signal, ema)


def _compiled(step, net, optimizer, scaler, signal, ema):
    """The step as a TrainStep; with a signal, marked at its end (its loss comes after the update and
    the loss-scale write) and paced."""
    if signal is None:
        return TrainStep(step, net, optimizer, scaler, ema)

    def marked_step(images, labels, lr):
        loss, finite = step(images, labels, lr)
        return signal.mark(loss), finite

    return signal.paced(TrainStep(marked_step, net, optimizer, scaler, ema))


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
