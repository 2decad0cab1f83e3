"""A run killed with SIGKILL mid-epoch and resumed with train.resume=auto ends with the parameters and
the weights' EMA of an uninterrupted run (on one device here; on 2 msrun ranks in test_reliability.py,
by an automatic restart); corrupt checkpoints, full disks."""
import json
import os
import re
import signal
import subprocess
import time

import numpy as np

from conftest import PYTHON, ROOT, last_checkpoint, load_params, ok, tiny_config, tool_env, vit_dist, with_recipe

# Shuffled (so the resumed data order matters), augmented with the whole recipe and with stochastic
# depth (so every random draw of the resumed run matters: crops, flips, RandAugment, erasing, mixup,
# cutmix, repeated augmentation, drop-path masks), 60 steps, 5 evaluations of the model and its EMA;
# the learning rate 1e-3 as 5e-4 for a global batch of 4, scaled to the run's 8.
RESUMABLE = with_recipe(model={"drop_path_rate": 0.2}, data={"augment": True, "shuffle": True},
                        train={"epochs": 10, "log_interval": 5, "eval_every_epochs": 2, "ema_decay": 0.9, "lr": 5.0e-4,
                               "lr_base_batch": 4},
                        checkpoint={"every_n_steps": 4, "keep_last": 3})
SCALED_LR = "peak learning rate 0.001) on 1 rank(s)"
SCALING = "train.lr 0.001 is 0.0005 x global batch 8 / train.lr_base_batch 4"


def _start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _kill_when_checkpointed(proc: subprocess.Popen, run_dir, step: int, marker: str, timeout: float = 240) -> int:
    """SIGKILLs every process of the job (launcher, scheduler, workers) once step_<step> is on disk;
    returns the step of the newest checkpoint the job left. The job may have gone on for a few steps
    between the file's appearance and the kill (how many depends on the machine's speed and load), so
    that step is read, not assumed."""
    target = run_dir / "checkpoints" / f"step_{step:08d}.json"
    deadline = time.monotonic() + timeout
    while not target.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, f"no {target} after {timeout}s"
        time.sleep(0.05)
    subprocess.run(["pkill", "-KILL", "-f", marker], check=False)
    os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    proc.wait(timeout=30)
    assert not (run_dir / "eval.json").exists(), "the run finished before the kill"
    return int(last_checkpoint(run_dir).stem.split("_")[1])


def _same_parameters(resumed, uninterrupted) -> None:
    a, b = load_params(last_checkpoint(resumed)), load_params(last_checkpoint(uninterrupted))
    assert last_checkpoint(resumed).name == last_checkpoint(uninterrupted).name == "step_00000060.safetensors"
    worst = max((float(np.linalg.norm(a[k].astype(np.float64) - b[k]) / max(np.linalg.norm(b[k]), 1e-12)), k)
                for k in b)
    assert worst[0] <= 1e-6, worst


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_data, tmp_path):
    config = tiny_config(tmp_path / "c.yaml", tiny_data, **RESUMABLE)
    whole, killed = tmp_path / "whole", tmp_path / "killed"

    def train(run_dir, *extra) -> list[str]:
        return ["train", str(config), "--set", f"train.output_dir={run_dir}", *extra]

    proc = _start([PYTHON, "-m", "vit_dist", *train(killed)])
    newest = _kill_when_checkpointed(proc, killed, 20, str(killed))  # mid-epoch: 6 steps per epoch
    assert 20 <= newest < 60, newest  # killed before the end, whatever the machine's speed
    resumed = ok(vit_dist(*train(killed, "train.resume=auto")))
    assert "resumed from" in resumed.stderr + resumed.stdout
    # The rate is resolved before the config digest: the resume finds the checkpoints' own config.
    assert SCALED_LR in resumed.stderr and SCALING in resumed.stderr and "another config" not in resumed.stderr
    uninterrupted = ok(vit_dist(*train(whole)))
    _same_parameters(killed, whole)
    assert _best(killed) == _best(whole)
    _config_yaml_trains_at_the_scaled_rate(whole)
    # The run's final evaluation of its EMA is what `eval --ema` makes of its last checkpoint.
    final = json.loads((whole / "eval.json").read_text())
    assert f"ema top1 {100 * final['ema_top1']:.2f}% top5 {100 * final['ema_top5']:.2f}%" in uninterrupted.stdout
    evaluated = json.loads(ok(vit_dist("eval", str(config), "--ckpt", str(last_checkpoint(killed)), "--ema", "--set",
                                       f"train.output_dir={tmp_path / 'eval'}")).stdout.splitlines()[-1])
    assert (evaluated["top1"], evaluated["top5"], evaluated["weights"]) == (final["ema_top1"], final["ema_top5"], "ema")


def _config_yaml_trains_at_the_scaled_rate(run_dir) -> None:
    """RUN_DIR/config.yaml holds the rate the run trained with (lr_base_batch resolved away), says how it
    was scaled, and loads back to the run's own config digest."""
    from vit_dist.host.checkpoint_files import read_manifest
    from vit_dist.host.config import config_digest, load_config, with_scaled_lr

    text = (run_dir / "config.yaml").read_text()
    assert text.splitlines()[0] == f"# {SCALING}"
    written = load_config(run_dir / "config.yaml")
    assert (written.train.lr, written.train.lr_base_batch) == (0.001, 0)
    assert with_scaled_lr(written, 16)[0] == written
    assert config_digest(written) == read_manifest(last_checkpoint(run_dir))["config"]


