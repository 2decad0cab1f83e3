"""Typed run configuration: dataclasses, strict YAML loading, `--set` overrides, validation.

The config is the single source of truth for a run. Everything that can be checked without data
or MindSpore is checked here, so a bad key or value fails in a second, before any graph compiles.
This module must not import MindSpore: the launchers call it in a pre-flight step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from vit_dist.host.errors import ConfigError, did_you_mean
from vit_dist.host.rand_augment import parse_rand_augment
from vit_dist.host.shipped_configs import config_path
from vit_dist.models.spec import VIT_VARIANTS

# parallel.device_target auto: the first of these that MindSpore can load (bootstrap.resolve_device_target).
AUTO_DEVICE = "auto"
DEVICES = ("Ascend", "GPU", "CPU")
DEVICE_TARGETS = (AUTO_DEVICE, *DEVICES)
AMP_LEVELS = ("O0", "O1", "O2", "O3")
LOW_PRECISION_DTYPES = ("float16", "bfloat16")
LOSS_SCALES = ("none", "fixed", "dynamic")
BAD_IMAGE_ACTIONS = ("skip", "error")
INTERPOLATIONS = ("bilinear", "bicubic")
PARALLEL_MODES = ("data", "semi_auto")
# semi_auto: the classifier replicated (data) or its classes split over the model-parallel ranks (model).
HEAD_LAYOUTS = ("data", "model")
# MindSpore 2.10 documents AutoParallel and GradAccumulation for Ascend only, and refuses
# semi_auto_parallel on the CPU backend ("Invalid communication backend").
SEMI_AUTO_TARGETS = ("Ascend",)


@dataclass
class ModelConfig:
    variant: str = "b"  # ti|s|b|l|h: supplies the widths below that are left null
    patch_size: int = 16
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_dim: Optional[int] = None  # null: 4 * embed_dim
    num_classes: Optional[int] = None  # null: the number of class folders under data.root/train
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-6  # timm's and MindCV's ViTs use 1e-6, Hugging Face's 1e-12
    gelu_approximate: bool = False  # tanh GELU: MindSpore's nn.GELU default, which MindCV's ViT uses
    pretrained: Optional[str] = None  # weights to fine-tune from (vit-dist import-weights writes them)


@dataclass
class DataConfig:
    root: str = "data/imagenet"  # holds train/<class>/* and val/<class>/*
    image_size: int = 224
    num_workers: int = 8  # parallel map workers per rank
    augment: bool = True  # random resized crop + flip; false: the eval transform for training too
    shuffle: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.333)
    hflip_prob: float = 0.5
    eval_crop_fraction: float = 0.875  # resize to image_size / fraction, then center crop
    on_bad_image: str = "skip"  # skip: train without the files the decoder would fail on | error: stop first
    # Per-channel normalisation of [0, 1] pixels; pretrained weights expect their own (HF ViTs: 0.5, 0.5).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"  # bilinear | bicubic: the train crop's and the eval resize's
    # The recipe's augmentation (timm's names in brackets); each is off by default.
    rand_augment: Optional[str] = None  # timm's string, e.g. rand-m9-mstd0.5-inc1 [--aa]
    color_jitter: float = 0.0  # brightness, contrast, saturation; not with rand_augment, as timm [--color-jitter]
    random_erasing: float = 0.0  # probability per image, per-pixel normal values after normalising [--reprob]
    mixup_alpha: float = 0.0  # [--mixup]
    cutmix_alpha: float = 0.0  # [--cutmix]
    mixup_prob: float = 1.0  # chance that a batch is mixed at all [--mixup-prob]
    mixup_switch_prob: float = 0.5  # with both alphas > 0: chance of cutmix rather than mixup [--mixup-switch-prob]
    repeated_augmentation: int = 1  # >1: DeiT's repeated augmentation, each drawn image this many times per epoch

    @property
    def mixes(self) -> bool:
        """Mixup or cutmix is on: the training labels are soft targets, float32 [batch, classes], and
        the loss is soft-target cross entropy."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 64  # per device and micro-batch (semi_auto: per data-parallel replica)
    eval_batch_size: Optional[int] = None  # null: batch_size
    seed: int = 0
    output_dir: Optional[str] = None  # null: runs/<timestamp>
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    label_smoothing: float = 0.1
    grad_clip_norm: float = 1.0  # 0 disables clipping
    log_interval: int = 20  # steps
    eval_every_epochs: int = 1  # 0: evaluate only after the last epoch (which always happens)
    max_steps: int = 0  # >0 stops early (smoke runs); the schedule still spans all epochs
    resume: Optional[str] = None  # null | auto (newest verified checkpoint in output_dir) | a checkpoint path
    compile_cache: Optional[str] = None  # null | a directory: MindSpore's compiled graphs, reused by the next launch
    recompute: bool = False  # recompute each encoder block's activations in the backward pass (less memory)
    ema_decay: float = 0.0  # >0: an exponential moving average of the weights, ema = decay*ema + (1-decay)*weights
    layer_decay: float = 1.0  # <1: layer-wise lr decay, lr * layer_decay ** (layers above the parameter's)
    lr_base_batch: int = 0  # >0: lr is for this global batch and is scaled linearly to the run's (DeiT: 512)
    tensorboard: bool = False  # true: the metrics also as TensorBoard scalars in RUN_DIR/tensorboard (its extra)
    profile_steps: Optional[tuple[int, int]] = None  # [a, b]: MindSpore's profiler over steps a..b, RUN_DIR/profile

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size


