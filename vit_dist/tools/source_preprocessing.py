"""The evaluation preprocessing a pretrained ViT's source library applies, as vit-dist's data settings.

Weights are only as accurate as the preprocessing they are evaluated with: timm's ViTs mostly resize
bicubically to 224 / 0.9 and normalise by 0.5, Hugging Face's ViTImageProcessor resizes bilinearly
straight to 224 and normalises by 0.5, MindCV's ViT recipes resize bicubically to 224 / 0.875 and
normalise by ImageNet's statistics. Each reader here turns what a source records into a Preprocessing
(data.interpolation, data.eval_crop_fraction, data.mean, data.std) plus notes on what vit-dist's eval
transform (resize the short side, center crop, normalise) cannot reproduce. Inputs are parsed JSON
from files beside the weights: untrusted, so a malformed field is one CheckpointError naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from vit_dist.host.config import INTERPOLATIONS, DataConfig
from vit_dist.host.errors import CheckpointError

IMAGENET_MEAN, IMAGENET_STD = DataConfig.mean, DataConfig.std  # the config's defaults are ImageNet's
# PIL's resampling filters by number, as Hugging Face processors record them in "resample".
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to image_size / crop_fraction with `interpolation`, center-crop
    image_size, scale pixels to [0, 1], subtract mean and divide by std (per RGB channel)."""
    interpolation: str
    crop_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def apply(self, data) -> None:
        """Writes these settings into a DataConfig."""
        data.interpolation, data.eval_crop_fraction = self.interpolation, self.crop_fraction
        data.mean, data.std = self.mean, self.std


# MindCV's ViT recipes (configs/vit/vit_{b32,l16,l32}_224*.yaml) evaluate with interpolation
# "bicubic" and crop_pct 0.875 (stated, or mindcv.data.constants.DEFAULT_CROP_PCT), and normalise by
# ImageNet's statistics (IMAGENET_DEFAULT_MEAN/STD); MindCV checkpoints record none of it.
MINDCV = Preprocessing("bicubic", 0.875, IMAGENET_MEAN, IMAGENET_STD)


def from_timm(pretrained_cfg: dict, where: str) -> tuple[Preprocessing, list[str]]:
    """timm's pretrained_cfg (config.json's "pretrained_cfg", or timm's registry), read as
    timm.data.resolve_data_config reads it: absent keys take timm's defaults (bicubic, crop_pct
    0.875, ImageNet mean and std, center crop)."""
    notes = []
    interpolation = _interpolation(_field(pretrained_cfg, "interpolation", "bicubic", str, where), where, notes)
    crop = _field(pretrained_cfg, "crop_pct", 0.875, (int, float), where)
    mode = _field(pretrained_cfg, "crop_mode", "center", str, where)
    if mode != "center":
        notes.append(f"{where}: timm's crop_mode {mode!r} is not vit-dist's (resize the short side, center crop); "
                     "data.eval_crop_fraction approximates it")
    return Preprocessing(interpolation, _fraction(crop, "crop_pct", where),
                         _triple(pretrained_cfg.get("mean", IMAGENET_MEAN), "mean", where),
                         _triple(pretrained_cfg.get("std", IMAGENET_STD), "std", where)), notes


def from_timm_name(architecture: str) -> Optional[dict]:
    """timm's registered pretrained_cfg for a model name ("deit_tiny_patch16_224", its default tag's;
    or "vit_base_patch16_224.augreg_in21k"), or None when timm is not installed or does not know it."""
    try:
        from timm.models import get_pretrained_cfg
    except ImportError:
        return None
    try:
        cfg = get_pretrained_cfg(architecture)
    except RuntimeError:  # a tag the architecture does not have
        return None
    return None if cfg is None else cfg.to_dict()


def from_hf(processor: Optional[dict], where: str) -> tuple[Preprocessing, list[str]]:
    """A Hugging Face preprocessor_config.json (None: ViTImageProcessor's defaults). The processor
    resizes to size (height x width, or the shortest edge to a length), then center-crops crop_size
    when do_center_crop: the crop fraction is the crop over the resize."""
    notes = []
    if processor is None:
        notes.append(f"{where} not found: ViTImageProcessor's defaults assumed (bilinear, 224x224, no crop, "
                     "mean and std 0.5)")
        processor = {}
    resample = _field(processor, "resample", 2, int, where)
    interpolation = _interpolation(PIL_FILTERS.get(resample, str(resample)), where, notes)
    height, squash = _hf_size(processor.get("size", {"height": 224, "width": 224}), "size", where)
    crop = 1.0
    if _field(processor, "do_center_crop", False, bool, where):
        crop_height, _ = _hf_size(processor.get("crop_size", {"height": 224, "width": 224}), "crop_size", where)
        crop = _fraction(crop_height / height, "crop_size / size", where)
    if squash:
        notes.append(f"{where}: Hugging Face resizes to {height}x{height} without keeping the aspect ratio; "
                     "vit-dist resizes the short side and center-crops (the same on square images)")
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if _field(processor, "do_normalize", True, bool, where):
        mean = _triple(processor.get("image_mean", 0.5), "image_mean", where)
        std = _triple(processor.get("image_std", 0.5), "image_std", where)
    return Preprocessing(interpolation, crop, mean, std), notes


def _hf_size(size: Any, key: str, where: str) -> tuple[int, bool]:
    """(the resize's height, whether it squashes): an int or {"height", "width"} is a fixed size
    (transformers reads a bare int as a square), {"shortest_edge": n} keeps the aspect ratio."""
    if isinstance(size, dict) and "shortest_edge" in size:
        return _positive(size["shortest_edge"], key, where), False
    if isinstance(size, dict) and "height" in size and size.get("width", size["height"]) == size["height"]:
        return _positive(size["height"], key, where), True
    if isinstance(size, int) and not isinstance(size, bool):
        return _positive(size, key, where), True
    raise CheckpointError(f"{where}: {key} {size!r} is not a square size or a shortest edge that vit-dist can "
                          "evaluate at; fix or remove the file")


def _interpolation(name: str, where: str, notes: list[str]) -> str:
    if name in INTERPOLATIONS:
        return name
    notes.append(f"{where}: interpolation {name!r} has no data.interpolation equivalent; bilinear used")
    return "bilinear"


def _field(mapping: dict, key: str, default: Any, kind, where: str) -> Any:
    value = mapping.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CheckpointError(f"{where}: {key} {value!r} is malformed; fix or remove the file")
    return value


def _positive(value: Any, key: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointError(f"{where}: {key} {value!r} is not a positive size")
    return value


def _fraction(value: float, key: str, where: str) -> float:
    if not 0.0 < value <= 1.0:
        raise CheckpointError(f"{where}: {key} {value!r} is not a crop fraction in (0, 1]")
    return float(value)


def _triple(value: Any, key: str, where: str) -> tuple[float, float, float]:
    """One number for all channels, or three."""
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if not (isinstance(values, (list, tuple)) and len(values) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise CheckpointError(f"{where}: {key} {value!r} is not one number or three")
    return tuple(float(v) for v in values)
