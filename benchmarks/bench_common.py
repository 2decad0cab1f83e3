"""What ms_vit_bench.py and torch_vit_bench.py share: the command line, the timing loop and the report.

Both programs time one training step (forward, loss, backward, optimizer update) on one fixed
synthetic batch, reading the loss back to the host after every step so that each timing covers the
whole step. The first step (which compiles in MindSpore) is timed alone, then --warmup untimed steps
run, then --steps timed ones. images/s is the median over the timed steps, with their min and max.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from vit_flops import CONFIGS, vit_flops


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", choices=sorted(CONFIGS), default="b",
                   help="a: ViT-Ti/16 at 224 px, batch 8; b: 32 px, patch 4, depth 6, batch 64 (default)")
    p.add_argument("--batch-size", type=int, default=0, help="images per step (default: the config's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps after the first one (default 4)")
    p.add_argument("--threads", type=int, default=0,
                   help="kernel threads (default 0: the framework's own choice)")
    p.add_argument("--max-seconds", type=float, default=240.0,
                   help="stop timing after this long in total, with the steps done so far (default 240)")
    p.add_argument("--peak-gflops", type=float,
                   help="report MFU against this fp32 peak (e.g. the figure `vit-dist bench --peak` prints)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line, last")
    return p


def config(args) -> dict:
    c = dict(CONFIGS[args.config])
    if args.batch_size:
        c["batch"] = args.batch_size
    return c


def run(step, args) -> dict:
    """Times `step()` (which runs one training step and returns its loss as a float)."""
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"error: --steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    start = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        last_loss = step()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > args.max_seconds:
            break
    return dict(first_step_s=first, times=times, first_loss=first_loss, last_loss=last_loss)


def report(system: str, args, c: dict, params: int, timing: dict) -> None:
    """Prints one line (and with --json, the result as JSON after it)."""
    times = timing["times"]
    rates = [c["batch"] / t for t in times]
    median = statistics.median(rates)
    step_s = statistics.median(times)
    gflops = vit_flops(**c)["train"] * median / 1e9
    result = {
        "config": args.config, "system": system, "batch_size": c["batch"], "params": params,
        "images_per_sec": median, "images_per_sec_min": min(rates), "images_per_sec_max": max(rates),
        "timed_steps": len(times), "step_ms": 1000 * step_s, "first_step_s": timing["first_step_s"],
        "compile_s": timing["first_step_s"] - step_s, "gflops": gflops,
        "peak_gflops": args.peak_gflops, "mfu": gflops / args.peak_gflops if args.peak_gflops else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": timing["first_loss"], "last_loss": timing["last_loss"],
    }
    mfu = f", MFU {100 * result['mfu']:.1f}% of {args.peak_gflops:.0f}" if args.peak_gflops else ""
    print(f"config {args.config}, {system}, batch {c['batch']}, {params / 1e6:.3f}M parameters: "
          f"{median:.2f} images/s median ({min(rates):.2f}-{max(rates):.2f}, {len(times)} steps), "
          f"step {1000 * step_s:.1f} ms, first step {timing['first_step_s']:.2f} s, "
          f"{gflops:.1f} GFLOP/s{mfu}, peak RSS {result['peak_rss_mib']:.0f} MiB, "
          f"loss {timing['first_loss']:.3f} -> {timing['last_loss']:.3f}", flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
