"""Checkpoints as tensors (MindSpore's side): the training state written in safetensors (no pickle)
through the one atomic writer and read back into the live model, optimizer and loss scale; weights
for evaluation, inference and fine-tuning. Paths, manifests and pruning are host.checkpoint_files."""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore.communication import get_group_size

from vit_dist.host.atomic import atomic_path
from vit_dist.host.checkpoint_files import (EMA_PREFIX, Progress, checkpoint_path, missing_checkpoint, prune,
                                            sha256, write_manifest)
from vit_dist.host.errors import CheckpointError
from vit_dist.training.precision import scaler_state


def training_state(net, optimizer, scaler, ema=None) -> dict:
    """Model parameters, optimizer state (moments, step count), the loss scaler's state and the weights'
    EMA (training.ema.WeightEMA, if any), by name."""
    return {**{p.name: p for p in net.get_parameters()}, **optimizer.checkpoint_state(), **scaler_state(scaler),
            **(ema.checkpoint_state() if ema is not None else {})}


def live_weights(net, ema=None) -> dict[str, np.ndarray]:
    """The model's weights (its trainable parameters), or with an ema their EMA under the same names,
    as float32 arrays read from memory: what host.weights_only keeps, without reading a file back."""
    params = ({p.name[len(EMA_PREFIX):]: p for p in ema.average} if ema is not None
              else {p.name: p for p in net.trainable_params()})
    return {name: p.asnumpy().astype(np.float32) for name, p in params.items()}


def save(run_dir: Path, net, optimizer, scaler, ema, progress: Progress, keep_last: int, config_digest: str,
         slice_rank: int | None = None) -> Path:
    """Writes checkpoints/step_N.safetensors (rank N's slices: checkpoints/rank_N/) and its manifest
    through host.atomic, so a crash leaves either the old set of files or the new one; then deletes
    all but the newest keep_last."""
    path = checkpoint_path(run_dir, progress.step, slice_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = [{"name": name, "data": param} for name, param in training_state(net, optimizer, scaler, ema).items()]
    try:
        with atomic_path(path) as tmp:
            ms.save_checkpoint(state, str(tmp), append_dict=vars(progress), format="safetensors")
        manifest = {"step": progress.step, "epoch": progress.epoch, "config": config_digest, "sha256": sha256(path)}
        if slice_rank is not None:  # a merge must know how many ranks' slices make the whole
            manifest["world_size"] = get_group_size()
        write_manifest(path, manifest)
    except Exception as err:  # MindSpore wraps disk-full and permission errors in RuntimeError
        raise CheckpointError(f"cannot write checkpoint {path} ({' '.join(str(err).split())[:200]}); free disk "
                              f"space or set train.output_dir elsewhere, then resume with train.resume=auto: "
                              f"the previous checkpoints are intact") from None
    prune(path.parent, keep_last)
    return path


def restore(path: str | Path, net, optimizer, scaler, ema=None) -> Progress:
    """Loads everything save() wrote back into the live objects (ema.* tensors only into an `ema`, and
    ignored without one); returns where training stood."""
    saved = _read(Path(path))
    state = training_state(net, optimizer, scaler, ema)
    _check_fits(path, state, saved, "it was written by another model, optimizer or loss-scale setup; "
                                    "check model.*, precision.loss_scale, or start a new train.output_dir")
    for name, param in state.items():
        param.set_data(ms.Tensor(saved[name].asnumpy(), param.dtype))
    counters = {name: int(saved[name].asnumpy()) for name in ("step", "epoch", "skipped_steps") if name in saved}
    return Progress(**counters)


def _check_fits(path, wanted: dict, saved: dict, fix: str) -> None:
    """Raises CheckpointError unless every wanted tensor is saved with its shape."""
    missing = sorted(set(wanted) - set(saved))
    wrong_shape = sorted(f"{name} {tuple(saved[name].shape)} vs {tuple(wanted[name].shape)}"
                         for name in wanted.keys() & saved.keys()
                         if tuple(saved[name].shape) != tuple(wanted[name].shape))
    if missing or wrong_shape:
        raise CheckpointError(f"checkpoint {path} does not fit: missing {missing[:3]}, wrong shape {wrong_shape[:3]}; "
                              + fix)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise missing_checkpoint(path)
    try:
        return ms.load_checkpoint(str(path), format="safetensors")
    except Exception as err:  # MindSpore raises bare ValueError/RuntimeError for unreadable files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def load_weights(net, path: str | Path, ema: bool = False) -> None:
    """Loads model parameters (optimizer entries are ignored), with ema=True the weights' EMA (ema.W as
    W); every trainable one must be there with its shape, else CheckpointError names the mismatch. The
    others (a backend's random-draw counters) are loaded where the file has them."""
    saved = _read(Path(path))
    prefix = EMA_PREFIX if ema else ""
    trainable = net.trainable_params()
    _check_fits(path, {prefix + p.name: p for p in trainable}, saved, "check model.* and model.num_classes")
    values = {p.name: saved[p.name] for p in net.get_parameters() if p.name in saved}
    values.update({p.name: saved[prefix + p.name] for p in trainable})
    ms.load_param_into_net(net, values)


def load_pretrained(net, path: str | Path, say) -> None:
    """Fine-tuning start: loads the model parameters the file has, with their shapes, and reports
    the rest. A head of another class count is re-initialised (the model's fresh one is kept); any
    other shape mismatch is an error, since training from a half-loaded body would go unnoticed.
    Only the weights (trainable parameters) count: a backend's draw counters start afresh."""
    # A training checkpoint's EMA (ema.*) is not what fine-tuning starts from, nor worth reporting.
    saved = {name: tensor for name, tensor in _read(Path(path)).items() if not name.startswith(EMA_PREFIX)}
    params = {p.name: p for p in net.trainable_params()}
    wrong_shape = sorted(n for n in params.keys() & saved.keys() if tuple(saved[n].shape) != tuple(params[n].shape))
    body_mismatch = [n for n in wrong_shape if not n.startswith("head.")]
    if body_mismatch:
        shapes = ", ".join(f"{n} {tuple(saved[n].shape)} vs {tuple(params[n].shape)}" for n in body_mismatch[:3])
        raise CheckpointError(f"model.pretrained {path} does not fit model.*: {shapes}; write weights for this "
                              "model with vit-dist import-weights (--image-size resamples pos_embed) and its "
                              "--config-out")
    loaded = {n: saved[n] for n in params.keys() & saved.keys() if n not in wrong_shape}
    ms.load_param_into_net(net, loaded)
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    say(f"pretrained {path}: loaded {len(loaded)} of {len(params)} tensors; "
        + (f"re-initialised for another class count: {wrong_shape}; " if wrong_shape else "")
        + f"missing (initialised fresh): {missing or 'none'}; unexpected (ignored): {unexpected[:10] or 'none'}"
        + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
