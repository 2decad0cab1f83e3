"""Real training jobs: one device and 2-rank msrun on real images, compared with each other."""
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import last_checkpoint, load_params, mpirun, msrun, ok, tiny_config, vit_dist, worst_relative_difference


EXACT = {"data": {"augment": False, "shuffle": False}, "train": {"eval_batch_size": 2}}


@pytest.fixture(scope="module")
def dp_runs(tiny_data, tmp_path_factory):
    """The same 6 steps on the same samples: 2 ranks x batch 8 under msrun (which also profiles steps 5-6
    and writes TensorBoard events: neither changes what is computed), 1 device x batch 16."""
    tmp = tmp_path_factory.mktemp("dp")
    config = tiny_config(tmp / "exact.yaml", tiny_data, **EXACT)
    two = tmp / "two_ranks"
    one = tmp / "one_device"
    launched = ok(msrun("--ranks-per-node", "2", str(config), "--set", "train.batch_size=8", f"train.output_dir={two}",
                        "train.profile_steps=[5,6]", "train.tensorboard=true"))
    ok(vit_dist("train", str(config), "--set", "train.batch_size=16", f"train.output_dir={one}"))
    return {"config": config, "two": two, "one": one, "launched": launched}


def test_two_ranks_end_with_the_parameters_of_one_device_at_double_batch(dp_runs):
    two = load_params(last_checkpoint(dp_runs["two"]))
    one = load_params(last_checkpoint(dp_runs["one"]))
    assert last_checkpoint(dp_runs["two"]).name == last_checkpoint(dp_runs["one"]).name == "step_00000006.safetensors"
    assert two.keys() == one.keys()
    moments = [k for k in two if k.startswith("adamw.exp_avg")]
    assert moments and all(np.abs(two[k]).max() > 0 for k in moments), "optimizer state is checkpointed"
    worst = worst_relative_difference(two, one)
    assert worst[0] < 1e-5, worst


def test_loss_logged_by_rank_0_is_the_mean_over_ranks(dp_runs):
    def losses(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in lines if "loss" in r]
    assert losses(dp_runs["two"]) == pytest.approx(losses(dp_runs["one"]), rel=1e-5)


def test_run_directory_holds_config_metrics_checkpoints_eval_and_every_rank_log(dp_runs):
    run = dp_runs["two"]
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "checkpoints", "eval.json", "logs"}
    assert {p.name for p in (run / "logs").iterdir()} >= {"worker_0.log", "worker_1.log"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_record = next(r for r in records if "loss" in r)
    assert {"step", "epoch", "loss", "lr", "images_per_sec", "eta_s", "data_wait"} <= train_record.keys()
    eval_record = records[-1]
    assert eval_record["images"] == 9 and 0.0 <= eval_record["top1"] <= eval_record["top5"] <= 1.0
    assert eval_record["val_loss"] > 0
    assert json.loads((run / "eval.json").read_text()) == {k: eval_record[k]
                                                           for k in ("top1", "top5", "images", "val_loss")}
    assert "train.output_dir" not in (run / "config.yaml").read_text()
    assert f"output_dir: {run}" in (run / "config.yaml").read_text()
    # Rank 0 alone writes checkpoints and metrics; the launcher streams rank 0's lines, stamped in UTC.
    assert "step 6/6" in dp_runs["launched"].stdout and "world size      2" in dp_runs["launched"].stdout
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step 6/6 epoch ", dp_runs["launched"].stdout, re.M)
    worker_log = (run / "logs" / "worker_0.log").read_text()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d eval epoch 2 top1 ", worker_log, re.M)


def test_each_log_holds_the_fastest_and_slowest_ranks_step_time(dp_runs):
    """One AllGather at each log: 2 ranks' times bracket rank 0's own (its img/s); on one device they are one."""
    for run, world in ((dp_runs["two"], 2), (dp_runs["one"], 1)):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if "loss" in r and r["step_time_slowest_s"] is not None]
        assert len(timed) >= 2, records  # the first interval holds the compile only (log_interval 2: one timed step)
        for r in timed:
            rank0 = 16 / r["images_per_sec"]  # global batch 16
            assert 0 < r["step_time_fastest_s"] <= rank0 * (1 + 1e-6) and rank0 <= r["step_time_slowest_s"] * (1 + 1e-6)
            assert r["slowest_rank"] in range(world)
            if world == 1:
                assert r["step_time_fastest_s"] == r["step_time_slowest_s"]


