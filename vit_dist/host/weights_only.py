"""Weights-only files: the model's tensors (vit-dist's names) with what it takes to use them anywhere
as safetensors metadata (string -> string): the architecture, the eval preprocessing, the class
names, the step, whose weights they are (the model's or its EMA's) and the vit-dist version. Rank 0
keeps RUN_DIR/weights/last.safetensors and best.safetensors beside the full checkpoints (which resume
needs); `vit-dist export-weights` converts them for transformers and timm. Read and written through
safetensors' numpy API: no MindSpore."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from vit_dist import __version__
from vit_dist.host.atomic import write_atomic
from vit_dist.host.checkpoint_files import EMA_PREFIX, require_ema
from vit_dist.host.config import INTERPOLATIONS, Config
from vit_dist.host.errors import CheckpointError
from vit_dist.models.spec import ViTSpec, parameter_shapes

WEIGHTS_DIR = "weights"
KINDS = ("best", "last")
# The spec's fields a trained net's inference depends on (dropout and stochastic depth do not).
ARCHITECTURE_FIELDS = ("image_size", "patch_size", "in_channels", "embed_dim", "depth", "num_heads", "mlp_dim",
                       "num_classes", "layer_norm_eps", "gelu_approximate")
# What models/vit.py always builds, recorded so that a reader needs no knowledge of vit-dist.
FIXED_ARCHITECTURE = {"qkv_bias": True, "class_token": True, "pooling": "class_token", "norm": "pre",
                      "position_embedding": "learned"}


def weights_path(run_dir: Path, kind: str) -> Path:
    """RUN_DIR/weights/best.safetensors or last.safetensors."""
    return run_dir / WEIGHTS_DIR / f"{kind}.safetensors"


@dataclass(frozen=True)
class WeightsCard:
    """A weights-only file's metadata. Preprocessing: resize the short side to `resize` (int(image_size
    / crop_fraction), as the eval pipeline does) with `interpolation`, center-crop image_size, scale to
    [0, 1], subtract mean, divide by std."""
    spec: ViTSpec
    interpolation: str
    crop_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: Optional[tuple[str, ...]] = None  # names in label order, when known
    step: Optional[int] = None
    weights: str = "model"  # "model" | "ema": the model's weights or their EMA
    version: str = __version__

    @classmethod
    def of(cls, cfg: Config, num_classes: int, classes: Optional[list[str]] = None) -> "WeightsCard":
        """The card of a config's model for num_classes classes (names kept only if they are as many)."""
        spec = replace(ViTSpec.of(cfg, num_classes), dropout=0.0, attention_dropout=0.0, drop_path_rate=0.0)
        d = cfg.data
        return cls(spec, d.interpolation, d.eval_crop_fraction, tuple(d.mean), tuple(d.std),
                   tuple(classes) if classes and len(classes) == num_classes else None)

    @property
    def resize(self) -> int:
        return int(self.spec.image_size / self.crop_fraction)

    def metadata(self) -> dict[str, str]:
        architecture = {name: getattr(self.spec, name) for name in ARCHITECTURE_FIELDS}
        preprocessing = {"resize": self.resize, "crop_size": self.spec.image_size,
                         "crop_fraction": self.crop_fraction, "interpolation": self.interpolation,
                         "mean": list(self.mean), "std": list(self.std)}
        meta = {"architecture": json.dumps({**architecture, **FIXED_ARCHITECTURE}),
                "preprocessing": json.dumps(preprocessing), "weights": self.weights, "vit_dist_version": self.version}
        if self.classes is not None:
            meta["classes"] = json.dumps(list(self.classes))
        if self.step is not None:
            meta["step"] = str(self.step)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: Path) -> "WeightsCard":
        """The card metadata() wrote; a malformed one is a CheckpointError naming the file."""
        try:
            architecture, pre = json.loads(meta["architecture"]), json.loads(meta["preprocessing"])
            fixed = {name: architecture[name] for name in FIXED_ARCHITECTURE}
            if fixed != FIXED_ARCHITECTURE or pre["interpolation"] not in INTERPOLATIONS:
                raise ValueError(f"architecture {fixed} or interpolation {pre['interpolation']!r} is not vit-dist's")
            spec = ViTSpec(**{name: architecture[name] for name in ARCHITECTURE_FIELDS})
            classes = json.loads(meta["classes"]) if "classes" in meta else None
            return cls(spec, pre["interpolation"], float(pre["crop_fraction"]), tuple(pre["mean"]), tuple(pre["std"]),
                       None if classes is None else tuple(str(c) for c in classes),
                       int(meta["step"]) if "step" in meta else None, meta.get("weights", "model"),
                       meta.get("vit_dist_version", "unknown"))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: malformed vit-dist metadata ({err}); rewrite it with vit-dist "
                                  "export-weights from the full checkpoint and --config") from None

    def describe(self) -> str:
        s = self.spec
        return (f"ViT/{s.patch_size} at {s.image_size}px: dim {s.embed_dim}, depth {s.depth}, heads {s.num_heads}, "
                f"mlp {s.mlp_dim}, {s.num_classes} classes; {self.weights} weights"
                + (f" of step {self.step}" if self.step is not None else ""))


