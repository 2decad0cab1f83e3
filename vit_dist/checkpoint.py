"""Checkpoints in safetensors (no pickle): written atomically by rank 0, pruned to the last K."""
from __future__ import annotations

import hashlib
import json
import os
import sys
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
    try:
        ms.save_checkpoint(state, str(tmp), append_dict={"step": step, "epoch": epoch}, format="safetensors")
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        _write_manifest(path, {"step": step, "epoch": epoch, "sha256": _sha256(path)})
        _fsync_dir(path.parent)
    except Exception as err:  # MindSpore wraps disk-full and permission errors in RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path} ({' '.join(str(err).split())[:200]}); free disk "
                              f"space or set train.output_dir elsewhere, then resume with train.resume=auto: "
                              f"the previous checkpoints are intact") from None
    for old in sorted(checkpoint_dir(run_dir).glob(f"step_*{SUFFIX}"))[:-keep_last]:
        old.unlink()
        manifest_path(old).unlink(missing_ok=True)
    return path


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _write_manifest(path: Path, manifest: dict) -> None:
    tmp = manifest_path(path).with_name(f".{path.stem}.tmp.json")
    with open(tmp, "w") as out:
        json.dump(manifest, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, manifest_path(path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path: Path) -> bool:
    """The file is complete: its manifest exists and the checksum matches."""
    try:
        return json.loads(manifest_path(path).read_text())["sha256"] == _sha256(path)
    except (OSError, ValueError, KeyError):
        return False


def resume_path(resume: str | None, run_dir: Path) -> Path | None:
    """train.resume resolved: None, the given file, or (auto) the newest checkpoint in run_dir that
    verifies; a corrupt or truncated one is skipped with a warning naming it."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    for candidate in sorted(checkpoint_dir(run_dir).glob(f"step_*{SUFFIX}"), reverse=True):
        if verified(candidate):
            return candidate
        print(f"warning: skipping checkpoint {candidate}: missing manifest or checksum mismatch", file=sys.stderr)
    return None


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


def load_pretrained(net, path: str | Path, say) -> None:
    """Fine-tuning start: loads the model parameters the file has, with their shapes, and reports
    the rest. A head of another class count is re-initialised (the model's fresh one is kept); any
    other shape mismatch is an error, since training from a half-loaded body would go unnoticed."""
    import mindspore as ms

    saved = _read(Path(path))
    params = {p.name: p for p in net.get_parameters()}
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


def head_classes(path: str | Path) -> int:
    """The class count of a checkpoint's head, read from the safetensors header alone."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass --ckpt RUN_DIR/checkpoints/step_N{SUFFIX}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            if "head.bias" not in f.keys():
                raise CheckpointError(f"checkpoint {path} has no head (imported with --drop-head?); fine-tune it "
                                      "first, or import it with its head")
            return int(f.get_slice("head.bias").get_shape()[0])
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
