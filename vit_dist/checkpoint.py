"""Checkpoints in safetensors (no pickle): written atomically by rank 0, pruned to the last K."""
from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".safetensors"
# Optimizer entries not worth saving: the learning rate is set from the schedule every step, and
# the amsgrad buffer is never used (amsgrad is off).
NOT_SAVED_PREFIXES = ("learning_rate", "max_exp_avg_sq")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}{SUFFIX}"


def training_state(net, optimizer, scaler) -> dict:
    """Model parameters, optimizer state (moments, step count) and the loss scaler's state, by name."""
    from vit_dist.precision import scaler_state

    state = {p.name: p for p in net.get_parameters()}
    for _, param in optimizer.parameters_and_names():
        if param.name not in state and not param.name.startswith(NOT_SAVED_PREFIXES):
            state[param.name] = param
    return {**state, **scaler_state(scaler)}


def save(run_dir: Path, net, optimizer, scaler, step: int, epoch: int, keep_last: int) -> Path:
    """Writes checkpoints/step_N.safetensors via a temporary file, fsync and rename, so a crash
    leaves either the old set of files or the new one; then deletes all but the newest keep_last."""
    import mindspore as ms

    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{SUFFIX}")
    state = [{"name": name, "data": param} for name, param in training_state(net, optimizer, scaler).items()]
    ms.save_checkpoint(state, str(tmp), append_dict={"step": step, "epoch": epoch}, format="safetensors")
    with open(tmp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    for old in sorted(checkpoint_dir(run_dir).glob(f"step_*{SUFFIX}"))[:-keep_last]:
        old.unlink()
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore(path: str | Path, net, optimizer, scaler) -> tuple[int, int]:
    """Loads everything save() wrote back into the live objects; returns (step, epoch)."""
    import mindspore as ms

    saved = _read(Path(path))
    state = training_state(net, optimizer, scaler)
    missing = sorted(set(state) - set(saved))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing[:5]}; it was written by another model or "
                              "precision setup")
    for name, param in state.items():
        param.set_data(ms.Tensor(saved[name].asnumpy(), param.dtype))
    return int(saved["step"].asnumpy()), int(saved["epoch"].asnumpy())


def _read(path: Path) -> dict:
    import mindspore as ms

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass --ckpt RUN_DIR/checkpoints/step_N{SUFFIX}")
    try:
        return ms.load_checkpoint(str(path), format="safetensors")
    except Exception as err:  # MindSpore raises bare ValueError/RuntimeError for unreadable files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def load_weights(net, path: str | Path) -> None:
    """Loads model parameters (optimizer entries are ignored); every model parameter must be there
    with its shape, else CheckpointError names the mismatch."""
    import mindspore as ms

    saved = _read(Path(path))
    params = {p.name: p for p in net.get_parameters()}
    missing = sorted(set(params) - set(saved))
    wrong_shape = sorted(n for n in params.keys() & saved.keys() if tuple(saved[n].shape) != tuple(params[n].shape))
    if missing or wrong_shape:
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
                              f"wrong shape {wrong_shape[:5]}; check model.* and model.num_classes")
    ms.load_param_into_net(net, {name: saved[name] for name in params})
