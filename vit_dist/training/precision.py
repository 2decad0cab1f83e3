"""Mixed precision applied to a built model, and the loss scaler the train step uses.

O1 casts the white-listed ops (MatMul, Conv, ...) to low precision; O2 casts the whole network but
keeps LayerNorm and softmax in float32; O3 casts everything. The loss is computed in float32 at every
level (training.step casts the logits).
"""
from __future__ import annotations

from vit_dist.host.config import PrecisionConfig

# Prefix of the scaler's state in checkpoints: its Parameters have generic names ("scale_value").
SCALER_PREFIX = "loss_scaler."


def low_precision_dtype(cfg: PrecisionConfig):
    import mindspore as ms

    return {"float16": ms.float16, "bfloat16": ms.bfloat16}[cfg.dtype]


def apply_mixed_precision(net, cfg: PrecisionConfig):
    """Returns the network cast for cfg.amp_level (the same network at O0)."""
    from mindspore import amp, nn

    if cfg.amp_level == "O0":
        return net
    dtype = low_precision_dtype(cfg)
    if cfg.amp_level == "O2":
        # Normalisation statistics and softmax's exponentials lose too much in 16 bits.
        return amp.custom_mixed_precision(net, black_list=amp.get_black_list() + [nn.Softmax], dtype=dtype)
    return amp.auto_mixed_precision(net, cfg.amp_level, dtype=dtype)


def build_loss_scaler(cfg: PrecisionConfig):
    """None (no scaling), amp.StaticLossScaler or amp.DynamicLossScaler: MindSpore's functional
    scalers, which run on every backend (nn.TrainOneStepWithLossScaleCell needs Ascend's overflow
    status op)."""
    from mindspore import amp

    if cfg.loss_scale == "none":
        return None
    if cfg.loss_scale == "fixed":
        return amp.StaticLossScaler(cfg.loss_scale_value)
    return amp.DynamicLossScaler(cfg.loss_scale_value, cfg.loss_scale_factor, cfg.loss_scale_window)


def scaler_state(scaler) -> dict:
    """The scaler's Parameters under checkpoint names (empty without a scaler)."""
    from mindspore import Parameter

    if scaler is None:
        return {}
    # The scalers are plain objects, not Cells: their state is the Parameters among their attributes.
    return {SCALER_PREFIX + name: value for name, value in vars(scaler).items() if isinstance(value, Parameter)}
