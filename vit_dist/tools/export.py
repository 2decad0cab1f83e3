"""A checkpoint as a deployable graph: MindIR (any backend) or ONNX, for a fixed input batch."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from vit_dist.host.config import Config
from vit_dist.host.errors import CheckpointError, ConfigError
from vit_dist.host.placement import Placement
from vit_dist.host.run_record import say

FORMATS = {"mindir": ".mindir", "onnx": ".onnx"}


def export_model(cfg: Config, checkpoint_path: str | Path, fmt: str, out: Optional[str | Path],
                 batch_size: int, ema: bool = False) -> Path:
    """Writes the model (ema: with the checkpoint's EMA weights) in inference mode with input
    (batch_size, 3, image_size, image_size); returns the file's path (OUT, or the checkpoint's name
    with the format's suffix, after .ema for the EMA)."""
    import mindspore as ms

    from vit_dist.training.assemble import model_from_checkpoint

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt} is not supported; use one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    suffix = FORMATS[fmt]
    out = Path(out) if out else Path(checkpoint_path).with_suffix((".ema" if ema else "") + suffix)
    if out.suffix != suffix:
        raise ConfigError(f"--out {out}: MindSpore appends {suffix} to the name; give a name ending in {suffix}")
    # Stock layers: a graph with this machine's custom-op library in it would load nowhere else.
    net = model_from_checkpoint(cfg, checkpoint_path, Placement.single(), lambda line: say(line, True),
                                portable=True, ema=ema)
    size = cfg.data.image_size
    example = ms.Tensor(np.zeros((batch_size, 3, size, size), np.float32))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "onnx":  # ms.export(file_format="ONNX") is deprecated in favour of mindspore.onnx
            from mindspore import onnx

            onnx.export(net, example, file_name=str(out), input_names=["images"], output_names=["logits"])
        else:
            ms.export(net, example, file_name=str(out.with_suffix("")), file_format="MINDIR")
    except (RuntimeError, ValueError, TypeError) as err:
        reason = " ".join(str(err).split())
        if "Erf" in reason:  # MindSpore 2.10's ONNX exporter has no converter for exact GELU's Erf
            raise CheckpointError("MindSpore 2.10 cannot export exact GELU (Erf) to ONNX; use --format mindir, or "
                                  "a model built with model.gelu_approximate=true (tanh GELU)") from None
        raise CheckpointError(f"MindSpore cannot export {fmt} here ({reason[:300]}); "
                              "use --format mindir") from None
    if not out.is_file():
        raise CheckpointError(f"MindSpore reported no error but wrote no {out}; use --format mindir")
    return out


def load_exported(path: str | Path):
    """The exported MindIR as a callable cell (for checking an export, or serving it)."""
    import mindspore as ms
    from mindspore import nn

    return nn.GraphCell(ms.load(str(path)))