def _best(run_dir) -> str:
    """The kept best checkpoint: the first evaluation with the highest top-1 of the model or its EMA,
    over the killed and the resumed part of a run."""
    from vit_dist.host.checkpoint_files import best_checkpoint, read_manifest

    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"top1"' in line]
    # A kill between an evaluation and its epoch's checkpoint repeats that evaluation after the resume.
    evals = list({record["step"]: record for record in evals}.values())
    assert len(evals) == 5 and all("ema_top1" in record for record in evals), evals
    best = max(evals, key=lambda r: (max(r["top1"], r["ema_top1"]), -r["step"]))
    (path, score), = [best_checkpoint(run_dir)]
    assert list((run_dir / "checkpoints").glob("best_*.safetensors")) == [path]
    assert path.name == f"best_step_{best['step']:08d}.safetensors" and score == max(best["top1"], best["ema_top1"])
    manifest = read_manifest(path)
    assert manifest["epoch"] == best["epoch"] and (manifest["top1"], manifest["ema_top1"]) == (best["top1"],
                                                                                             best["ema_top1"])
    assert manifest["best_weights"] == ("ema" if best["ema_top1"] > best["top1"] else "model")
    return path.name


def test_auto_resume_skips_a_corrupt_checkpoint_and_names_it(tiny_data, tmp_path):
    config = tiny_config(tmp_path / "c.yaml", tiny_data, **RESUMABLE)
    run = tmp_path / "run"
    ok(vit_dist("train", str(config), "--set", "train.max_steps=12", f"train.output_dir={run}"))
    newest = last_checkpoint(run)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    result = ok(vit_dist("train", str(config), "--set", "train.max_steps=12", "train.resume=auto",
                         f"train.output_dir={run}"))
    assert f"skipping checkpoint {newest}" in result.stderr
    assert "resumed from" in result.stderr and "step_00000008.safetensors: step 8" in result.stderr
    # A checkpoint of another model is refused in one line, before anything is loaded into the model.
    other = vit_dist("train", str(config), "--set", "model.embed_dim=48", f"train.resume={last_checkpoint(run)}",
                     f"train.output_dir={tmp_path / 'other'}")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert other.stderr.startswith(f"error: checkpoint {last_checkpoint(run)} does not fit: missing [], wrong shape")


def test_no_room_to_save_stops_with_a_clear_message_and_keeps_the_previous_checkpoint(tiny_data, tmp_path):
    """A real full disk (ENOSPC): the checkpoints folder is a tmpfs with room for one checkpoint, so
    the second save (step 6, the first epoch's end) fails. Needs root, as CI has, to mount it."""
    from vit_dist.host.checkpoint_files import verified

    config = tiny_config(tmp_path / "c.yaml", tiny_data, **RESUMABLE)
    sized = tmp_path / "sized"
    ok(vit_dist("train", str(config), "--set", "train.max_steps=4", f"train.output_dir={sized}"))
    size = last_checkpoint(sized).stat().st_size
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(run / "checkpoints")],
                           capture_output=True, text=True)
    assert mount.returncode == 0, f"mounting a small tmpfs needs root: {mount.stderr}"
    try:
        result = vit_dist("train", str(config), "--set", "train.max_steps=12", f"train.output_dir={run}")
        assert result.returncode == 2
        last_line = result.stderr.strip().splitlines()[-1]
        assert last_line.startswith(f"error: cannot write checkpoint {run / 'checkpoints' / 'step_00000006.safetensors'}")
        assert "free disk space" in last_line
        previous = run / "checkpoints" / "step_00000004.safetensors"
        assert verified(previous) and set(load_params(previous)) >= {"head.weight", "adamw.step"}
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004.json", previous.name]
    finally:
        subprocess.run(["umount", str(run / "checkpoints")], check=True)


def test_a_disk_that_fills_up_during_training_is_one_line(tiny_data, tmp_path):
    """The run directory on a tmpfs that fills up while training runs (real ENOSPC): the next write, an
    append to metrics.jsonl (written every step here) or the epoch's checkpoint, stops the run with one
    line naming the file and the fix, no traceback."""
    config = tiny_config(tmp_path / "c.yaml", tiny_data, train={"epochs": 1000, "log_interval": 1})
    run = tmp_path / "run"
    run.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(run)], capture_output=True,
                           text=True)
    assert mount.returncode == 0, f"mounting a small tmpfs needs root: {mount.stderr}"
    try:
        proc = subprocess.Popen([PYTHON, "-m", "vit_dist", "train", str(config), "--set", f"train.output_dir={run}"],
                                cwd=ROOT, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not (run / "metrics.jsonl").exists():
                assert proc.poll() is None and time.monotonic() < deadline, "no metrics.jsonl"
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGSTOP)  # the disk fills up between two writes
            with open(run / "filler", "wb") as filler:
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                except OSError:
                    pass
            os.killpg(proc.pid, signal.SIGCONT)
            _, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 2, stderr[-3000:]
        last_line = stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: cannot write (checkpoint )?{re.escape(str(run))}/\S+ \(.*No space left on "
                            r"device.*\); free disk space .*", last_line), last_line
        assert "Traceback" not in stderr
    finally:
        subprocess.run(["umount", str(run)], check=True)
