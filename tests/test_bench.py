"""`vit-dist bench`: its figures on 1 and 2 real ranks, the input-pipeline timing on real images,
the compile cache, its key and its refusal on several ranks, and bad input."""
import json
from pathlib import Path

import pytest

from conftest import msrun, ok, tiny_config, vit_dist
from vit_dist.config import ConfigError, compile_cache_dir, load_config

TINY = {"model": {"num_classes": 3}}
# tiny_config's ViT (16 px, patch 4, dim 32, depth 2, mlp 128, 3 classes): 16 patches, 17 tokens.
TINY_TRAIN_FLOPS = 3 * (2 * 16 * 48 * 32 + 2 * (2 * 17 * (4 * 32 * 32 + 2 * 32 * 128) + 4 * 17 * 17 * 32) + 2 * 32 * 3)


def last_json(result) -> dict:
    return json.loads(ok(result).stdout.strip().splitlines()[-1])


def test_bench_reports_throughput_compile_time_and_mfu_and_fills_the_compile_cache(tmp_path, tiny_data):
    cache = tmp_path / "cache"
    config = tiny_config(tmp_path / "c.yaml", tiny_data, **TINY)
    result = last_json(vit_dist("bench", str(config), "--steps", "3", "--warmup", "1", "--peak-gflops", "50",
                                "--json", "--set", f"train.compile_cache={cache}"))
    assert result["world_size"] == 1 and result["steps"] == 3 and result["batch_per_device"] == 8
    assert result["images_per_sec"] == pytest.approx(result["images_per_sec_per_device"], rel=1e-6)
    assert result["images_per_sec_min"] <= result["images_per_sec"] <= result["images_per_sec_max"]
    assert result["step_ms"] == pytest.approx(8000 / result["images_per_sec_per_device"], rel=1e-6)
    assert result["compile_s"] > 0 and result["first_step_s"] > result["step_ms"] / 1000
    assert result["train_gflops_per_image"] == pytest.approx(TINY_TRAIN_FLOPS / 1e9)
    assert result["mfu"] == pytest.approx(TINY_TRAIN_FLOPS * result["images_per_sec_per_device"] / 50e9, rel=1e-6)
    assert result["peak_memory_mib"] > 100
    # The compiled graph is saved under the folder keyed by the computation (see the key test).
    key = compile_cache_dir(load_config(config, [f"train.compile_cache={cache}"]), "bench", 1)
    assert list(Path(key).glob("rank_0/graph_cache/*.mindir"))


def test_two_ranks_report_the_sum_of_their_throughputs(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "c.yaml", tiny_data, **TINY)
    result = last_json(msrun("-n", "2", "bench", str(config), "--steps", "3", "--warmup", "1", "--peak-gflops", "50",
                             "--json", "--set", f"train.output_dir={tmp_path / 'run'}"))
    assert result["world_size"] == 2
    # Global = the sum of the ranks' medians: more than rank 0's own, which is what per_device reports.
    assert result["images_per_sec"] > result["images_per_sec_per_device"] > 0
    assert result["images_per_sec_min"] <= result["images_per_sec"] <= result["images_per_sec_max"]


def test_compile_cache_on_several_ranks_is_refused_before_msrun_starts(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "c.yaml", tiny_data, train={"compile_cache": str(tmp_path / "cache")})
    result = msrun("-n", "2", str(config), "--set", f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "train.compile_cache works on one device only" in result.stderr
    assert not (tmp_path / "run").exists()  # refused by the launcher's pre-flight: no worker started


def test_data_mode_times_the_input_pipeline_on_real_images(tmp_path, tiny_data):
    config = tiny_config(tmp_path / "c.yaml", tiny_data)
    result = last_json(vit_dist("bench", str(config), "--data", "--steps", "10", "--json"))
    assert result["batches"] == 10 and result["num_workers"] == 1 and result["data_images_per_sec"] > 0


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
    assert compile_cache_dir(cfg, "train", 1) != compile_cache_dir(cfg, "bench", 1)
    with pytest.raises(ConfigError, match="one device only"):
        compile_cache_dir(cfg, "train", 2)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps >= 1"),
    (["--set", "model.num_classes=null"], "needs model.num_classes"),
])
def test_bad_bench_input_is_one_line(tmp_path, tiny_data, args, message):
    config = tiny_config(tmp_path / "c.yaml", tiny_data, **TINY)
    result = vit_dist("bench", str(config), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr
