"""Checkpoints in safetensors (no pickle): written atomically by rank 0, pruned to the last K."""
from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".safetensors"
# The learning rate is a function of the step, set into the optimizer every step.
NOT_SAVED_PREFIX = "learning_rate"


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}{SUFFIX}"


def training_state(net, optimizer) -> list[dict]:
    """Model parameters, then optimizer state (moments, step count) not already among them."""
    state = {p.name: p for p in net.get_parameters()}
    for _, param in optimizer.parameters_and_names():
        if param.name not in state and not param.name.startswith(NOT_SAVED_PREFIX):
            state[param.name] = param
    return [{"name": name, "data": param} for name, param in state.items()]


def save(run_dir: Path, net, optimizer, step: int, epoch: int, keep_last: int) -> Path:
    """Writes checkpoints/step_N.safetensors via a temporary file, fsync and rename, so a crash
    leaves either the old set of files or the new one; then deletes all but the newest keep_last."""
    import mindspore as ms

    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{SUFFIX}")
    ms.save_checkpoint(training_state(net, optimizer), str(tmp), append_dict={"step": step, "epoch": epoch},
                       format="safetensors")
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


def load_weights(net, path: str | Path) -> None:
    """Loads model parameters (optimizer entries are ignored); every model parameter must be there
    with its shape, else CheckpointError names the mismatch."""
    import mindspore as ms

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass --ckpt RUN_DIR/checkpoints/step_N{SUFFIX}")
    try:
        saved = ms.load_checkpoint(str(path), format="safetensors")
    except Exception as err:  # MindSpore raises bare ValueError/RuntimeError for unreadable files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    params = {p.name: p for p in net.get_parameters()}
    missing = sorted(set(params) - set(saved))
    wrong_shape = sorted(n for n in params.keys() & saved.keys() if tuple(saved[n].shape) != tuple(params[n].shape))
    if missing or wrong_shape:
        raise CheckpointError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
                              f"wrong shape {wrong_shape[:5]}; check model.* and model.num_classes")
    ms.load_param_into_net(net, {name: saved[name] for name in params})
