"""Preemption, auto-restart and the hang watchdog, with real msrun/mpirun jobs and real signals: a stop
on SIGTERM saves a verified checkpoint at the step the ranks agreed on and resumes to the uninterrupted
result; a killed worker is restarted from the newest checkpoint to the same result; a stopped worker
ends the job within the hang timeout. No bound here depends on the machine's speed: the tests wait for
conditions, and read the step a job stopped at rather than assume it."""
import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (PYTHON, ROOT, last_checkpoint, load_params, msrun, ok, run, tiny_config, tool_env,
                      with_recipe, worst_relative_difference)
from test_launch import LAUNCHERS, TWO_RANKS, _job, _read, _tagged_processes, _wait_for, worker_pid
from vit_dist.host.checkpoint_files import read_manifest, verified


# Long (3 steps per epoch on 2 ranks, up to 3000): a signal or kill reaches it mid-run on any machine.
# Shuffled, with the whole recipe (conftest.RECIPE), dropout, attention dropout and stochastic depth (a
# resumed run must draw them all again, and carry the EMA on), a checkpoint every 4 steps. A test then
# sets train.max_steps (which leaves the learning-rate schedule as it is) to end its runs early.
LONG = with_recipe(model={"drop_path_rate": 0.2, "dropout": 0.1, "attention_dropout": 0.1},
                   data={"augment": True, "shuffle": True}, train={"epochs": 1000, "log_interval": 1},
                   checkpoint={"every_n_steps": 4, "keep_last": 3})
STOPPED = re.compile(r"^error: stopped by SIGTERM after step (\d+) \(checkpoint (\S+)\); resume with: (.+)$", re.M)


@pytest.fixture(scope="module")
def config(tiny_data, tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("reliability") / "long.yaml", tiny_data, **LONG)


# The uninterrupted reference's length: a stop lands within a few steps of step 3 on any machine.
# Covers the restart test's 60 steps, and a stop (at most 32 steps after its signal: Preemption) plus 3.
REFERENCE_STEPS = 60


@pytest.fixture(scope="module")
def uninterrupted(config, tmp_path_factory) -> Path:
    """The run directory of the 2-rank job run for REFERENCE_STEPS steps without interruption, with a
    checkpoint at every step: the result each interrupted job must end with, at its own last step."""
    whole = tmp_path_factory.mktemp("uninterrupted") / "run"
    ok(msrun("--ranks-per-node", "2", str(config), "--set", f"train.output_dir={whole}",
             f"train.max_steps={REFERENCE_STEPS}", "checkpoint.every_n_steps=1", f"checkpoint.keep_last={REFERENCE_STEPS}"))
    return whole


def _same_as_uninterrupted(uninterrupted: Path, run_dir: Path, steps: int) -> None:
    """run_dir ends as the uninterrupted 2-rank job stood after `steps` steps."""
    assert steps <= REFERENCE_STEPS and last_checkpoint(run_dir).name == f"step_{steps:08d}.safetensors"
    reference = uninterrupted / "checkpoints" / f"step_{steps:08d}.safetensors"
    worst = worst_relative_difference(load_params(last_checkpoint(run_dir)), load_params(reference))
    assert worst[0] < 1e-5, worst


def _launcher(launcher: str, config: Path, run_dir: Path, *options: str) -> list:
    return ["bash", str(LAUNCHERS[launcher]), *TWO_RANKS[launcher], *options, str(config),
            "--set", f"train.output_dir={run_dir}"]


def _when_training(run_dir: Path, job) -> None:
    _wait_for(lambda: "step 3/" in _read(run_dir / "logs" / "worker_0.log"), job)


def _stopped_checkpoint(stderr: str) -> tuple[int, Path, str]:
    """The one line of a job stopped by SIGTERM: the step, its checkpoint (verified), the resume command."""
    match = STOPPED.search(stderr)
    assert match, stderr[-3000:]
    step, path = int(match[1]), Path(match[2])
    assert verified(path) and read_manifest(path)["step"] == step and path.name == f"step_{step:08d}.safetensors"
    return step, path, match[3]


def _terminated(launcher: str, config: Path, tmp_path: Path, send_sigterm) -> tuple[int, Path, str]:
    """Starts a 2-rank job, sends SIGTERM (send_sigterm(job, run_dir)) once it trains, and checks that the
    job ends with 143, nothing left running, and one line naming its verified checkpoint; returns
    (step, checkpoint, resume command)."""
    run_dir = tmp_path / "run"
    with _job(_launcher(launcher, config, run_dir), tmp_path / "launcher") as job:
        _when_training(run_dir, job)
        send_sigterm(job, run_dir)
        status = job.wait(timeout=180)
        leftovers = _tagged_processes(job.tag)
    stderr = _read(tmp_path / "launcher.err")
    assert status == 143, stderr[-3000:]
    assert leftovers == []
    return _stopped_checkpoint(stderr)


