"""AdamW with decoupled weight decay and a per-step warm-up + cosine learning-rate schedule.

Two layouts of the same update, with one interface for the train step: `parameters` (what gradients
are taken of, in order), `pack(grads)` (what the update consumes), `update(packed, lr)` and
`checkpoint_state()` (what a checkpoint holds). FlatAdamW serves data parallelism; PerParameterAdamW serves
semi_auto, where every parameter carries its own shard strategy. Both take the same parameter groups
(param_groups): a weight decay and a learning-rate scale each, the scale from layer-wise decay."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.common.initializer import initializer
from mindspore.experimental.optim import AdamW

from vit_dist.host.config import TrainConfig

# Parameters that are not weight matrices: decaying them only hurts (ViT/DeiT recipe).
NO_DECAY_NAMES = ("pos_embed", "cls_token")
# Layer 0 of layer-wise decay: the patch embedding, class token and position embedding (timm's "stem").
EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed")


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


def layer_ids(names: list[str]) -> dict[str, int]:
    """Each parameter's layer for layer-wise decay, numbered as timm's param_groups_layer_decay numbers a
    timm VisionTransformer (through its group_matcher): the embeddings layer 0, block i layer i + 1, the
    final norm the last block's layer (timm's matcher files `^norm` under the group before it), anything
    else (the head) the last layer, depth + 1."""
    depth = 1 + max((int(name.split(".")[1]) for name in names if name.startswith("blocks.")), default=-1)

    def layer(name: str) -> int:
        top = name.split(".")[0]
        if top in EMBEDDING_NAMES:
            return 0
        if top == "blocks":
            return int(name.split(".")[1]) + 1
        return depth if top == "norm" else depth + 1

    return {name: layer(name) for name in names}


@dataclass(frozen=True)
class ParamGroup:
    """Parameters updated alike. name: in the flat layout's checkpoint names (adamw.exp_avg.<name>)."""
    name: str
    params: tuple
    weight_decay: float
    lr_scale: float


def param_groups(params, cfg: TrainConfig) -> list[ParamGroup]:
    """The parameters by (weight decay, learning-rate scale). Without layer decay the two groups "decay"
    and "no_decay" (each left out if empty); with train.layer_decay d < 1 those of each layer, scaled
    d ** (last layer - layer) as timm's param_groups_layer_decay (the head 1, the embeddings the least),
    named "decay.layerN" and "no_decay.layerN"."""
    # Layer 0 for all without layer decay: one scale, so the groups are today's two and their names too.
    layers = layer_ids([p.name for p in params]) if cfg.layer_decay < 1 else {p.name: 0 for p in params}
    last = max(layers.values())
    members: dict[tuple[int, bool], list] = {}
    for p in params:
        members.setdefault((layers[p.name], not decays(p.name, p.ndim)), []).append(p)
    suffix = "" if cfg.layer_decay == 1 else ".layer{}"
    return [ParamGroup(("no_decay" if plain else "decay") + suffix.format(layer), tuple(group),
                       0.0 if plain else cfg.weight_decay, cfg.layer_decay ** (last - layer))
            for (layer, plain), group in sorted(members.items())]


_flatten = ops.MultitypeFuncGraph("flatten")
_assign_piece = ops.MultitypeFuncGraph("assign_piece")


@_flatten.register("Tensor")
def _flatten_tensor(tensor):
    return tensor.reshape(-1)


@_assign_piece.register("Tensor", "Tensor", "Number")
def _assign_piece_tensor(flat, param, offset):
    return ops.assign(param, ops.slice(flat, (offset,), (param.size,)).reshape(param.shape))