@dataclass
class ParallelConfig:
    mode: str = "data"  # data | semi_auto (operator-level model parallel: Ascend only)
    model_parallel: int = 1  # mp: ranks each layer is split over (semi_auto); data-parallel degree dp = world / mp
    optimizer_shard: bool = False  # semi_auto: optimizer state and update sharded over the dp ranks
    grad_accumulation: int = 1  # micro-batches of train.batch_size per update; global batch = batch_size * dp * this
    head: str = "data"  # semi_auto: the classifier replicated (data) or its classes split over mp (model)
    device_target: str = AUTO_DEVICE  # auto | Ascend | GPU | CPU; the run sees the concrete one (bootstrap)
    threads_per_rank: int = 0  # CPU backend kernel threads; 0: cores / ranks on this node
    fused_cpu_kernels: bool = True  # CPU backend: vit_dist/backends/cpu/kernels.cc (needs g++): fused LayerNorm, bias+GELU
    # and attention in float32, and the host thread sleeping through each step


@dataclass
class PrecisionConfig:
    amp_level: str = "O0"  # O0 float32 | O1 white-listed ops | O2 all but LayerNorm/softmax | O3 all
    dtype: str = "float16"  # the low-precision type of O1-O3
    loss_scale: str = "none"  # none | fixed | dynamic
    loss_scale_value: float = 65536.0  # the fixed scale, or the dynamic scale's initial value
    loss_scale_factor: int = 2  # dynamic: divide by it on overflow, multiply after a window
    loss_scale_window: int = 2000  # dynamic: finite steps before the scale grows
    min_loss_scale: float = 1.0  # dynamic: the scale never drops below this


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0: at the end of each epoch only
    keep_last: int = 3


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Reads a YAML file or shipped config (shipped_configs.config_path; the defaults when path is
    None), applies `key=value` overrides, fills variant widths and validates."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)  # as the user named it
        path = config_path(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror}; pass an existing YAML file") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, e.g. 'train:'")
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(Config, raw, "", source)
    _fill_variant(cfg.model)
    validate(cfg)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (['train', 'epochs'], 3); the value is read as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=3")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _apply_override(raw: dict, item: str) -> None:
    keys, value = parse_override(item)
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: {key} is not a section")
    node[keys[-1]] = value


def _build(cls, raw: Any, prefix: str, source: str):
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{_suggest(str(key), fields, prefix)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.", source)
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}", source)
    return cls(**values)