def test_sigterm_to_the_msrun_launcher_saves_and_resumes_exactly(config, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    # To the launcher alone: it passes it on.
    step, path, resume = _terminated("msrun", config, tmp_path, lambda job, _: job.send_signal(signal.SIGTERM))
    assert step >= 3 and last_checkpoint(run_dir) == path  # the step both ranks agreed on
    assert resume == " ".join(map(shlex.quote, _launcher("msrun", config, run_dir)[1:] +
                                  ["--set", "train.resume=auto", f"train.output_dir={run_dir}"]))
    resumed = ok(run(["bash", *shlex.split(resume), f"train.max_steps={step + 3}"]))
    assert f"resumed from {path}: step {step}" in resumed.stderr + resumed.stdout
    _same_as_uninterrupted(uninterrupted, run_dir, step + 3)


def test_sigterm_to_one_mpirun_worker_stops_the_job_with_a_checkpoint(config, tmp_path):
    step, path, _ = _terminated("mpirun", config, tmp_path,
                                lambda _, run_dir: os.kill(worker_pid(run_dir, 1), signal.SIGTERM))
    assert (tmp_path / "run" / "logs" / "stopped").read_text() == f"SIGTERM {step} {path}\n"


def test_a_killed_worker_is_restarted_from_the_newest_checkpoint(config, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    cmd = _launcher("msrun", config, run_dir, "--max-restarts", "1", "--failure-timeout", "15") + ["train.max_steps=60"]
    with _job(cmd, tmp_path / "launcher") as job:
        _wait_for(lambda: (run_dir / "checkpoints" / "step_00000004.json").exists(), job, poll=0.05)
        os.kill(worker_pid(run_dir, 1), signal.SIGKILL)
        status = job.wait(timeout=300)
        leftovers = _tagged_processes(job.tag)
    stderr = _read(tmp_path / "launcher.err")
    assert status == 0, stderr[-3000:]
    assert leftovers == []
    restarts = (run_dir / "logs" / "restarts.log").read_text().splitlines()
    assert len(restarts) == 1 and " restart 1 of 1: rank 1 exited with status -9; " in restarts[0], restarts
    assert restarts[0] in stderr
    assert "resumed from" in _read(run_dir / "logs" / "worker_0.log")
    first = run_dir / "logs" / "attempt_0"  # the killed attempt's logs, kept beside the restart's
    assert "step 4/60" in _read(first / "worker_0.log") and "resumed from" not in _read(first / "worker_0.log")
    assert (first / "worker_1.log").is_file()
    final = json.loads((run_dir / "eval.json").read_text())  # the model and its EMA, evaluated on 2 ranks
    assert final["images"] == 9 and 0 <= final["top1"] <= 1 and 0 <= final["ema_top1"] <= 1, final
    _same_as_uninterrupted(uninterrupted, run_dir, 60)


def test_a_stopped_worker_ends_the_job_within_the_hang_timeout(config, tmp_path):
    run_dir = tmp_path / "run"
    timeout = 10
    with _job(_launcher("msrun", config, run_dir, "--hang-timeout", str(timeout)), tmp_path / "launcher") as job:
        _when_training(run_dir, job)
        os.kill(worker_pid(run_dir, 1), signal.SIGSTOP)  # the cleanup's SIGKILL ends it if the launcher does not
        stopped = time.monotonic()
        status = job.wait(timeout=180)
        elapsed = time.monotonic() - stopped
        leftovers = _tagged_processes(job.tag)
    stderr = _read(tmp_path / "launcher.err")
    assert status == 124, stderr[-3000:]
    assert timeout - 1 <= elapsed < timeout + 15, elapsed
    assert leftovers == []
    assert re.search(rf"^error: rank 1 made no progress for more than {timeout} s \(last: .*; the process is "
                     rf"stopped\), so the job was stopped \(status 124\); last lines of ", stderr, re.M), stderr[-3000:]


def test_sigterm_to_one_device_training_saves_and_says_how_to_resume(config, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", str(config), "--set", f"train.output_dir={run_dir}"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([PYTHON, "-m", "vit_dist", *args], cwd=ROOT, env=tool_env(), stdout=out, stderr=err,
                                start_new_session=True)
    try:
        _wait_for(lambda: "step 3/" in _read(tmp_path / "out"), proc)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = _read(tmp_path / "err")
    assert status == 143, stderr[-3000:]
    step, path, resume = _stopped_checkpoint(stderr)
    assert last_checkpoint(run_dir) == path and stderr.rstrip().splitlines()[-1].startswith("error: stopped by")
    assert resume == shlex.join(["vit-dist", *args, "--set", "train.resume=auto", f"train.output_dir={run_dir}"])