class FlatAdamW(nn.Cell):
    """PyTorch's AdamW on flat buffers: each parameter group's parameters, gradients and moments are
    laid end to end, and one fused kernel (ops.AdamWeightDecay) updates a whole group. The
    per-parameter optimizer runs a dozen small kernels per parameter, whose launches cost more than
    their arithmetic on the CPU backend; flat gradients also make one all-reduce per group.

    The fused kernel has no bias correction; folding it into its inputs keeps PyTorch's update:
    lr' = lr sqrt(1-b2^t)/(1-b1^t), eps' = eps sqrt(1-b2^t), decay' = decay lr/lr' (lr cancels out).
    A group's learning-rate scale multiplies lr', so its decoupled weight decay is scaled too, as
    PyTorch's AdamW does with a group's lr (timm's scheduler sets lr x lr_scale)."""

    def __init__(self, groups: list[ParamGroup], betas: tuple[float, float], eps: float):
        super().__init__()
        # Grouped order: value_and_grad over `parameters` yields each group's gradients as one slice.
        self.parameters = tuple(p for group in groups for p in group.params)
        self.group_params = tuple(ParameterTuple(group.params) for group in groups)
        self.group_ends = tuple(itertools.accumulate(len(group.params) for group in groups))
        sizes = [[p.size for p in group.params] for group in groups]
        self.offsets = tuple(tuple(itertools.accumulate(group_sizes[:-1], initial=0)) for group_sizes in sizes)
        self.weight_decay = tuple(Tensor(group.weight_decay, ms.float32) for group in groups)
        self.lr_scales = tuple(group.lr_scale for group in groups)

        def buffers(kind: str) -> ParameterTuple:
            # Zeros from an initializer, not ops.zeros: that runs a kernel whose output stays in MindSpore's
            # memory pool beside the Parameter's copy (the three buffers took 5 x the parameters' bytes, not 3).
            return ParameterTuple(Parameter(initializer("zeros", (sum(group_sizes),), ms.float32),
                                            name=f"adamw.{kind}.{group.name}", requires_grad=False)
                                  for group, group_sizes in zip(groups, sizes))

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
            group_lr = step_lr if self.lr_scales[g] == 1.0 else step_lr * self.lr_scales[g]  # a constant: folded
            self.adam(self.work[g], self.exp_avg[g], self.exp_avg_sq[g], group_lr, self.beta1, self.beta2,
                      self.eps * root_correction2, self.weight_decay[g] * correction1 / root_correction2,
                      flat_grads[g])
            step = ops.depend(step, self.map(ops.partial(_assign_piece, self.work[g]), self.group_params[g],
                                             self.offsets[g]))
        return step  # after the parameters are written


class PerParameterAdamW(AdamW):
    """MindSpore's AdamW (bias-corrected moments, decoupled decay, as PyTorch's), one set of kernels
    per parameter. nn.AdamWeightDecay omits the bias correction, which makes its first hundreds of
    steps several times larger than the lr. Each parameter group's rate is the step's lr times the
    group's scale."""

    # Entries not worth saving: the learning rate is set from the schedule every step, and the
    # amsgrad buffer is never used (amsgrad is off).
    NOT_SAVED_PREFIXES = ("learning_rate", "max_exp_avg_sq")

    def __init__(self, groups: list[ParamGroup], lr: float, betas: tuple[float, float], eps: float):
        super().__init__([{"params": list(group.params), "weight_decay": group.weight_decay} for group in groups],
                         lr=lr, betas=betas, eps=eps)
        self.lr_scales = tuple(group.lr_scale for group in groups)

    def checkpoint_state(self) -> dict:
        own = {id(p) for p in self.parameters}
        return {p.name: p for _, p in self.parameters_and_names()
                if id(p) not in own and not p.name.startswith(self.NOT_SAVED_PREFIXES)}

    def pack(self, grads):
        return grads

    def update(self, grads, lr):
        # The schedule is a step input rather than optimizer state: every group points at this step's
        # rate, times its scale (a constant: folded where it is 1).
        for group_lr, scale in zip(self.lrs, self.lr_scales):
            ops.assign(group_lr, lr if scale == 1.0 else lr * scale)
        return super().construct(grads)


def build_optimizer(net, cfg: TrainConfig, flat: bool):
    """FlatAdamW (flat=True) or PerParameterAdamW over the network's trainable parameters, in the
    groups param_groups makes of them."""
    groups = param_groups(net.trainable_params(), cfg)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if flat:
        return FlatAdamW(groups, betas, cfg.adam_eps)
    return PerParameterAdamW(groups, cfg.lr, betas, cfg.adam_eps)
