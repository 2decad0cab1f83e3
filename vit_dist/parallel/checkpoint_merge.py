"""`vit-dist merge-checkpoint RUN_DIR`: the per-rank slices of a semi-auto run into one full checkpoint.

Under semi_auto every rank saves the parameters it holds (its slices) to checkpoints/rank_N/, and
MindSpore writes the layout map to strategy/rank_N.ckpt. MindSpore 2.10's transform_checkpoints with
no destination strategy reassembles every parameter whole from the slices and that map.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from vit_dist.host.checkpoint_files import SUFFIX, checkpoint_dir, read_manifest, verified
from vit_dist.host.errors import CheckpointError
from vit_dist.host.progress import Progress

RANK_DIR = re.compile(r"rank_(\d+)")
MERGED_NAME = "merged"


def strategy_file(run_dir: Path, rank: int) -> Path:
    """Where each rank's parameter layout goes (MindSpore writes the same map on every rank)."""
    return run_dir / "strategy" / f"rank_{rank}.ckpt"


def newest_rank_checkpoints(run_dir: Path) -> dict[int, Path]:
    """rank -> its newest verified slice; every rank 0..N-1 present, all at the same step."""
    ckpts = checkpoint_dir(run_dir)
    ranks = sorted(int(m.group(1)) for p in ckpts.glob("rank_*") if p.is_dir() and (m := RANK_DIR.fullmatch(p.name)))
    if not ranks:
        raise CheckpointError(f"{ckpts} has no rank_N/ folders; merge-checkpoint takes the run directory of a "
                              "parallel.mode=semi_auto run")
    missing = sorted(set(range(ranks[-1] + 1)) - set(ranks))
    if missing:
        raise CheckpointError(f"{ckpts} lacks the slices of ranks {missing}; copy every rank's rank_N/ folder "
                              "into it (each node saves its own ranks)")
    newest = {}
    for rank in ranks:
        files = [f for f in sorted(checkpoint_dir(run_dir, rank).glob(f"step_*{SUFFIX}")) if verified(f)]
        if not files:
            raise CheckpointError(f"{checkpoint_dir(run_dir, rank)} holds no verified checkpoint (step_N{SUFFIX} "
                                  "with its manifest); copy that rank's folder from its node, or merge an older step")
        newest[rank] = files[-1]
    steps = {f.name for f in newest.values()}
    if len(steps) > 1:
        raise CheckpointError(f"the ranks' newest slices are from different steps ({', '.join(sorted(steps))}); "
                              "a rank stopped early: merge an older step or rerun")
    world = read_manifest(newest[0]).get("world_size", len(ranks))  # recorded at save time
    if len(ranks) != world:
        raise CheckpointError(f"{ckpts} lacks the slices of ranks {list(range(len(ranks), world))} of the "
                              f"{world} that saved; copy every rank's rank_N/ folder into it (each node saves "
                              "its own ranks)")
    return newest


def merge(run_dir: Path, strategy: Path | None = None) -> Path:
    """Writes checkpoints/merged_step_N.safetensors from the newest step every rank saved (with rank 0's
    strategy file unless another is given)."""
    import mindspore as ms

    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; pass the train.output_dir of a semi_auto run")
    strategy = strategy or strategy_file(run_dir, 0)
    slices = newest_rank_checkpoints(run_dir)
    if not strategy.is_file():
        raise CheckpointError(f"strategy file {strategy} does not exist; a semi_auto run writes it when its "
                              "first step compiles")
    step_name = next(iter(slices.values())).name
    target = checkpoint_dir(run_dir) / f"{MERGED_NAME}_{step_name}"
    # Steps, not tensors: MindSpore's transform is one call that reports nothing while it runs.
    with tempfile.TemporaryDirectory(dir=checkpoint_dir(run_dir)) as staging, \
            Progress(3, f"merging {len(slices)} ranks' slices", "steps") as progress:
        # transform_checkpoints takes the last file of each src/rank_N/: stage exactly one per rank.
        src, dst = Path(staging) / "src", Path(staging) / "dst"
        for rank, path in slices.items():
            (src / f"rank_{rank}").mkdir(parents=True)
            (src / f"rank_{rank}" / path.name).symlink_to(path.resolve())
        progress.advance()
        try:
            ms.parallel.transform_checkpoints(str(src), str(dst), MERGED_NAME, str(strategy), None,
                                              output_format="safetensors")
        except (ValueError, RuntimeError, KeyError) as err:
            raise CheckpointError(f"cannot merge the slices of {checkpoint_dir(run_dir)} with {strategy}: "
                                  f"{' '.join(str(err).split())[:300]}") from None
        progress.advance()
        (merged,) = (dst / "rank_0").glob(f"*{SUFFIX}")
        shutil.move(str(merged), target)
        progress.advance()
    return target
