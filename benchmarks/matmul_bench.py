"""The fp32 (or 16-bit) matrix-multiply ceiling of this machine through numpy, MindSpore or PyTorch.

What it measures: GFLOP/s (2 * M * N * K / time, median with min and max over --reps calls) of one
large square matmul and of three shapes a ViT training step multiplies: (8 * 197) x 192 x 768 and
(8 * 197) x 768 x 192 (config A's fc1 and fc2 at batch 8), and (64 * 65) x 192 x 576 (config B's q, k, v
at batch 64). Small shapes run 20x as many calls. It is the ceiling MFU is read against: vit-dist's
own `vit-dist bench --peak` measures MindSpore's 2048^3 fp32 MatMul the same way.

Run it from the repository root, each backend in an environment that has it:

    python benchmarks/matmul_bench.py --backend ms                  # MindSpore, fp32
    python benchmarks/matmul_bench.py --backend torch --dtype bf16  # PyTorch, bfloat16
    python benchmarks/matmul_bench.py --backend numpy --n 512 --reps 2   # a quick check

Options: --dtype fp32|fp16|bf16 (numpy: fp32 only), --n N (the square size, default 4096), --reps R
(default 5), --threads N (PyTorch only: torch.set_num_threads; 0: torch's default).
"""
from __future__ import annotations

import argparse
import statistics
import time


def bench(fn, flops: float, reps: int, warm: int = 2) -> tuple[float, float, float]:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    rates = [flops / t / 1e9 for t in times]
    return statistics.median(rates), min(rates), max(rates)


def shapes(n: int) -> list[tuple[int, int, int]]:
    """(M, K, N): the square, then ViT shapes (tokens x width @ width x out)."""
    return [(n, n, n), (8 * 197, 192, 768), (8 * 197, 768, 192), (64 * 65, 192, 576)]


def numpy_matmul(dtype: str):
    import numpy as np

    if dtype != "fp32":
        raise SystemExit("error: the numpy backend measures fp32 only")

    def make(m, k, n):
        x = np.random.rand(m, k).astype(np.float32)
        y = np.random.rand(k, n).astype(np.float32)
        return lambda: x @ y
    return "numpy", make


def torch_matmul(dtype: str, threads: int):
    import torch

    if threads:
        torch.set_num_threads(threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def make(m, k, n):
        x, y = torch.rand(m, k).to(dt), torch.rand(k, n).to(dt)

        def call():
            with torch.no_grad():
                torch.matmul(x, y)
        return call
    return f"torch {torch.__version__}", make


def mindspore_matmul(dtype: str):
    import mindspore as ms
    import numpy as np
    from mindspore import nn, ops

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    dt = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}[dtype]

    class MatMul(nn.Cell):
        def __init__(self):
            super().__init__()
            self.matmul = ops.MatMul()

        def construct(self, x, y):
            return self.matmul(x, y)[0:1, 0:1]  # a 1x1 slice: copying the product to the host is not timed

    net = MatMul()

    def make(m, k, n):
        x = ms.Tensor(np.random.rand(m, k).astype(np.float32)).astype(dt)
        y = ms.Tensor(np.random.rand(k, n).astype(np.float32)).astype(dt)
        return lambda: net(x, y).astype(ms.float32).asnumpy()
    return f"mindspore {ms.__version__}", make


def main() -> None:
    p = argparse.ArgumentParser(description="matmul GFLOP/s through numpy, MindSpore or PyTorch on the CPU")
    p.add_argument("--backend", choices=("numpy", "torch", "ms"), required=True)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--n", type=int, default=4096, help="size of the square matmul (default 4096)")
    p.add_argument("--reps", type=int, default=5, help="timed calls of the square matmul (default 5)")
    p.add_argument("--threads", type=int, default=0, help="PyTorch: torch.set_num_threads (0: its default)")
    args = p.parse_args()

    if args.backend == "numpy":
        name, make = numpy_matmul(args.dtype)
    elif args.backend == "torch":
        name, make = torch_matmul(args.dtype, args.threads)
    else:
        name, make = mindspore_matmul(args.dtype)
    for m, k, n in shapes(args.n):
        reps = args.reps if m * k * n > 1e9 else args.reps * 20
        try:
            median, low, high = bench(make(m, k, n), 2.0 * m * k * n, reps)
        except Exception as err:  # e.g. a dtype the backend has no CPU kernel for
            message = " | ".join(line for line in str(err).splitlines() if line.strip())[:300]
            print(f"{name} {args.dtype} {m}x{k}x{n}: failed, {type(err).__name__}: {message}", flush=True)
            continue
        print(f"{name} {args.dtype} {m}x{k}x{n}: median {median:.1f} GFLOP/s (min {low:.1f}, max {high:.1f})",
              flush=True)


if __name__ == "__main__":
    main()
