"""What a run tells besides its metrics.jsonl: train.tensorboard's event files (read back with
TensorBoard's own EventAccumulator, across a resume that trains steps again) and train.profile_steps'
trace from MindSpore's profiler, on one device; both refused in one line when they cannot work."""
import json
import subprocess

import pytest

from conftest import PYTHON, ROOT, ok, tiny_config, tool_env, vit_dist


def _scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed(tiny_data, tmp_path_factory):
    """6 steps on one device (a checkpoint every 2, the model and its EMA evaluated at the end), profiled
    over steps 2-3; then the same run resumed from its step 2 checkpoint, which trains steps 3-6 again."""
    tmp = tmp_path_factory.mktemp("logs")
    config = tiny_config(tmp / "c.yaml", tiny_data, train={"epochs": 1, "log_interval": 1, "eval_every_epochs": 1,
                                                           "ema_decay": 0.9, "tensorboard": True,
                                                           "profile_steps": [2, 3]},
                         checkpoint={"every_n_steps": 2})
    run = tmp / "run"
    first = ok(vit_dist("train", str(config), "--set", f"train.output_dir={run}"))
    traces = sorted((run / "profile" / "rank_0").rglob("trace_view.json"))
    again = ok(vit_dist("train", str(config), "--set", f"train.output_dir={run}",
                        f"train.resume={run / 'checkpoints' / 'step_00000002.safetensors'}"))
    return {"run": run, "first": first, "again": again, "traces": traces}


def test_tensorboard_holds_each_step_once_with_the_resumed_attempts_values(resumed):
    run = resumed["run"]
    assert len(list((run / "tensorboard").iterdir())) == 2  # an event file per attempt
    latest = {}  # (step, evaluation?) -> the last record logged for it: the resumed attempt's from step 3 on
    for record in _records(run):
        latest[(record["step"], "top1" in record)] = record
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"), ("train/data_wait", "data_wait")]:
        assert _scalars(run, tag) == [(step, pytest.approx(latest[(step, False)][key], rel=1e-6))
                                      for step in range(1, 7)], tag
    # Timings differ between attempts. Each attempt's first step (1; 3 after the resume) holds the graph
    # compile and has none: step 3's from the first attempt is gone with the rest it logged after step 2.
    for tag, key in [("train/images_per_sec", "images_per_sec"), ("train/step_time_slowest_s", "step_time_slowest_s")]:
        assert _scalars(run, tag) == [(step, pytest.approx(latest[(step, False)][key], rel=1e-6))
                                      for step in (2, 4, 5, 6)], tag
    for tag, key in [("val/top1", "top1"), ("val/top5", "top5"), ("val/loss", "val_loss"),
                     ("val/ema_top1", "ema_top1"), ("val/ema_loss", "ema_val_loss")]:
        assert _scalars(run, tag) == [(6, pytest.approx(latest[(6, True)][key], rel=1e-6))], tag


def test_profile_steps_write_a_trace_of_those_steps_and_say_where(resumed):
    (trace,) = resumed["traces"]
    events = json.loads(trace.read_text())
    kernels = [e for e in events if e.get("ph") == "X"]  # complete events: one per kernel run
    assert kernels and any("MatMul" in e["name"] for e in kernels)
    said = [line for line in resumed["first"].stderr.splitlines() if " profile of steps 2-3: " in line]
    assert len(said) == 1 and said[0].endswith(f"{trace} (rank_N beside it for the other ranks); open the "
                                               "trace_view.json in https://ui.perfetto.dev or chrome://tracing")


@pytest.mark.parametrize("window, message", [
    ("[5,2]", "train.profile_steps must be [first, last] steps with 1 <= first <= last, got [5, 2]; "
              "e.g. train.profile_steps=[10,20]"),
    ("[0,2]", "train.profile_steps must be [first, last] steps with 1 <= first <= last, got [0, 2]; "
              "e.g. train.profile_steps=[10,20]"),
    ("[3,13]", "train.profile_steps [3, 13] ends after the run's last step 12; choose steps within 1..12"),
])
def test_a_profile_window_outside_the_run_is_one_line(tiny_data, tmp_path, window, message):
    config = tiny_config(tmp_path / "c.yaml", tiny_data)  # 2 epochs of 6 steps
    result = vit_dist("train", str(config), "--set", f"train.profile_steps={window}",
                      f"train.output_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and result.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_tensorboard_without_its_package_is_one_line_naming_the_extra(tiny_data, tmp_path):
    """The package made unimportable the way Python's import system allows (None in sys.modules)."""
    config = tiny_config(tmp_path / "c.yaml", tiny_data)
    program = ("import sys; sys.modules['tensorboard'] = None; from vit_dist.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([PYTHON, "-c", program, "train", str(config), "--set", "train.tensorboard=true",
                             f"train.output_dir={tmp_path / 'run'}"], cwd=ROOT, env=tool_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: train.tensorboard needs the tensorboard package, which is not installed; "
                                     "pip install 'vit-dist[tensorboard]', or set train.tensorboard=false")
    assert not (tmp_path / "run").exists()
