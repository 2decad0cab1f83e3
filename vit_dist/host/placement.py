"""Where a process sits in the job (Placement) and the job's parallel degrees (ParallelDims): the
only place dp, mp, the replica a rank reads and the batch sizes are computed, for config checks,
training and the planner alike."""
from __future__ import annotations

from dataclasses import dataclass

from vit_dist.host.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    launcher: str  # single | msrun | mpirun | rank_table | dryrun (MindSpore's DryRun: one process, devices mocked)
    rank: int
    world_size: int
    local_rank: int  # also the device id on Ascend/GPU
    local_world_size: int
    job: str = ""  # the launcher's id of this attempt of the job (pid files, heartbeats); empty outside one

    @classmethod
    def single(cls) -> "Placement":
        return cls(launcher="single", rank=0, world_size=1, local_rank=0, local_world_size=1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class ParallelDims:
    """The degrees of a job of `world` ranks: dp data-parallel replicas of mp ranks each. Under
    semi_auto the input batch is laid out by the dataset strategy (dp, 1, 1, 1): its device matrix
    puts the mp-fold repeat on the left, so rank r holds batch block r % dp, and the ranks of one
    replica are r, r + dp, r + 2 dp, ... (MindSpore's parallel._utils._to_full_tensor places a rank's
    batch so; tests/test_semi_auto.py reads it from there)."""
    world: int
    dp: int
    mp: int
    micro_batch: int  # train.batch_size: what a replica takes per micro-batch
    accumulation: int  # parallel.grad_accumulation: micro-batches per optimizer step
    semi_auto: bool

    @classmethod
    def of(cls, cfg, world: int) -> "ParallelDims":
        """The degrees of config `cfg` (host.config.Config) on `world` ranks; a world that mp does not
        divide is one ConfigError."""
        return cls.split(world, cfg.parallel.model_parallel, cfg.train.batch_size, cfg.parallel.grad_accumulation,
                         cfg.parallel.mode == "semi_auto")

    @classmethod
    def split(cls, world: int, mp: int, micro_batch: int, accumulation: int, semi_auto: bool) -> "ParallelDims":
        """`world` ranks as dp replicas of mp ranks each; a world that mp does not divide is one ConfigError."""
        if world < 1 or world % mp:
            raise ConfigError(f"world size {world} is not divisible by parallel.model_parallel {mp}; "
                              f"launch a multiple of {mp} ranks or change model_parallel")
        return cls(world, world // mp, mp, micro_batch, accumulation, semi_auto)

    @property
    def rank_batch(self) -> int:
        """Images a data-parallel replica takes per optimizer step (the batch its pipeline yields)."""
        return self.micro_batch * self.accumulation

    @property
    def global_batch(self) -> int:
        return self.rank_batch * self.dp

    def replica(self, rank: int) -> int:
        """The data shard rank `rank` reads: the batch block MindSpore's dataset strategy assigns it
        (rank % dp; every rank in data mode, where dp is the world)."""
        return rank % self.dp