def test_every_rank_profiles_its_steps_and_rank_0_alone_writes_tensorboard_events(dp_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = dp_runs["two"]
    for rank in (0, 1):
        (trace,) = (run / "profile" / f"rank_{rank}").rglob("trace_view.json")
        assert any(e.get("ph") == "X" and "MatMul" in e["name"] for e in json.loads(trace.read_text())), rank
    assert len(list((run / "tensorboard").iterdir())) == 1
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("val/loss")] == [6]


def test_eval_counts_every_val_image_once_on_two_ranks(dp_runs, tiny_data, tmp_path):
    """9 val images, eval batch 2: rank 0 sees 5, rank 1 sees 4 plus one padded repeat. The val loss
    masks the same padding: 2 ranks' equals 1 rank's and the cross-entropy of `vit-dist infer`'s softmax."""
    ckpt = str(last_checkpoint(dp_runs["one"]))
    config = str(dp_runs["config"])
    out = dp_runs["one"].parent
    single = json.loads(ok(vit_dist("eval", config, "--ckpt", ckpt, "--set",
                                    f"train.output_dir={out / 'eval1'}")).stdout.strip().splitlines()[-1])
    launched = ok(msrun("--ranks-per-node", "2", "eval", config, "--ckpt", ckpt,
                        "--set", f"train.output_dir={out / 'eval2'}"))
    distributed = json.loads(launched.stdout.strip().splitlines()[-1])
    assert single["images"] == distributed["images"] == 9
    assert json.loads((out / "eval2" / "eval.json").read_text()) == distributed
    # The loss is summed in float32 by the collective: equal to its rounding, the counts exactly.
    assert distributed.pop("val_loss") == pytest.approx(single["val_loss"], rel=1e-6)
    assert distributed == {k: v for k, v in single.items() if k != "val_loss"}
    # The reference: every val image's probabilities from `vit-dist infer` (all 3 classes), -log of its label's.
    predictions = tmp_path / "predictions.json"
    ok(vit_dist("infer", config, "--ckpt", ckpt, "--images", str(tiny_data / "val"), "--topk", "3",
                "--out", str(predictions)))
    losses = [-math.log(next(t["prob"] for t in p["topk"] if t["class"] == Path(p["image"]).parent.name))
              for p in json.loads(predictions.read_text())]
    assert len(losses) == 9 and single["val_loss"] == pytest.approx(sum(losses) / 9, rel=1e-4)


def test_same_config_and_seed_give_the_same_loss_curve(tiny_data, tmp_path):
    config = tiny_config(tmp_path / "aug.yaml", tiny_data, data={"num_workers": 2}, train={"batch_size": 8})
    curves = []
    for name in ("a", "b"):
        ok(vit_dist("train", str(config), "--set", f"train.output_dir={tmp_path / name}"))
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        curves.append([r["loss"] for r in records if "loss" in r])
    assert len(curves[0]) == 6 and curves[0] == curves[1]


@pytest.mark.parametrize("launcher, ranks", [(msrun, "--ranks-per-node"), (mpirun, "--ranks")],
                         ids=["msrun", "mpirun"])
