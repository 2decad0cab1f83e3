"""What a run takes from its device backend: the layers the model's seam gets, the optimizer layout,
the step signal, and what the host thread does once the first step has run. Choices made only for the CPU backend (the
fused kernels, the flat optimizer, the sleeping host thread, idle priority, dropout and stochastic
depth drawn from a saved counter) apply there only; on Ascend and GPU the model runs MindSpore's stock layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from vit_dist.host.config import Config
from vit_dist.host.placement import Placement
from vit_dist.models.vit import ViTLayers


@dataclass(frozen=True)
class Backend:
    device_target: str
    layers: ViTLayers
    fused: bool  # the seam carries the fused CPU kernels
    signal: Optional[object] = None  # backends.cpu.kernels.StepSignal: the host sleeps through a train step

    @property
    def flat_optimizer(self) -> bool:
        """Data mode's optimizer layout. On the CPU, FlatAdamW and one all-reduce per parameter group:
        there kernel launches cost more than their arithmetic. On Ascend and GPU, MindSpore's per-parameter
        AdamW and DistributedGradReducer, whose all-reduces MindSpore fuses into buckets that start while
        the backward pass still runs, and no flat copies of the gradients and parameters."""
        return self.device_target == "CPU"

    def after_first_step(self) -> None:
        """Called once the first step (and with it the kernel threads) exists."""
        if self.device_target == "CPU":
            from vit_dist.backends.cpu.host import yield_cores_to_kernels

            yield_cores_to_kernels()


def backend_for(cfg: Config, placement: Placement, say: Callable[[str], None], portable: bool = False) -> Backend:
    """The backend of this run. portable: stock layers only (an exported graph must not carry this
    machine's custom-op library)."""
    if portable or cfg.parallel.device_target != "CPU":
        return Backend(cfg.parallel.device_target, ViTLayers(), fused=False)
    from vit_dist.backends.cpu import kernels
    from vit_dist.backends.cpu.host import cpu_threads
    from vit_dist.backends.cpu.random import counted_layers

    # Masks a resumed run draws again (MindSpore's Dropout kernel restarts its random state).
    dropout, drop_path = counted_layers(cfg.train.seed, placement.rank)
    stock = ViTLayers(dropout=dropout, drop_path=drop_path)
    library = kernels.build_library() if cfg.parallel.fused_cpu_kernels else None
    if library is None:
        if cfg.parallel.fused_cpu_kernels:
            say("note: no C++ compiler built vit_dist/backends/cpu/kernels.cc (g++ with C++17): LayerNorm, GELU "
                "and attention run on MindSpore's slower CPU kernels; install g++, or set "
                "parallel.fused_cpu_kernels=false to silence this")
        return Backend("CPU", stock, fused=False)
    signal = kernels.StepSignal(library)
    if cfg.precision.amp_level != "O0":  # the kernels are float32
        return Backend("CPU", stock, fused=False, signal=signal)
    threads = cpu_threads(cfg.parallel.threads_per_rank, placement.local_world_size)
    return Backend("CPU", kernels.fused_layers(kernels.custom_ops(library, threads), stock), fused=True, signal=signal)