def _suggest(key: str, fields: dict, prefix: str) -> str:
    return did_you_mean(key, fields, prefix) or f"; valid keys: {', '.join(prefix + f for f in fields)}"


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Checks a YAML value against a field's type; ints pass as floats and '5e-4' (which YAML 1.1
    reads as a string) as a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, key, source) for v, a in zip(value, args))
    if hint is float:
        number = _as_float(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:  # YAML's .nan and .inf: nothing in a config may be NaN or infinite
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise ConfigError(f"{source}: {key} must be {_type_name(hint)}, got {value!r}")


def _as_float(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return None


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _fill_variant(model: ModelConfig) -> None:
    if model.variant not in VIT_VARIANTS:
        raise ConfigError(f"model.variant '{model.variant}' is unknown; use one of {', '.join(VIT_VARIANTS)}")
    embed_dim, depth, num_heads = VIT_VARIANTS[model.variant]
    if model.embed_dim is None:
        model.embed_dim = embed_dim
    if model.depth is None:
        model.depth = depth
    if model.num_heads is None:
        model.num_heads = num_heads
    if model.mlp_dim is None:
        model.mlp_dim = 4 * model.embed_dim


def validate(cfg: Config) -> None:
    """Raises ConfigError on the first value that cannot work, with the fix. The checks that depend on
    the device pass parallel.device_target auto; validate again once it is resolved."""
    m, d, t, p, pr = cfg.model, cfg.data, cfg.train, cfg.parallel, cfg.precision
    _check_choice("parallel.device_target", p.device_target, DEVICE_TARGETS)
    _check_choice("parallel.mode", p.mode, PARALLEL_MODES)
    _check_choice("parallel.head", p.head, HEAD_LAYOUTS)
    _check_choice("precision.amp_level", pr.amp_level, AMP_LEVELS)
    _check_choice("data.on_bad_image", d.on_bad_image, BAD_IMAGE_ACTIONS)
    _check_choice("data.interpolation", d.interpolation, INTERPOLATIONS)
    _check_choice("precision.dtype", pr.dtype, LOW_PRECISION_DTYPES)
    _check_choice("precision.loss_scale", pr.loss_scale, LOSS_SCALES)
    for key, value in [("model.patch_size", m.patch_size), ("model.embed_dim", m.embed_dim),
                       ("model.depth", m.depth), ("model.num_heads", m.num_heads), ("model.mlp_dim", m.mlp_dim),
                       ("data.image_size", d.image_size), ("train.epochs", t.epochs),
                       ("train.batch_size", t.batch_size), ("train.log_interval", t.log_interval)]:
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if m.num_classes is not None and m.num_classes < 2:
        raise ConfigError(f"model.num_classes must be at least 2 (or null to count class folders), got {m.num_classes}")
    if d.image_size % m.patch_size:
        raise ConfigError(f"data.image_size {d.image_size} is not divisible by model.patch_size {m.patch_size}; "
                          f"use an image size that is a multiple of {m.patch_size}")
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"model.embed_dim {m.embed_dim} is not divisible by model.num_heads {m.num_heads}")
    for key, rate in [("model.dropout", m.dropout), ("model.attention_dropout", m.attention_dropout),
                      ("model.drop_path_rate", m.drop_path_rate), ("data.hflip_prob", d.hflip_prob)]:
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {rate}")
    if not 0.0 < d.eval_crop_fraction <= 1.0:
        raise ConfigError(f"data.eval_crop_fraction must be in (0, 1], got {d.eval_crop_fraction}")
    if not 0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0:
        raise ConfigError(f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(d.crop_scale)}")
    if not 0.0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        raise ConfigError(f"data.crop_ratio must be [min, max] with 0 < min <= max, got {list(d.crop_ratio)}")
    if not 0.0 < m.layer_norm_eps < 1.0:
        raise ConfigError(f"model.layer_norm_eps must be in (0, 1), got {m.layer_norm_eps}")
    if min(d.std) <= 0 or not all(0.0 <= v <= 1.0 for v in d.mean):
        raise ConfigError(f"data.mean must be 3 values in [0, 1] and data.std 3 values > 0 (pixels scaled to "
                          f"[0, 1]), got mean {list(d.mean)} std {list(d.std)}")
    if d.repeated_augmentation < 1:
        raise ConfigError(f"data.repeated_augmentation must be at least 1 (1: off; DeiT uses 3), got "
                          f"{d.repeated_augmentation}")
    if d.num_workers < 1:
        raise ConfigError(f"data.num_workers must be at least 1, got {d.num_workers}")
    if p.threads_per_rank < 0:
        raise ConfigError(f"parallel.threads_per_rank must be >= 0 (0: the node's cores split over its ranks), "
                          f"got {p.threads_per_rank}")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"train.lr must be > 0 and train.min_lr in [0, lr], got lr={t.lr} min_lr={t.min_lr}")
    if t.warmup_epochs < 0 or t.grad_clip_norm < 0 or t.weight_decay < 0 or not 0 <= t.label_smoothing < 1:
        raise ConfigError("train.warmup_epochs, grad_clip_norm and weight_decay must be >= 0 "
                          "and train.label_smoothing in [0, 1)")
    if not (0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1 and t.adam_eps > 0):
        raise ConfigError(f"train.adam_beta1 and adam_beta2 must be in [0, 1) and train.adam_eps > 0, got "
                          f"{t.adam_beta1}, {t.adam_beta2}, {t.adam_eps}")
    if t.eval_every_epochs < 0 or t.max_steps < 0:
        raise ConfigError("train.eval_every_epochs and train.max_steps must be >= 0")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no EMA), got {t.ema_decay}")
    if not 0.0 < t.layer_decay <= 1.0:
        raise ConfigError(f"train.layer_decay must be in (0, 1] (1: no layer-wise decay), got {t.layer_decay}")
    if t.lr_base_batch < 0:
        raise ConfigError(f"train.lr_base_batch must be >= 0 (0: train.lr as given), got {t.lr_base_batch}")
    if t.profile_steps is not None and not 1 <= t.profile_steps[0] <= t.profile_steps[1]:
        raise ConfigError(f"train.profile_steps must be [first, last] steps with 1 <= first <= last, got "
                          f"{list(t.profile_steps)}; e.g. train.profile_steps=[10,20]")
    if t.eval_batch_size is not None and t.eval_batch_size < 1:
        raise ConfigError(f"train.eval_batch_size must be at least 1 (or null), got {t.eval_batch_size}")
    if p.device_target == "CPU" and pr.amp_level != "O0" and pr.dtype == "bfloat16":
        raise ConfigError("precision.dtype bfloat16 has no CPU kernels in MindSpore 2.10 (Reshape, LayerNorm, "
                          "MatMul); use precision.dtype=float16 on CPU, or bfloat16 on Ascend")
    if pr.loss_scale_value <= 0 or pr.loss_scale_factor <= 1 or pr.loss_scale_window < 1 \
            or not 0 < pr.min_loss_scale <= pr.loss_scale_value:
        raise ConfigError("precision: loss_scale_value must be > 0, loss_scale_factor > 1, loss_scale_window >= 1 "
                          "and min_loss_scale in (0, loss_scale_value]")
    _validate_augment(cfg)
    _validate_parallel(cfg)
    if cfg.checkpoint.keep_last < 1 or cfg.checkpoint.every_n_steps < 0:
        raise ConfigError("checkpoint.keep_last must be >= 1 and checkpoint.every_n_steps >= 0")