@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "{config}: unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    ("data.image_size=18", "data.image_size 18 is not divisible by model.patch_size 4; use an image size that is "
                           "a multiple of 4"),
])
def test_bad_config_fails_in_seconds_under_a_launcher_with_one_line(tiny_data, tmp_path, launcher, ranks, override,
                                                                     message):
    config = tiny_config(tmp_path / "c.yaml", tiny_data)
    started = time.monotonic()
    result = launcher(ranks, "2", str(config), "--set", override, f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: " + message.format(config=config)
    assert time.monotonic() - started < 30 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    ("data.root=/nonexistent", "data.root /nonexistent does not exist"),
    ("train.batch_size=64", "train.batch_size 64 is larger than each rank's shard of 48 images"),
])
def test_bad_data_is_one_line_before_anything_compiles(tiny_data, tmp_path, override, message):
    config = tiny_config(tmp_path / "c.yaml", tiny_data)
    result = vit_dist("train", str(config), "--set", override, f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_rejects_a_checkpoint_of_another_model(dp_runs, tmp_path):
    result = vit_dist("eval", str(dp_runs["config"]), "--ckpt", str(last_checkpoint(dp_runs["one"])),
                      "--set", "model.embed_dim=64", f"train.output_dir={tmp_path}")
    assert result.returncode == 2 and "does not fit: missing [], wrong shape ['blocks.0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unwritable_output_dir_is_one_line_under_msrun(tiny_data, tmp_path):
    config = tiny_config(tmp_path / "c.yaml", tiny_data)
    (tmp_path / "file").write_text("not a directory")
    result = msrun("--ranks-per-node", "2", str(config), "--set", f"train.output_dir={tmp_path / 'file' / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: cannot write to train.output_dir {tmp_path / 'file' / 'run'}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_new_run_refuses_a_directory_that_holds_another_and_resume_continues_it(tiny_data, tmp_path):
    """One run per directory: a second run without train.resume would overwrite the first's checkpoints,
    append to its metrics and report its best checkpoint; it is refused in one line before anything
    starts, under a launcher too. train.resume=auto continues the run instead."""
    config = tiny_config(tmp_path / "c.yaml", tiny_data, train={"max_steps": 2})
    run = tmp_path / "run"
    ok(vit_dist("train", str(config), "--set", f"train.output_dir={run}"))
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and "logs" not in p.parts}
    for result in (vit_dist("train", str(config), "--set", f"train.output_dir={run}"),
                   msrun("--ranks-per-node", "2", str(config), "--set", f"train.output_dir={run}")):
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip() == (f"error: train.output_dir {run} already holds a run (metrics.jsonl, eval.json, "
                                         "checkpoints/best_step_00000002.safetensors); continue it with --set "
                                         "train.resume=auto, or start this one in a new train.output_dir")
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and "logs" not in p.parts} == before
    resumed = ok(vit_dist("train", str(config), "--set", f"train.output_dir={run}", "train.resume=auto"))
    assert "resumed from" in resumed.stderr


def test_a_compile_cache_folder_others_can_write_is_refused(tiny_data, tmp_path):
    """MindSpore loads and runs the graphs a compile cache holds: one writable by others is refused in one
    line before anything starts; a new one is made private to the user."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    config = tiny_config(tmp_path / "c.yaml", tiny_data, train={"max_steps": 1})
    result = vit_dist("train", str(config), "--set", f"train.output_dir={tmp_path / 'run'}",
                      f"train.compile_cache={shared}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: train.compile_cache folder {shared} is not yours alone (a symlink, "
                                    f"another owner, or writable by others: uid {os.getuid()}, mode drwxrwxrwx)")
    fresh = tmp_path / "own" / "cache"
    ok(vit_dist("train", str(config), "--set", f"train.output_dir={tmp_path / 'run2'}", f"train.compile_cache={fresh}"))
    assert fresh.stat().st_mode & 0o777 == 0o700


def test_planted_symlinks_in_the_run_directory_are_not_written_through(tiny_data, tmp_path):
    """Temporary files are created exclusively under fresh names: links planted at the names a
    writer once used (and at a best checkpoint's) leave their targets untouched. Checkpoints are
    readable as the user's umask says, like any file they write."""
    config = tiny_config(tmp_path / "c.yaml", tiny_data, train={"max_steps": 2})
    run, victim = tmp_path / "run", tmp_path / "victim"
    victim.write_text("precious")
    (run / "checkpoints").mkdir(parents=True)
    for name in (".step_00000002.tmp.safetensors", ".step_00000002.tmp.json", ".best_step_00000002.tmp.safetensors",
                 ".config.yaml.tmp", ".eval.json.tmp"):
        folder = run / "checkpoints" if "step" in name else run
        (folder / name).symlink_to(victim)
    ok(vit_dist("train", str(config), "--set", f"train.output_dir={run}", "train.resume=auto"))
    assert victim.read_text() == "precious"
    umask = os.umask(0)
    os.umask(umask)
    for path in (last_checkpoint(run), run / "checkpoints" / "best_step_00000002.safetensors", run / "eval.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
