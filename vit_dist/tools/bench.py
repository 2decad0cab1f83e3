"""`vit-dist bench`: training throughput of the real train step on synthetic batches, the fp32
MatMul peak it is compared with, and the input pipeline alone on a real folder. Synthetic training
needs model.num_classes (cli checks it).

Every rank runs the same steps; per-rank figures are reduced so rank 0 reports the job's.
"""
from __future__ import annotations

import itertools
import os
import resource
import statistics
import time

import numpy as np

from vit_dist.data import pipeline
from vit_dist.host import datascan, planner
from vit_dist.host.config import Config
from vit_dist.host.cpu_time import cpu_seconds
from vit_dist.host.placement import Placement
from vit_dist.host.run_record import say
from vit_dist.models.spec import ViTSpec, train_flops_per_image
from vit_dist.parallel.data_parallel import all_reduce_sum
from vit_dist.training.assemble import Training, build_training

# Distinct synthetic batches cycled through, so no step reuses the previous step's input buffer.
SYNTHETIC_BATCHES = 2


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    """MindSpore's fp32 MatMul throughput on a square problem (the median of repeats): the ceiling
    MFU is measured against. Returns a 1x1 slice so the host copy costs nothing."""
    import mindspore as ms
    from mindspore import nn, ops

    class Product(nn.Cell):
        def __init__(self):
            super().__init__()
            self.matmul = ops.MatMul()

        def construct(self, a, b):
            return self.matmul(a, b)[0:1, 0:1]

    rng = np.random.default_rng(0)
    a, b = (ms.Tensor(rng.random((size, size), np.float32)) for _ in range(2))
    product = Product()
    product(a, b).asnumpy()  # compile
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product(a, b).asnumpy()
        times.append(time.perf_counter() - started)
    return 2.0 * size ** 3 / statistics.median(times) / 1e9


def synthetic_batches(cfg: Config, batch: int, count: int = SYNTHETIC_BATCHES) -> list:
    """Batches of the shapes and types the training pipeline yields."""
    import mindspore as ms

    rng = np.random.default_rng(cfg.train.seed)
    size = cfg.data.image_size

    def labels():
        labels = rng.integers(0, cfg.model.num_classes, batch, np.int32)
        return np.eye(cfg.model.num_classes, dtype=np.float32)[labels] if cfg.data.mixes else labels  # soft targets

    return [(ms.Tensor(rng.standard_normal((batch, 3, size, size), np.float32)), ms.Tensor(labels()))
            for _ in range(count)]


def time_steps(run: Training, batches: list, lr, steps: int, warmup: int) -> dict:
    """Runs 1 + warmup + steps steps, each read back to the host (so each one's time is its own), as
    training runs them (the backend's after_first_step after the first); returns the first step's
    time and the timed steps' data-wait and compute times."""
    train_step = run.step
    source = itertools.cycle(batches)
    started = time.perf_counter()
    images, labels = next(source)
    train_step(images, labels, lr)[0].asnumpy()
    first = time.perf_counter() - started
    run.backend.after_first_step()
    for _ in range(warmup):
        images, labels = next(source)
        train_step(images, labels, lr)[0].asnumpy()
    waits, computes = [], []
    for _ in range(steps):
        fetched = time.perf_counter()
        images, labels = next(source)
        started = time.perf_counter()
        train_step(images, labels, lr)[0].asnumpy()
        done = time.perf_counter()
        waits.append(started - fetched)
        computes.append(done - started)
    return {"first": first, "waits": waits, "computes": computes}


def memory_mib(device_target: str) -> float:
    """Resident memory of this process now on the CPU backend; the device allocator's use elsewhere."""
    if device_target == "CPU":
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    import mindspore as ms

    return ms.runtime.memory_allocated() / 2 ** 20


def peak_memory_mib(device_target: str) -> float:
    """Peak resident memory of this process on the CPU backend; the device allocator's peak elsewhere."""
    if device_target == "CPU":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import mindspore as ms

    return ms.runtime.max_memory_allocated() / 2 ** 20


def summarize(cfg: Config, placement: Placement, batch: int, times: dict, peak_gflops: float) -> dict:
    """Per-device figures from this rank's step times (`batch` images a step); global ones summed over
    ranks (a collective)."""
    step_times = [w + c for w, c in zip(times["waits"], times["computes"])]
    per_device = sorted(batch / t for t in step_times)
    median = statistics.median(per_device)
    median_step = statistics.median(step_times)
    global_median, global_min, global_max = all_reduce_sum([median, per_device[0], per_device[-1]], placement)
    flops = train_flops_per_image(ViTSpec.of(cfg, cfg.model.num_classes))
    return {
        "images_per_sec": float(global_median),
        "images_per_sec_min": float(global_min),
        "images_per_sec_max": float(global_max),
        "images_per_sec_per_device": median,
        "images_per_sec_per_device_min": per_device[0],
        "images_per_sec_per_device_max": per_device[-1],
        "world_size": placement.world_size,
        "batch_per_device": batch,
        "steps": len(step_times),
        "step_ms": 1000 * median_step,
        "data_wait_ms": 1000 * statistics.median(times["waits"]),
        "compute_ms": 1000 * statistics.median(times["computes"]),
        "compile_s": times["first"] - median_step,
        "first_step_s": times["first"],
        "train_gflops_per_image": flops / 1e9,
        "achieved_gflops_per_device": flops * median / 1e9,
        "peak_gflops": peak_gflops,
        "mfu": flops * median / 1e9 / peak_gflops,
    }