def _validate_augment(cfg: Config) -> None:
    """The recipe's augmentation keys: ranges, timm's RandAugment string, and what each needs."""
    d = cfg.data
    for key, chance in [("data.random_erasing", d.random_erasing), ("data.mixup_prob", d.mixup_prob),
                        ("data.mixup_switch_prob", d.mixup_switch_prob)]:
        if not 0.0 <= chance <= 1.0:
            raise ConfigError(f"{key} is a probability: it must be in [0, 1], got {chance}")
    for key, value in [("data.color_jitter", d.color_jitter), ("data.mixup_alpha", d.mixup_alpha),
                       ("data.cutmix_alpha", d.cutmix_alpha)]:
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0 turns it off), got {value}")
    if d.rand_augment is not None:
        parse_rand_augment(d.rand_augment)
    per_image = [key for key, on in [("data.rand_augment", d.rand_augment is not None),
                                     ("data.color_jitter", d.color_jitter > 0),
                                     ("data.random_erasing", d.random_erasing > 0)] if on]
    if per_image and not d.augment:
        raise ConfigError(f"{', '.join(per_image)} need(s) data.augment=true (false trains on the eval transform); "
                          f"set data.augment=true or turn them off")
    # timm's Mixup refuses odd batches: the middle image of the mirrored pairing would mix with itself.
    if d.mixes and cfg.train.batch_size % 2:
        raise ConfigError(f"data.mixup_alpha/cutmix_alpha pair each image with the batch's mirror image, which needs "
                          f"an even train.batch_size, got {cfg.train.batch_size}")


def _validate_parallel(cfg: Config) -> None:
    """The layout checks that need no world size; parallel_degrees() does the rest."""
    m, p = cfg.model, cfg.parallel
    if p.model_parallel < 1 or p.grad_accumulation < 1:
        raise ConfigError(f"parallel.model_parallel and parallel.grad_accumulation must be at least 1, "
                          f"got {p.model_parallel} and {p.grad_accumulation}")
    if p.mode == "data":
        if p.model_parallel != 1 or p.optimizer_shard or p.head != "data":
            raise ConfigError("parallel.model_parallel, parallel.optimizer_shard and parallel.head=model need "
                              "parallel.mode=semi_auto; in data mode leave them at 1, false and data")
        return
    if p.optimizer_shard and cfg.train.grad_clip_norm > 0:
        raise ConfigError("parallel.optimizer_shard slices gradients in ways known only when MindSpore compiles, so "
                          "their global norm cannot be formed for clipping; set train.grad_clip_norm=0 with it, or "
                          "parallel.optimizer_shard=false")
    if cfg.train.compile_cache is not None:
        raise ConfigError("train.compile_cache is not for parallel.mode=semi_auto: a cached graph skips writing the "
                          "strategy file the checkpoint merge needs; set train.compile_cache=null")
    if cfg.train.resume is not None:
        raise ConfigError("train.resume is not built for parallel.mode=semi_auto (its slices load only into a "
                          "compiled parallel graph); start without train.resume")
    if p.device_target not in (*SEMI_AUTO_TARGETS, AUTO_DEVICE):
        raise ConfigError(f"parallel.mode semi_auto needs parallel.device_target Ascend: MindSpore 2.10 supports "
                          f"semi-auto-parallel there only, not on {p.device_target}; use parallel.mode=data there")
    # embed_dim = num_heads * head_dim, so heads divisible by mp makes the hidden size divisible too.
    for key, size in [("model.num_heads", m.num_heads), ("model.mlp_dim", m.mlp_dim)]:
        if size % p.model_parallel:
            raise ConfigError(f"{key} {size} is not divisible by parallel.model_parallel {p.model_parallel}; "
                              f"choose a model_parallel that divides {size}")
    if p.head == "model" and m.num_classes is not None and m.num_classes % p.model_parallel:
        raise ConfigError(f"parallel.head=model splits model.num_classes {m.num_classes} over parallel.model_parallel "
                          f"{p.model_parallel}, which does not divide it; use parallel.head=data")


