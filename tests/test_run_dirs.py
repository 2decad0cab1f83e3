"""Where a command runs and writes: `parallel.device_target: auto` resolved before anything starts and
recorded as the device found, an unavailable device refused in one line, the ranks of a plain msrun
(no vit-dist launcher, no train.output_dir) in one run directory, `vit-dist eval RUN_DIR` writing into
that run, and no run directory left by a command that failed before it started."""
import json
import socket
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, ok, run, tiny_config, tool_env
from vit_dist.host.run_record import remove_unstarted_run_dir



def vit_dist_in(cwd: Path, *args: str):
    """vit-dist run from `cwd`, where a run without train.output_dir makes its runs/<timestamp> folder."""
    return run([PYTHON, "-m", "vit_dist", *args], timeout=180, cwd=cwd, env=tool_env(PYTHONPATH=str(ROOT)))


@pytest.fixture(scope="module")
def auto_config(tiny_data, tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("auto") / "auto.yaml", tiny_data,
                       parallel={"device_target": "auto", "threads_per_rank": 1}, train={"max_steps": 2})


@pytest.fixture(scope="module")
def plain_msrun(auto_config) -> Path:
    """2 ranks started by msrun itself, as MindCV documents it, without train.output_dir; the run's folder."""
    cwd = auto_config.parent
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    ok(run(["msrun", "--worker_num", "2", "--local_worker_num", "2", "--master_port", port, "--log_dir",
            str(cwd / "msrun_log"), "--join", "True", "python", "-m", "vit_dist", "train", str(auto_config)],
           timeout=300, cwd=cwd, env=tool_env(PYTHONPATH=str(ROOT))))
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir


def test_plain_msrun_ranks_share_one_run_directory_on_the_device_auto_found(plain_msrun):
    ranks = sorted(p.read_text().split()[0] for p in (plain_msrun / "logs" / "pids").iterdir())
    assert ranks == ["0", "1"]
    assert (plain_msrun / "checkpoints" / "best_step_00000002.safetensors").is_file()
    recorded = (plain_msrun / "config.yaml").read_text()
    assert "  device_target: CPU\n" in recorded and f"  output_dir: {plain_msrun}\n" in recorded


def test_eval_of_a_run_directory_writes_its_result_into_the_run(plain_msrun, tmp_path):
    before = {name: (plain_msrun / name).read_bytes() for name in ("config.yaml", "eval.json")}
    result = ok(vit_dist_in(tmp_path, "eval", str(plain_msrun)))  # from elsewhere: the run's config alone
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads((plain_msrun / "eval_best_step_00000002.json").read_text()) == printed
    assert printed == json.loads(before["eval.json"])  # the same checkpoint and images as training's last eval
    assert {name: (plain_msrun / name).read_bytes() for name in before} == before
    assert list(tmp_path.iterdir()) == []


def test_a_failed_eval_leaves_no_run_directory(auto_config, tmp_path):
    (tmp_path / "bad.safetensors").write_text("not a checkpoint")
    result = vit_dist_in(tmp_path, "eval", str(auto_config), "--ckpt", "bad.safetensors")  # fails after start-up
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "error: cannot read checkpoint bad.safetensors")
    missing = vit_dist_in(tmp_path, "eval", str(auto_config), "--ckpt", "missing.safetensors")
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "error: checkpoint missing.safetensors does not exist; pass --ckpt RUN_DIR/checkpoints/step_N.safetensors")
    assert list((tmp_path / "runs").iterdir()) == []  # the folder of runs stays, empty


@pytest.mark.parametrize("written, kept", [
    (["config.yaml", "classes.json", "data_check.json", "logs/pids/123"], False),
    (["config.yaml", "checkpoints/step_00000002.safetensors"], True),
    (["data_check.json", "logs/heartbeat/0"], True),  # a heartbeat: a step was done
    (["data_check.json", "eval_best_step_00000002.json"], True),
])
def test_only_a_run_directory_holding_start_up_files_alone_is_removed(tmp_path, written, kept):
    run_dir = tmp_path / "run"
    for name in written:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("")
    remove_unstarted_run_dir(run_dir)
    assert run_dir.exists() == kept and all((run_dir / name).exists() == kept for name in written)


def test_an_unavailable_device_is_one_line_naming_the_available_ones(auto_config, tmp_path):
    result = vit_dist_in(tmp_path, "train", str(auto_config), "--set", "parallel.device_target=Ascend")
    assert (result.returncode, result.stderr.strip().splitlines()) == (2, [
        "error: parallel.device_target Ascend is not available (this MindSpore can load CPU); set "
        "parallel.device_target=auto or CPU, or on an Ascend server, source CANN's set_env.sh before starting"])
    assert list(tmp_path.iterdir()) == []


def test_the_launchers_preflight_resolves_auto_then_checks_what_depends_on_the_device(auto_config, tmp_path):
    refused = vit_dist_in(tmp_path, "preflight", str(auto_config), "--world", "2", "--set",
                          "parallel.mode=semi_auto", "parallel.model_parallel=2")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "error: parallel.mode semi_auto needs parallel.device_target Ascend: MindSpore 2.10 supports "
        "semi-auto-parallel there only, not on CPU; use parallel.mode=data there")
    assert list(tmp_path.iterdir()) == []


def test_more_data_workers_than_cores_is_one_line_before_anything_starts(auto_config, tmp_path):
    import os

    workers = (os.cpu_count() or 1) + 1
    result = vit_dist_in(tmp_path, "train", str(auto_config), "--set", f"data.num_workers={workers}")
    assert (result.returncode, result.stderr.strip().splitlines()[-1]) == (2, (
        f"error: data.num_workers {workers} is more than this machine's {os.cpu_count()} cores; set "
        f"data.num_workers to at most {os.cpu_count()}"))
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