def bench_train(cfg: Config, placement: Placement, steps: int, warmup: int, peak_gflops: float | None) -> dict:
    """The training step vit-dist trains with (training.assemble.build_training: accumulation, precision,
    backend layers and all), on synthetic batches of the shape its pipeline yields."""
    import mindspore as ms

    # What the process holds before the model exists (the interpreter, MindSpore's libraries): the rest of
    # its peak is the step's, which the plan estimates.
    before_model = memory_mib(cfg.parallel.device_target)
    run = build_training(cfg, cfg.model.num_classes, placement, lambda line: say(line, placement.is_main))
    batch = run.dims.global_batch if run.dims.semi_auto else run.dims.rank_batch  # semi_auto's graph sees all
    times = time_steps(run, synthetic_batches(cfg, batch), ms.Tensor(cfg.train.lr, ms.float32), steps, warmup)
    memory = {"peak_memory_mib": peak_memory_mib(cfg.parallel.device_target), "memory_before_model_mib": before_model,
              "plan_memory_mib": planner.step_estimate(cfg, placement.world_size, run.backend.fused).total_gb * 1024}
    # Measured after the steps, so the peak is taken on the same (possibly shared) machine state.
    peak = peak_gflops or matmul_peak_gflops()
    return {**summarize(cfg, placement, batch, times, peak), **memory, "fused_cpu_kernels": run.backend.fused}


def bench_data(cfg: Config, placement: Placement, batches: int) -> dict:
    """The training input pipeline alone, as pipeline.train_dataset builds it from the config (decode,
    every augmentation the data section turns on, batching with data.num_workers map workers), on this
    rank's shard of data.root/train; the first batch (pipeline start-up) is not timed. Per core is
    per rank over its data.num_workers: the cores the pipeline is given."""
    split, _, classes = datascan.scan_dataset(cfg.data)
    per_epoch = datascan.steps_per_epoch(split.num_images, placement.world_size, cfg.train.batch_size)
    dataset = pipeline.train_dataset(cfg, split, classes, placement.rank, placement.world_size, cfg.train.batch_size)
    epochs = -(-(batches + 1) // per_epoch)
    iterator = dataset.create_tuple_iterator(num_epochs=epochs, output_numpy=True)
    # Each pass over a multi-epoch iterator yields one epoch (as in training/loop.py).
    stream = (batch for _ in range(epochs) for batch in iterator)
    started = time.perf_counter()
    next(stream)
    startup = time.perf_counter() - started
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        next(stream)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    images = batches * cfg.train.batch_size
    per_rank = images / elapsed
    (total,) = all_reduce_sum([per_rank], placement)
    return {"data_images_per_sec": float(total), "data_images_per_sec_per_rank": per_rank,
            "data_images_per_sec_per_core": per_rank / cfg.data.num_workers, "cpu_ms_per_image": 1000 * cpu / images,
            "num_workers": cfg.data.num_workers, "batches": batches, "startup_s": startup,
            "world_size": placement.world_size}


def format_train(result: dict) -> str:
    r = result
    return (f"images/s {r['images_per_sec']:.1f} global over {r['world_size']} rank(s) "
            f"(min {r['images_per_sec_min']:.1f}, max {r['images_per_sec_max']:.1f}); "
            f"per device {r['images_per_sec_per_device']:.1f} "
            f"(min {r['images_per_sec_per_device_min']:.1f}, max {r['images_per_sec_per_device_max']:.1f}) "
            f"over {r['steps']} steps of batch {r['batch_per_device']}\n"
            f"step {r['step_ms']:.1f} ms = data wait {r['data_wait_ms']:.2f} ms + compute {r['compute_ms']:.1f} ms; "
            f"first step {r['first_step_s']:.1f} s (compile {r['compile_s']:.1f} s)\n"
            f"{r['train_gflops_per_image']:.3f} train GFLOPs/image, {r['achieved_gflops_per_device']:.1f} GFLOP/s "
            f"per device, MFU {100 * r['mfu']:.1f}% of {r['peak_gflops']:.0f} GFLOP/s (fp32 MatMul peak)\n"
            f"peak memory {r['peak_memory_mib']:.0f} MiB, {r['memory_before_model_mib']:.0f} of it before the model "
            f"was built: the step took {r['peak_memory_mib'] - r['memory_before_model_mib']:.0f} MiB, "
            f"the plan says {r['plan_memory_mib']:.0f} MiB (vit-dist plan)")


def format_data(result: dict) -> str:
    r = result
    return (f"input pipeline: {r['data_images_per_sec']:.1f} images/s over {r['world_size']} rank(s) "
            f"({r['data_images_per_sec_per_rank']:.1f} per rank, {r['num_workers']} workers each: "
            f"{r['data_images_per_sec_per_core']:.1f} per core; {r['cpu_ms_per_image']:.2f} ms CPU per image; "
            f"{r['batches']} batches; "
            f"start-up {r['startup_s']:.1f} s)")
