"""Checkpoint files without MindSpore: where they go, their manifests (step, epoch, config digest,
sha256), verification, pruning, keep-best, what train.resume resolves to, and a head's class count
read from a safetensors header. Writing the tensors is training.checkpoint's part."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from vit_dist.host.atomic import atomic_path, fsync_dir, write_atomic
from vit_dist.host.errors import CheckpointError

SUFFIX = ".safetensors"
EMA_PREFIX = "ema."  # the EMA of weight W is saved as ema.W


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


def manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def read_manifest(path: Path) -> dict:
    try:
        return json.loads(manifest_path(path).read_text())
    except (OSError, ValueError):
        return {}


def write_manifest(path: Path, manifest: dict) -> None:
    """The manifest of checkpoint `path`, durable: it vouches for the file beside it."""
    write_atomic(manifest_path(path), json.dumps(manifest), durable=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path: Path) -> bool:
    """The file is complete: its manifest exists and the checksum matches."""
    try:
        return read_manifest(path).get("sha256") == sha256(path)
    except OSError:
        return False


def prune(folder: Path, keep_last: int) -> None:
    """Deletes all but the newest keep_last step checkpoints in folder (best_* are kept apart)."""
    for old in sorted(folder.glob(f"step_*{SUFFIX}"))[:-keep_last]:
        remove(old)


def remove(path: Path) -> None:
    path.unlink()
    manifest_path(path).unlink(missing_ok=True)


def best_score(evaluation: dict) -> tuple[float, str]:
    """Keep-best's measure of an evaluation (or a best checkpoint's manifest): the higher val top-1 of
    the model and its EMA, and whose it is, "ema" or "model" (the model's on a tie)."""
    ema_top1 = evaluation.get("ema_top1")
    if ema_top1 is not None and ema_top1 > evaluation["top1"]:
        return ema_top1, "ema"
    return evaluation["top1"], "model"


def best_checkpoint(run_dir: Path) -> tuple[Path, float] | None:
    """The kept best checkpoint and its best_score, if there is one that verifies."""
    for path in sorted(checkpoint_dir(run_dir).glob(f"best_step_*{SUFFIX}"), reverse=True):
        if verified(path):
            return path, best_score(read_manifest(path))[0]
    return None


def keep_best(run_dir: Path, path: Path, evaluation: dict) -> Path:
    """Keeps the checkpoint `path` as checkpoints/best_step_N (a hard link where the file system has
    them: no copy, and pruning `path` later leaves it), with its val top-1 (and its EMA's, and which of
    the two made it the best: best_weights) in the manifest; then removes the previous best. A crash
    in between leaves two bests, never none."""
    best = path.with_name(f"best_{path.name}")
    scores = {key: evaluation[key] for key in ("top1", "ema_top1") if key in evaluation}
    if "ema_top1" in scores:
        scores["best_weights"] = best_score(evaluation)[1]
    try:
        # link() creates its name exclusively (it follows no symlink planted there), so the link needs
        # no temporary file of its own; a copy goes through one.
        linked = best.with_name(f".{best.name}.{secrets.token_hex(8)}.tmp")
        try:
            os.link(path, linked)
            os.replace(linked, best)
        except OSError:
            linked.unlink(missing_ok=True)
            with atomic_path(best) as tmp, open(path, "rb") as source:
                with open(os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW), "wb") as target:
                    shutil.copyfileobj(source, target)
        write_manifest(best, {**read_manifest(path), **scores})
        fsync_dir(best.parent)
    except OSError as err:
        raise CheckpointError(f"cannot keep {path} as the best checkpoint ({err.strerror}); free disk space, then "
                              "resume with train.resume=auto") from None
    for old in checkpoint_dir(run_dir).glob(f"best_step_*{SUFFIX}"):
        if old != best:
            remove(old)
    return best


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


def evaluation_checkpoint(run_dir: Path) -> Path:
    """What `vit-dist eval RUN_DIR` evaluates: the run's best checkpoint, else its newest verified one."""
    best = best_checkpoint(run_dir)
    found = best[0] if best else resume_path("auto", run_dir)
    if found is None:
        raise CheckpointError(f"{checkpoint_dir(run_dir)} holds no verified checkpoint; name one with --ckpt "
                              "(a semi_auto run's: its merged_step_N checkpoint)")
    return found


def missing_checkpoint(path: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} does not exist; pass --ckpt RUN_DIR/checkpoints/step_N{SUFFIX}")


def tensor_names(path: str | Path) -> set[str]:
    """The names of a checkpoint's tensors, read from the safetensors header alone."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise missing_checkpoint(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            return set(f.keys())
    except Exception as err:  # safetensors raises its own error type for a damaged header
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def holds_ema(path: str | Path) -> bool:
    """Whether a checkpoint holds EMA weights (ema.* tensors: written with train.ema_decay > 0)."""
    return any(name.startswith(EMA_PREFIX) for name in tensor_names(path))


def require_ema(path: str | Path) -> None:
    """--ema's check: one CheckpointError unless the checkpoint holds EMA weights."""
    if holds_ema(path):
        return
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        kind = (f.metadata() or {}).get("weights")
    if kind is not None:  # a weights-only file (host.weights_only): "model" or "ema"
        raise CheckpointError(f"{path} is a weights-only file of one set of weights (metadata: weights {kind}); "
                              "leave out --ema")
    raise CheckpointError(f"checkpoint {path} holds no EMA weights (ema.* tensors: written with "
                          "train.ema_decay 0); leave out --ema")


def head_classes(path: str | Path) -> int:
    """The class count of a checkpoint's head, read from the safetensors header alone."""
    from safetensors import safe_open

    if "head.bias" not in tensor_names(path):
        raise CheckpointError(f"checkpoint {path} has no head (imported with --drop-head?); fine-tune it "
                              "first, or import it with its head")
    with safe_open(str(path), framework="numpy") as f:
        return int(f.get_slice("head.bias").get_shape()[0])
