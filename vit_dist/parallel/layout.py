"""Where a rank sits in the (dp, mp) grid, and what it reads. Pure Python (the launchers' pre-flight uses it)."""
from __future__ import annotations

from dataclasses import dataclass

from vit_dist.config import Config, parallel_degrees, rank_batch


@dataclass(frozen=True)
class RankLayout:
    semi_auto: bool
    dp: int
    mp: int
    replica: int  # the data shard this rank reads: the mp ranks of one replica read the same samples
    rank_batch: int  # images a replica takes per step: train.batch_size x parallel.grad_accumulation

    @property
    def global_batch(self) -> int:
        return self.rank_batch * self.dp

    @classmethod
    def of(cls, cfg: Config, rank: int, world_size: int) -> "RankLayout":
        dp, mp = parallel_degrees(cfg, world_size)
        return cls(cfg.parallel.mode == "semi_auto", dp, mp, rank // mp, rank_batch(cfg))
