"""An exponential moving average (EMA) of the trainable weights, updated by the train step."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from mindspore import ParameterTuple, Tensor, nn, ops

from vit_dist.host.checkpoint_files import EMA_PREFIX

_lerp = ops.MultitypeFuncGraph("ema_lerp")


@_lerp.register("Number", "Tensor", "Tensor")
def _lerp_tensor(rate, average, param):
    return ops.assign(average, ops.lerp(average, param, rate))


class WeightEMA(nn.Cell):
    """average <- decay * average + (1 - decay) * weight for every trainable weight, each time
    update() runs in the train step (after the optimizer's update): timm's ModelEmaV3 update (a lerp)
    at a fixed decay, with neither its warm-up (off by default there too) nor buffers to average (a
    ViT has none: LayerNorm keeps no running statistics; the backend's draw counters are not
    weights). The averages start as copies of the weights.

    The averages are clones of the weights (Parameter.clone), named ema.<weight's name> in
    checkpoints: under semi_auto MindSpore lays a clone out as its weight, as it does the optimizer's
    moments, so each rank averages the slices it holds."""

    def __init__(self, weights, decay: float):
        super().__init__(auto_prefix=False)  # the averages keep their ema.<name> names
        self.weights = ParameterTuple(weights)
        self.average = self.weights.clone(prefix=EMA_PREFIX.rstrip("."), init="same")
        self.rate = 1.0 - decay
        self.map = ops.HyperMap()

    def update(self, after):
        """Moves the averages towards the weights; `after` (the optimizer update's result) is returned
        once they are written, so what follows in the step comes after them. Called after the
        optimizer's update: MindSpore's graph orders reads of a Parameter after the writes to it that
        come before them in the program, so the averages take the updated weights."""
        return ops.depend(after, self.map(ops.partial(_lerp, self.rate), self.average, self.weights))

    def checkpoint_state(self) -> dict:
        return {p.name: p for p in self.average}

    def start_from_weights(self) -> None:
        """The averages set to the weights (a resume from a checkpoint without them)."""
        for average, weight in zip(self.average, self.weights):
            average.set_data(Tensor(weight.asnumpy().copy()))

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model's weights hold the averages (and the averages the weights), so the
        model evaluates the EMA with its own compiled graph; exact copies, swapped back on leaving."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for average, weight in zip(self.average, self.weights):
            held = weight.asnumpy().copy()
            weight.set_data(Tensor(average.asnumpy().copy()))
            average.set_data(Tensor(held))
