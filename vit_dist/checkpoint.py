"""Checkpoints in safetensors (no pickle): written atomically by rank 0, pruned to the last K."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

SUFFIX = ".safetensors"


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class Progress:
    """Where training stands, saved with the tensors."""
    step: int
    epoch: int
    skipped_steps: int = 0  # steps left out for non-finite gradients, since the start of the run


def checkpoint_dir(run_dir: Path, slice_rank: int | None = None) -> Path:
    """checkpoints/, or checkpoints/rank_N/ for the slices rank N holds under semi_auto."""
    folder = run_dir / "checkpoints"
    return folder if slice_rank is None else folder / f"rank_{slice_rank}"


def checkpoint_path(run_dir: Path, step: int, slice_rank: int | None = None) -> Path:
    return checkpoint_dir(run_dir, slice_rank) / f"step_{step:08d}{SUFFIX}"


def training_state(net, optimizer, scaler) -> dict:
    """Model parameters, optimizer state (moments, step count) and the loss scaler's state, by name."""
    from vit_dist.precision import scaler_state

    return {**{p.name: p for p in net.get_parameters()}, **optimizer.checkpoint_state(), **scaler_state(scaler)}


def save(run_dir: Path, net, optimizer, scaler, progress: Progress, keep_last: int, config_digest: str,
         slice_rank: int | None = None) -> Path:
    """Writes checkpoints/step_N.safetensors (rank N's slices: checkpoints/rank_N/) via a temporary
    file, fsync and rename, so a crash leaves either the old set of files or the new one; then deletes
    all but the newest keep_last."""
    import mindspore as ms

    path = checkpoint_path(run_dir, progress.step, slice_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{SUFFIX}")
    state = [{"name": name, "data": param} for name, param in training_state(net, optimizer, scaler).items()]
    try:
        ms.save_checkpoint(state, str(tmp), append_dict=vars(progress), format="safetensors")
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        _write_manifest(path, {"step": progress.step, "epoch": progress.epoch, "config": config_digest,
                               "sha256": _sha256(path)})
        _fsync_dir(path.parent)
    except Exception as err:  # MindSpore wraps disk-full and permission errors in RuntimeError
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path} ({' '.join(str(err).split())[:200]}); free disk "
                              f"space or set train.output_dir elsewhere, then resume with train.resume=auto: "
                              f"the previous checkpoints are intact") from None
    for old in sorted(path.parent.glob(f"step_*{SUFFIX}"))[:-keep_last]:
        _remove(old)
    return path


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def read_manifest(path: Path) -> dict:
    try:
        return json.loads(manifest_path(path).read_text())
    except (OSError, ValueError):
        return {}


def best_checkpoint(run_dir: Path) -> tuple[Path, float] | None:
    """The kept best checkpoint and its val top-1, if there is one that verifies."""
    for path in sorted(checkpoint_dir(run_dir).glob(f"best_step_*{SUFFIX}"), reverse=True):
        if verified(path):
            return path, float(read_manifest(path)["top1"])
    return None


def keep_best(run_dir: Path, path: Path, top1: float) -> Path:
    """Keeps the checkpoint `path` as checkpoints/best_step_N (a hard link where the file system has
    them: no copy, and pruning `path` later leaves it), with its val top-1 in the manifest; then
    removes the previous best. A crash in between leaves two bests, never none."""
    best = path.with_name(f"best_{path.name}")
    tmp = best.with_name(f".{best.stem}.tmp{SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, best)
        _write_manifest(best, {**read_manifest(path), "top1": top1})
        _fsync_dir(best.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot keep {path} as the best checkpoint ({err.strerror}); free disk space, then "
                              "resume with train.resume=auto") from None
    for old in checkpoint_dir(run_dir).glob(f"best_step_*{SUFFIX}"):
        if old != best:
            _remove(old)
    return best


def _remove(path: Path) -> None:
    path.unlink()
    manifest_path(path).unlink(missing_ok=True)


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
        return read_manifest(path).get("sha256") == _sha256(path)
    except OSError:
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


def restore(path: str | Path, net, optimizer, scaler) -> Progress:
    """Loads everything save() wrote back into the live objects; returns where training stood."""
    import mindspore as ms

    saved = _read(Path(path))
    state = training_state(net, optimizer, scaler)
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
    _check_fits(path, params, saved, "check model.* and model.num_classes")
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