def read_card(path: Path) -> Optional[WeightsCard]:
    """The card of a weights-only file; None for a file without one (a full checkpoint, imported weights)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"cannot read {path}: {err}") from None
    return WeightsCard.from_metadata(meta, path) if "architecture" in meta else None


def model_tensors(path: Path, spec: ViTSpec, ema: bool = False) -> dict[str, np.ndarray]:
    """The spec's parameters from any safetensors file of vit-dist's names (a full checkpoint, a
    weights-only file, imported weights), in float32; with ema, their EMA (ema.W as W). A missing
    tensor or one of another shape is a CheckpointError naming it."""
    from safetensors import safe_open

    if ema:
        require_ema(path)
    prefix = EMA_PREFIX if ema else ""
    with safe_open(str(path), framework="numpy") as f:
        names = set(f.keys())
        shapes = parameter_shapes(spec)
        missing = sorted(prefix + n for n in shapes if prefix + n not in names)
        wrong = sorted(f"{n} {tuple(f.get_slice(prefix + n).get_shape())} vs {shape}" for n, shape in shapes.items()
                       if prefix + n in names and tuple(f.get_slice(prefix + n).get_shape()) != shape)
        if missing or wrong:
            raise CheckpointError(f"{path} does not fit the architecture: missing {missing[:3]}, wrong shape "
                                  f"{wrong[:3]}; pass the config it was trained with")
        return {n: f.get_tensor(prefix + n).astype(np.float32) for n in shapes}


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The tensors as a safetensors file's bytes, for Python to write: serialised in memory, since
    safetensors' own file writer drops the error of a write that fills the disk."""
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(value) for name, value in tensors.items()}, metadata=metadata)


def write_weights(path: Path, tensors: dict[str, np.ndarray], card: WeightsCard) -> Path:
    """Writes the tensors with the card's metadata through host.atomic (safetensors_bytes)."""
    data = safetensors_bytes(tensors, card.metadata())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, durable=True)
    except OSError as err:
        raise CheckpointError(f"cannot write {path} ({err.strerror}); free disk space or set train.output_dir "
                              "elsewhere, then resume with train.resume=auto: the checkpoints are intact") from None
    return path


def keep_weights(run_dir: Path, kind: str, tensors: dict[str, np.ndarray], card: WeightsCard) -> Path:
    """RUN_DIR/weights/<kind>.safetensors: the card's spec's parameters, taken from tensors (the
    model's weights or, with card.weights "ema", their EMA, under the model's names)."""
    return write_weights(weights_path(run_dir, kind), {name: tensors[name] for name in parameter_shapes(card.spec)},
                         card)
