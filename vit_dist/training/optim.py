"""AdamW with decoupled weight decay and a per-step warm-up + cosine learning-rate schedule.

Two layouts of the same update, with one interface for the train step: `parameters` (what gradients
are taken of, in order), `pack(grads)` (what the update consumes), `update(packed, lr)` and
`checkpoint_state()` (what a checkpoint holds). FlatAdamW serves data parallelism; PerParameterAdamW serves
semi_auto, where every parameter carries its own shard strategy."""
from __future__ import annotations

import itertools
import math

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.common.initializer import initializer
from mindspore.experimental.optim import AdamW

from vit_dist.host.config import TrainConfig

# Parameters that are not weight matrices: decaying them only hurts (ViT/DeiT recipe).
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """Learning rate of every step: linear warm-up to cfg.lr, then cosine down to cfg.min_lr."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    rates = []
    for step in range(total):
        if step < warmup:
            rates.append(cfg.lr * (step + 1) / warmup)
        else:
            progress = (step - warmup) / max(total - warmup, 1)
            rates.append(cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress)))
    return rates


def decays(name: str, ndim: int) -> bool:
    """Biases, norm scales and shifts, the position embedding and class token get no weight decay."""
    return ndim > 1 and name.split(".")[-1] not in NO_DECAY_NAMES


_flatten = ops.MultitypeFuncGraph("flatten")
_assign_piece = ops.MultitypeFuncGraph("assign_piece")


@_flatten.register("Tensor")
def _flatten_tensor(tensor):
    return tensor.reshape(-1)


@_assign_piece.register("Tensor", "Tensor", "Number")
def _assign_piece_tensor(flat, param, offset):
    return ops.assign(param, ops.slice(flat, (offset,), (param.size,)).reshape(param.shape))


class FlatAdamW(nn.Cell):
    """PyTorch's AdamW on flat buffers: each weight-decay group's parameters, gradients and moments
    are laid end to end, and one fused kernel (ops.AdamWeightDecay) updates a whole group. The
    per-parameter optimizer runs a dozen small kernels per parameter, whose launches cost more than
    their arithmetic on the CPU backend; flat gradients also make one all-reduce per group.

    The fused kernel has no bias correction; folding it into its inputs keeps PyTorch's update:
    lr' = lr sqrt(1-b2^t)/(1-b1^t), eps' = eps sqrt(1-b2^t), decay' = decay lr/lr' (lr cancels out)."""

    def __init__(self, params, weight_decay: float, betas: tuple[float, float], eps: float):
        super().__init__()
        split = {flag: tuple(p for p in params if decays(p.name, p.ndim) == flag) for flag in (True, False)}
        groups = [(name, split[flag], decay) for name, flag, decay in
                  (("decay", True, weight_decay), ("no_decay", False, 0.0)) if split[flag]]
        # Grouped order: value_and_grad over `parameters` yields each group's gradients as one slice.
        self.parameters = tuple(p for _, members, _ in groups for p in members)
        self.group_params = tuple(ParameterTuple(members) for _, members, _ in groups)
        self.group_ends = tuple(itertools.accumulate(len(members) for _, members, _ in groups))
        sizes = [[p.size for p in members] for _, members, _ in groups]
        self.offsets = tuple(tuple(itertools.accumulate(group_sizes[:-1], initial=0)) for group_sizes in sizes)
        self.weight_decay = tuple(Tensor(decay, ms.float32) for _, _, decay in groups)

        def buffers(kind: str) -> ParameterTuple:
            # Zeros from an initializer, not ops.zeros: that runs a kernel whose output stays in MindSpore's
            # memory pool beside the Parameter's copy (the three buffers took 5 x the parameters' bytes, not 3).
            return ParameterTuple(Parameter(initializer("zeros", (sum(group_sizes),), ms.float32),
                                            name=f"adamw.{kind}.{name}", requires_grad=False)
                                  for (name, _, _), group_sizes in zip(groups, sizes))

        self.exp_avg = buffers("exp_avg")
        self.exp_avg_sq = buffers("exp_avg_sq")
        self.work = buffers("work")  # the parameters, gathered for the in-place kernel: not state
        self.step = Parameter(Tensor(0, ms.int32), name="adamw.step", requires_grad=False)
        self.beta1, self.beta2 = (Tensor(b, ms.float32) for b in betas)
        self.eps = Tensor(eps, ms.float32)
        self.adam = ops.AdamWeightDecay()
        self.map = ops.HyperMap()

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds (the work buffers are a copy of the parameters)."""
        return {p.name: p for p in (*self.exp_avg, *self.exp_avg_sq, self.step)}

    def pack(self, grads):
        """The gradients of `parameters`, in order -> one flat gradient per group."""
        flat = ()
        start = 0
        for end in self.group_ends:
            flat += (ops.concat(self.map(_flatten, grads[start:end])),)
            start = end
        return flat

    def construct(self, flat_grads, lr):
        return self.update(flat_grads, lr)

    def update(self, flat_grads, lr):
        step = self.step + 1
        ops.assign(self.step, step)
        t = step.astype(ms.float32)
        correction1 = 1.0 - ops.pow(self.beta1, t)
        root_correction2 = ops.sqrt(1.0 - ops.pow(self.beta2, t))
        step_lr = lr * root_correction2 / correction1
        for g in range(len(self.group_params)):
            ops.assign(self.work[g], ops.concat(self.map(_flatten, self.group_params[g])))
            self.adam(self.work[g], self.exp_avg[g], self.exp_avg_sq[g], step_lr, self.beta1, self.beta2,
                      self.eps * root_correction2, self.weight_decay[g] * correction1 / root_correction2,
                      flat_grads[g])
            step = ops.depend(step, self.map(ops.partial(_assign_piece, self.work[g]), self.group_params[g],
                                             self.offsets[g]))
        return step  # after the parameters are written


class PerParameterAdamW(AdamW):
    """MindSpore's AdamW (bias-corrected moments, decoupled decay, as PyTorch's), one set of kernels
    per parameter. nn.AdamWeightDecay omits the bias correction, which makes its first hundreds of
    steps several times larger than the lr."""

    # Entries not worth saving: the learning rate is set from the schedule every step, and the
    # amsgrad buffer is never used (amsgrad is off).
    NOT_SAVED_PREFIXES = ("learning_rate", "max_exp_avg_sq")

    def checkpoint_state(self) -> dict:
        own = {id(p) for p in self.parameters}
        return {p.name: p for _, p in self.parameters_and_names()
                if id(p) not in own and not p.name.startswith(self.NOT_SAVED_PREFIXES)}

    def pack(self, grads):
        return grads

    def update(self, grads, lr):
        # The schedule is a step input rather than optimizer state: every group points at this step's rate.
        for group_lr in self.lrs:
            ops.assign(group_lr, lr)
        return super().construct(grads)


def build_optimizer(net, cfg: TrainConfig, flat: bool):
    """FlatAdamW (flat=True) or PerParameterAdamW over the network's trainable parameters; biases,
    norms, the position embedding and class token get no weight decay."""
    params = net.trainable_params()
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if flat:
        return FlatAdamW(params, cfg.weight_decay, betas, cfg.adam_eps)
    groups = [
        {"params": [p for p in params if decays(p.name, p.ndim)], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if not decays(p.name, p.ndim)], "weight_decay": 0.0},
    ]
    return PerParameterAdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
