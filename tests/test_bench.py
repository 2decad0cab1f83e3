"""`vit-dist bench`: its figures on 1 and 2 real ranks, the input-pipeline timing on real images,
the compile cache (a second 2-rank launch trains as the first) and its key, and bad input."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import last_checkpoint, load_params, msrun, ok, tiny_config, vit_dist
from vit_dist.host import planner
from vit_dist.host.config import compile_cache_dir, load_config

TINY = {"model": {"num_classes": 3}}
# tiny_config's ViT (16 px, patch 4, dim 32, depth 2, mlp 128, 3 classes): 16 patches, 17 tokens.
TINY_TRAIN_FLOPS = 3 * (2 * 16 * 48 * 32 + 2 * (2 * 17 * (4 * 32 * 32 + 2 * 32 * 128) + 4 * 17 * 17 * 32) + 2 * 32 * 3)


def last_json(result) -> dict:
    return json.loads(ok(result).stdout.strip().splitlines()[-1])


def test_bench_reports_throughput_compile_time_and_mfu_and_fills_the_compile_cache(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    config = tiny_config(tmp_path / "c.yaml", tiny_data, **TINY)
    out = ok(vit_dist("bench", str(config), "--steps", "3", "--warmup", "1", "--peak-gflops", "50", "--json", "--set",
                      f"train.compile_cache={cache}")).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["world_size"] == 1 and result["steps"] == 3 and result["batch_per_device"] == 8
    assert result["images_per_sec"] == pytest.approx(result["images_per_sec_per_device"], rel=1e-6)
    assert result["images_per_sec_min"] <= result["images_per_sec"] <= result["images_per_sec_max"]
    assert result["step_ms"] == pytest.approx(8000 / result["images_per_sec_per_device"], rel=1e-6)
    assert result["compile_s"] > 0 and result["first_step_s"] > result["step_ms"] / 1000
    assert result["train_gflops_per_image"] == pytest.approx(TINY_TRAIN_FLOPS / 1e9)
    assert result["mfu"] == pytest.approx(TINY_TRAIN_FLOPS * result["images_per_sec_per_device"] / 50e9, rel=1e-6)
    # The plan's figure for the step beside the measured one: the peak less what the process held before the
    # model was built (MindSpore's libraries).
    cfg = load_config(config, [f"train.compile_cache={cache}"])
    assert result["fused_cpu_kernels"]
    assert result["plan_memory_mib"] == pytest.approx(planner.step_estimate(cfg, 1, True).total_gb * 1024)
    # How close the plan comes is a measurement (BENCHMARKS.md), not asserted here: the process's peak also
    # holds whatever ran before the model, which depends on the machine's state.
    assert 100 < result["memory_before_model_mib"] < result["peak_memory_mib"], result
    step = result["peak_memory_mib"] - result["memory_before_model_mib"]
    assert f"the step took {step:.0f} MiB, the plan says {result['plan_memory_mib']:.0f} MiB" in out
    # The compiled graph is saved under the folder keyed by the computation (see the key test).
    key = compile_cache_dir(cfg, "train", 1)
    assert list(Path(key).glob("rank_0/graph_cache/*.mindir"))


def test_two_ranks_report_the_sum_of_their_throughputs(tmp_path):
    """Launched with a shipped config's name (bench/vit_32px, shrunk): the launcher's pre-flight and
    its workers find it in the package."""
    tiny = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=4"]
    result = last_json(msrun("--ranks-per-node", "2", "bench", "bench/vit_32px", "--steps", "3", "--warmup", "1",
                             "--peak-gflops", "50", "--json", "--set", f"train.output_dir={tmp_path / 'run'}", *tiny))
    assert result["world_size"] == 2 and result["batch_per_device"] == 4
    # Global = the sum of the ranks' medians: more than rank 0's own, which is what per_device reports.
    assert result["images_per_sec"] > result["images_per_sec_per_device"] > 0
    assert result["images_per_sec_min"] <= result["images_per_sec"] <= result["images_per_sec_max"]


def test_one_rank_under_msrun_joins_the_scheduler_and_finishes(tmp_path, tiny_data):
    """msrun with one worker still starts MindSpore's scheduler, which waits for that worker to join.
    (The input pipeline's bench starts the backend as every command does, and compiles no step.)"""
    config = tiny_config(tmp_path / "c.yaml", tiny_data)
    result = last_json(msrun("--ranks-per-node", "1", "bench", str(config), "--data", "--steps", "2", "--json",
                             "--set", f"train.output_dir={tmp_path / 'run'}", timeout=200))
    assert result["world_size"] == 1 and result["data_images_per_sec"] > 0


def test_a_second_two_rank_launch_loads_the_compile_cache_and_trains_the_same(tmp_path, tiny_data):
    """The second launch runs the cached graph (MindSpore says so in each worker's log) and logs the
    first launch's losses and accuracy and saves its parameters: the graph's Parameters are bound to
    the model's (NaN losses when they were not)."""
    config = tiny_config(tmp_path / "c.yaml", tiny_data, train={"compile_cache": str(tmp_path / "cache")})
    runs = []
    for name in ("first", "second"):
        run = tmp_path / name
        ok(msrun("--ranks-per-node", "2", str(config), "--set", f"train.output_dir={run}", "train.log_interval=1"))
        loaded = ["Use the compilation cache" in (run / "logs" / f"worker_{rank}.log").read_text() for rank in (0, 1)]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs.append((loaded, [(r.get("loss"), r.get("top1")) for r in records], load_params(last_checkpoint(run))))
    (first_loaded, first_log, first_params), (second_loaded, second_log, second_params) = runs
    assert first_loaded == [False, False] and second_loaded == [True, True]
    assert second_log == first_log and all(loss is None or np.isfinite(loss) for loss, _ in first_log)
    assert second_params.keys() == first_params.keys()
    for name, value in first_params.items():
        np.testing.assert_array_equal(second_params[name], value, err_msg=name)


def test_bench_compiles_the_very_step_training_runs_with_accumulation(tmp_path, tiny_data):
    """bench builds its step through the same assembly as training (accumulation, precision, backend
    layers): a bench launch fills the compile cache, and a training launch of the same config then
    runs that graph (MindSpore says so) instead of compiling its own."""
    config = tiny_config(tmp_path / "c.yaml", tiny_data, model={"num_classes": 3}, parallel={"grad_accumulation": 2},
                         train={"batch_size": 4, "compile_cache": str(tmp_path / "cache")})

    ok(vit_dist("bench", str(config), "--steps", "1", "--warmup", "0", "--peak-gflops", "50", "--set", "train.max_steps=2"))
    result = ok(vit_dist("train", str(config), "--set", "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}"))
    assert "Use the compilation cache" in result.stderr  # (a first launch says nothing of it: see above)


def test_data_mode_times_the_input_pipeline_on_real_images(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "c.yaml", tiny_data)
    result = ok(vit_dist("bench", str(config), "--data", "--steps", "10", "--json"))
    text, line = result.stdout.strip().splitlines()[-2:]
    result = json.loads(line)
    assert result["batches"] == 10 and result["num_workers"] == 1 and result["data_images_per_sec"] > 0
    # One worker: per core is per rank.
    assert result["data_images_per_sec_per_core"] == result["data_images_per_sec_per_rank"] > 0
    assert result["cpu_ms_per_image"] > 0
    assert text.startswith(f"input pipeline: {result['data_images_per_sec']:.1f} images/s over 1 rank(s)")
    assert f"{result['data_images_per_sec_per_core']:.1f} per core" in text


def test_data_mode_on_a_missing_folder_is_one_line(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "c.yaml", tmp_path / "photos")
    result = vit_dist("bench", str(config), "--data")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: data.root {tmp_path / 'photos'} does not exist; point data.root at a " \
                                    "folder holding train/ and val/ (vit-dist demo-data OUT writes one)"


def test_compile_cache_key_changes_with_the_computation_only():
    def key(*overrides):
        return compile_cache_dir(load_config(None, ["train.compile_cache=/c", *overrides]), "train", 1)

    assert compile_cache_dir(load_config(None, []), "train", 1) is None
    assert key().startswith("/c/")
    # Where a run writes or resumes from is not part of the graph.
    assert key("train.output_dir=/a") == key("train.output_dir=/b") == key("train.resume=auto")
    for other in (key("model.depth=3"), key("train.batch_size=8"), key("precision.amp_level=O2")):
        assert other != key()
    cfg = load_config(None, ["train.compile_cache=/c"])
    assert compile_cache_dir(cfg, "train", 1) != compile_cache_dir(cfg, "eval", 1)
    assert compile_cache_dir(cfg, "train", 1) != compile_cache_dir(cfg, "train", 2)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps >= 1"),
    (["--set", "model.num_classes=null"], "needs model.num_classes"),
])
def test_bad_bench_input_is_one_line(tmp_path, tiny_data, args, message):
    config = tiny_config(tmp_path / "c.yaml", tiny_data, **TINY)
    result = vit_dist("bench", str(config), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