def total_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    """The steps a run trains: every epoch's, or train.max_steps if fewer."""
    every_epoch = train.epochs * steps_per_epoch
    return min(every_epoch, train.max_steps or every_epoch)


def check_profile_steps(train: TrainConfig, steps_per_epoch: int) -> None:
    """train.profile_steps within the run's steps: one line before anything starts."""
    total = total_steps(train, steps_per_epoch)
    if train.profile_steps is not None and train.profile_steps[1] > total:
        raise ConfigError(f"train.profile_steps {list(train.profile_steps)} ends after the run's last step {total}; "
                          f"choose steps within 1..{total}")


def scaled_lr(train: TrainConfig, global_batch: int) -> float:
    """The peak learning rate of a run of this global batch: train.lr as given, or, with train.lr_base_batch
    N > 0, lr x global_batch / N (linear, as DeiT). min_lr is not scaled (neither DeiT nor timm scale it);
    a scaled rate below it is one ConfigError."""
    if not train.lr_base_batch:
        return train.lr
    lr = train.lr * global_batch / train.lr_base_batch
    if lr < train.min_lr:
        raise ConfigError(f"train.lr {train.lr:g} scaled to the global batch {global_batch} (train.lr_base_batch "
                          f"{train.lr_base_batch}) is {lr:g}, below train.min_lr {train.min_lr:g}; lower train.min_lr")
    return lr


def with_scaled_lr(cfg: Config, global_batch: int) -> tuple[Config, str]:
    """The config a run trains with, and how its rate was scaled (empty if it was not): train.lr the peak
    rate scaled_lr resolves and train.lr_base_batch 0, so that the config written into the run directory
    trains with the same rate when loaded again, at any world size."""
    given = cfg.train
    if not given.lr_base_batch:
        return cfg, ""
    train = dataclasses.replace(given, lr=scaled_lr(given, global_batch), lr_base_batch=0)
    return dataclasses.replace(cfg, train=train), (f"train.lr {train.lr:g} is {given.lr:g} x global batch "
                                                   f"{global_batch} / train.lr_base_batch {given.lr_base_batch}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} '{value}' is not supported; use one of {', '.join(choices)}")


def to_dict(cfg: Config) -> dict:
    """Plain dict for YAML/JSON output; tuples become lists."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))


# Keys that name places or what is recorded, not the computation: they may differ between launches of the same graph.
NOT_IN_GRAPH = ("output_dir", "resume", "compile_cache", "tensorboard", "profile_steps")


def config_digest(cfg: Config) -> str:
    """A short hash of what shapes a run's computation and results; where it goes, where it caches
    and what it resumes from are left out."""
    settings = to_dict(cfg)
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in NOT_IN_GRAPH}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def compile_cache_dir(cfg: Config, job: str, world_size: int) -> Optional[str]:
    """train.compile_cache/<key>: a folder per computation. MindSpore's cache checks the source files
    but not the values a Cell was built with, so a launch with another depth or batch size would load
    the old graph; the key (config, job, world size, MindSpore version, user) keeps them apart.
    preflight checks that the folder is the user's own: MindSpore loads and runs what it holds."""
    if cfg.train.compile_cache is None:
        return None
    from importlib.metadata import version

    identity = json.dumps([config_digest(cfg), job, world_size, version("mindspore"), os.getuid()])
    return str(Path(cfg.train.compile_cache) / hashlib.sha256(identity.encode()).hexdigest()[:16])


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
