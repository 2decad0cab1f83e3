"""vit-dist plan --compile: MindSpore's DryRun (msrun --sim_level 1) compiles the config's train step as
one rank of a job of `world` ranks would, with the devices mocked, and reports the peak device memory
MindSpore's memory planner found for it. MindSpore 2.10 runs a distributed DryRun on Ascend only (its
CPU backend refuses one): that needs MindSpore's Ascend build and CANN's libraries, not the cards."""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

# MindSpore's DryRun summary line (its INFO log, GLOG_v=1), in MiB.
PEAK_MEMORY = re.compile(r"Actual peak memory usage \(with fragments\): (\d+)M")
ERROR_LINE = re.compile(r"^(?:\w*Error|RuntimeError|error): .*$", re.M)


def dry_run_command(config: str, overrides: list[str], world: int, rank: int, folder: Path) -> list[str]:
    """msrun's DryRun of one process, rank `rank` of `world`, running `vit-dist bench` for one step."""
    main = Path(__file__).resolve().parents[1] / "__main__.py"
    return [sys.executable, "-m", "mindspore.parallel.cluster.run", "--worker_num", str(world),
            "--local_worker_num", "1", "--sim_level", "1", "--sim_rank_id", str(rank), "--join", "True",
            "--log_dir", str(folder / "logs"), str(main), "bench", config, "--steps", "1", "--warmup", "0",
            "--set", *overrides, f"train.output_dir={folder / 'run'}"]


def simulate(config: str, overrides: list[str], world: int, rank: int, env: dict[str, str]) -> dict:
    """Runs the DryRun in a fresh private folder; returns whether the step compiled and ran, the peak
    device memory MindSpore reported (None where it reports none: the CPU), its worker log and, on a
    failure, the log's last error line."""
    folder = Path(tempfile.mkdtemp(prefix="vit-dist-dryrun-"))
    result = subprocess.run(dry_run_command(config, overrides, world, rank, folder), env=env, cwd=folder,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True)
    log = folder / "logs" / "worker_0.log"
    text = log.read_text(errors="replace") if log.is_file() else result.stderr
    peaks = PEAK_MEMORY.findall(text)
    errors = ERROR_LINE.findall(text)
    return {"compiled": result.returncode == 0, "rank": rank, "world": world, "log": str(log),
            "peak_memory_mib": int(peaks[-1]) if peaks else None,
            "error": None if result.returncode == 0 else (errors[-1] if errors else f"msrun exited {result.returncode}")}


def format_dry_run(result: dict, plan_gib: float) -> str:
    where = f"rank {result['rank']} of {result['world']}"
    if not result["compiled"]:
        return f"MindSpore's DryRun of {where} failed: {result['error']} (log: {result['log']})"
    memory = ("no device-memory figure (MindSpore reports one on Ascend)" if result["peak_memory_mib"] is None
              else f"peak device memory {result['peak_memory_mib'] / 1024:.2f} GiB")
    return f"MindSpore's DryRun of {where}: the train step compiled; {memory}; the plan says {plan_gib:.2f} GiB " \
           f"(log: {result['log']})"
