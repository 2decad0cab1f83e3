"""`vit-dist export-weights`: a run's weights as a folder that transformers or timm loads.

SRC is a run directory (its weights/best.safetensors; last.safetensors with last; with ema, the EMA
of its best or last full checkpoint), a weights-only file (its metadata gives the architecture and
preprocessing), or a full checkpoint or imported weights with the config they were trained with
(config, else RUN_DIR/config.yaml when the file sits in RUN_DIR/checkpoints). The tensors are renamed
by import's tables read backwards (tools.weights.to_source; timm's q/k/v fused). Everything is checked
before anything is written; OUT, a new folder, appears whole by one rename. No torch: safetensors'
numpy API.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np

from vit_dist import __version__
from vit_dist.host.atomic import atomic_folder
from vit_dist.host.checkpoint_files import evaluation_checkpoint, head_classes, read_manifest, resume_path
from vit_dist.host.config import load_config
from vit_dist.host.errors import CheckpointError, ConfigError
from vit_dist.host.run_record import CONFIG_FILE
from vit_dist.host.weights_only import WeightsCard, model_tensors, read_card, safetensors_bytes, weights_path
from vit_dist.tools.infer import known_class_names
from vit_dist.tools.weights import HF_NAMES, TIMM_NAMES, fuse_qkv, to_source

TARGETS = ("hf", "timm")
WEIGHTS_FILE = "model.safetensors"  # both libraries' name for a folder's weights
TIMM_EPS = 1e-6  # timm's VisionTransformer builds its LayerNorms with this epsilon; its config cannot change it
# Registered timm names whose defaults are these widths (embed_dim, depth, heads); others take
# vit_base_patch16_224's constructor with every size given in model_args, as timm's own exports do.
TIMM_ARCHITECTURES = {(192, 12, 3): "vit_tiny_patch16_224", (384, 12, 6): "vit_small_patch16_224",
                      (768, 12, 12): "vit_base_patch16_224", (1024, 24, 16): "vit_large_patch16_224",
                      (1280, 32, 16): "vit_huge_patch14_224"}
PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # Hugging Face processors record PIL's filter numbers


def export_weights(src: str | Path, target: str, out: str | Path, last: bool = False, ema: bool = False,
                   config: Optional[str] = None) -> tuple[Path, WeightsCard]:
    """Writes OUT (a new folder) for `target`; returns it and the card of the weights written."""
    out = Path(out)
    if target not in TARGETS:
        raise ConfigError(f"--to {target!r} is not supported; use one of {', '.join(TARGETS)}")
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out} exists; export-weights writes a new folder: remove it or choose another --out")
    path, card, tensors = read_source(Path(src), last, ema, config)
    files = hf_files(card, tensors) if target == "hf" else timm_files(card, tensors)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_folder(out) as folder:
            _write(folder, files)
    except OSError as err:
        raise CheckpointError(f"cannot write {out} ({err.strerror}); choose a writable --out") from None
    return out, card


def read_source(src: Path, last: bool, ema: bool, config: Optional[str]):
    """(the file read, its card, its model tensors) of SRC, as the module docstring says."""
    if src.is_dir():
        if not (src / CONFIG_FILE).is_file():
            raise ConfigError(f"{src} holds no {CONFIG_FILE}, so it is no run directory; give export-weights a "
                              "run directory, a weights file or a checkpoint")
        kept = weights_path(src, "last" if last else "best")
        if kept.is_file() and not ema:
            src = kept
        else:  # the EMA, or a run from before weights-only files (or semi_auto's): its full checkpoint
            src = resume_path("auto", src) if last else evaluation_checkpoint(src)
            if src is None:
                raise CheckpointError(f"{kept.parent.parent} holds no verified checkpoint to export")
            config = config or str(src.parent.parent / CONFIG_FILE)
    if not src.is_file():
        raise CheckpointError(f"{src} does not exist; pass a run directory, a weights file or a checkpoint")
    card = read_card(src)
    if card is not None:
        if config:
            raise ConfigError(f"{src} records its architecture and preprocessing; leave out --config")
        return src, card, model_tensors(src, card.spec, ema)
    config = config or _run_config(src)
    if config is None:
        raise ConfigError(f"{src} records no architecture (a full checkpoint or imported weights); pass --config "
                          "CONFIG, the config it was trained with (RUN_DIR/config.yaml)")
    cfg = load_config(config, [])
    num_classes = cfg.model.num_classes or head_classes(src)
    card = replace(WeightsCard.of(cfg, num_classes, known_class_names(src, num_classes)),
                   step=read_manifest(src).get("step"), weights="ema" if ema else "model")
    return src, card, model_tensors(src, card.spec, ema)


def _run_config(checkpoint: Path) -> Optional[str]:
    """RUN_DIR/config.yaml of a checkpoint in RUN_DIR/checkpoints (or RUN_DIR/weights)."""
    found = checkpoint.parent.parent / CONFIG_FILE
    return str(found) if checkpoint.parent.name in ("checkpoints", "weights") and found.is_file() else None


def hf_files(card: WeightsCard, tensors: dict[str, np.ndarray]) -> dict:
    """transformers' ViTForImageClassification: config.json, model.safetensors (its save_pretrained
    names: the body under vit., the head as classifier) and preprocessor_config.json (resize the
    shortest edge, center-crop, as vit-dist's eval does: CLIPImageProcessor's steps)."""
    s = card.spec
    names = list(card.classes) if card.classes else [f"LABEL_{i}" for i in range(s.num_classes)]
    config = {"architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": s.embed_dim,
              "num_hidden_layers": s.depth, "num_attention_heads": s.num_heads, "intermediate_size": s.mlp_dim,
              "hidden_act": "gelu_pytorch_tanh" if s.gelu_approximate else "gelu", "hidden_dropout_prob": 0.0,
              "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": s.layer_norm_eps,
              "image_size": s.image_size, "patch_size": s.patch_size, "num_channels": s.in_channels,
              "qkv_bias": True, "encoder_stride": s.patch_size, "dtype": "float32",
              "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                 "size": {"shortest_edge": card.resize}, "resample": PIL_RESAMPLE[card.interpolation],
                 "do_center_crop": True, "crop_size": {"height": s.image_size, "width": s.image_size},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(card.mean),
                 "image_std": list(card.std), "do_convert_rgb": True}
    renamed = to_source(tensors, HF_NAMES)
    state = {(name if name.startswith("classifier.") else f"vit.{name}"): value for name, value in renamed.items()}
    return {"config.json": config, "preprocessor_config.json": processor, WEIGHTS_FILE: state}


def timm_files(card: WeightsCard, tensors: dict[str, np.ndarray]) -> dict:
    """timm's VisionTransformer: model.safetensors (its state dict, fused qkv) and config.json as
    timm.models.save_for_hf writes it (architecture, model_args, pretrained_cfg, label_names), which
    timm.create_model("local-dir:OUT") reads."""
    s = card.spec
    if s.layer_norm_eps != TIMM_EPS:
        raise CheckpointError(f"timm's ViT fixes LayerNorm epsilon at {TIMM_EPS:g} and these weights were trained "
                              f"with {s.layer_norm_eps:g} (model.layer_norm_eps); export them --to hf, whose config "
                              "records it")
    mlp_ratio = s.mlp_dim / s.embed_dim
    if int(s.embed_dim * mlp_ratio) != s.mlp_dim:
        raise CheckpointError(f"timm sizes the MLP as int(dim * mlp_ratio), which gives no {s.mlp_dim} for dim "
                              f"{s.embed_dim}; export --to hf, whose config takes the MLP width")
    model_args = {"num_classes": s.num_classes, "img_size": s.image_size, "patch_size": s.patch_size,
                  "embed_dim": s.embed_dim, "depth": s.depth, "num_heads": s.num_heads, "mlp_ratio": mlp_ratio,
                  "in_chans": s.in_channels, "global_pool": "token", "class_token": True, "qkv_bias": True}
    if s.gelu_approximate:
        model_args["act_layer"] = "gelu_tanh"
    pretrained_cfg = {"input_size": [s.in_channels, s.image_size, s.image_size], "fixed_input_size": True,
                      "interpolation": card.interpolation, "crop_pct": card.crop_fraction, "crop_mode": "center",
                      "mean": list(card.mean), "std": list(card.std), "num_classes": s.num_classes,
                      "first_conv": "patch_embed.proj", "classifier": "head"}
    config = {"architecture": TIMM_ARCHITECTURES.get((s.embed_dim, s.depth, s.num_heads), "vit_base_patch16_224"),
              "num_classes": s.num_classes, "num_features": s.embed_dim, "global_pool": "token",
              "model_args": model_args, "pretrained_cfg": pretrained_cfg}
    if card.classes:
        config["label_names"] = list(card.classes)
    return {"config.json": config, WEIGHTS_FILE: to_source(fuse_qkv(tensors), TIMM_NAMES)}


def _write(folder: Path, files: dict) -> None:
    """The files into the fresh folder (atomic_folder's), each created exclusively (the weights through
    safetensors_bytes, so that a full disk raises)."""
    for name, content in files.items():
        if name == WEIGHTS_FILE:  # "format": "pt" is what transformers requires of a safetensors file
            data = safetensors_bytes(content, {"format": "pt", "converted_by": f"vit-dist {__version__}"})
        else:
            data = (json.dumps(content, indent=2) + "\n").encode()
        with open(folder / name, "xb") as f:
            f.write(data)
