"""The launchers with real ranks: mpirun and multi-node msrun train like single-node msrun, and a
job that loses a worker ends promptly, says which rank, and leaves no process behind."""
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import (MPI_AS_ROOT, ROOT, last_checkpoint, load_params, mpirun, msrun, ok, tiny_config, tool_env,
                      worst_relative_difference, write_image_folder)
from vit_dist.bootstrap import Placement, detect_placement


EXACT = {"data": {"augment": False, "shuffle": False}}
# Short enough to keep the failure tests quick, long enough that MindSpore's own default (30 s)
# would break the msrun bound below.
FAILURE_TIMEOUT = 15
LAUNCHERS = {"msrun": ROOT / "launch" / "msrun.sh", "mpirun": ROOT / "launch" / "mpirun.sh"}
# Two ranks in all on one host: msrun counts ranks per node, mpirun in all.
TWO_RANKS = {"msrun": ["--ranks-per-node", "2"], "mpirun": ["--ranks", "2"]}


def test_mpirun_placement_comes_from_open_mpi():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert detect_placement(env) == Placement("mpirun", 3, 4, 1, 2)


@pytest.fixture(scope="module")
def exact_config(tiny_data, tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("launch") / "exact.yaml", tiny_data, **EXACT)


@pytest.fixture(scope="module")
def msrun_params(exact_config):
    """What the other launchers must reproduce: 2 ranks on one node under msrun."""
    run_dir = exact_config.parent / "msrun"
    ok(msrun("--ranks-per-node", "2", str(exact_config), "--set", f"train.output_dir={run_dir}"))
    return load_params(last_checkpoint(run_dir))


def _assert_same_training(run_dir: Path, expected: dict) -> None:
    assert last_checkpoint(run_dir).name == "step_00000006.safetensors"
    worst = worst_relative_difference(load_params(last_checkpoint(run_dir)), expected)
    assert worst[0] < 1e-5, worst


def test_mpirun_trains_like_msrun_and_ends_promptly(exact_config, msrun_params):
    run_dir = exact_config.parent / "mpirun"
    result = ok(mpirun("--ranks", "2", str(exact_config), "--set", f"train.output_dir={run_dir}"))
    ended = time.time()
    _assert_same_training(run_dir, msrun_params)
    for line in ("launcher        mpirun", "world size      2", "nodes           this host",
                 "device target   CPU, communication MCCL", f"run directory   {run_dir}"):
        assert line in result.stdout
    assert "step 6/6" in result.stdout  # rank 0 on the console
    assert {p.name for p in (run_dir / "logs").iterdir()} >= {"worker_0.log", "worker_1.log"}
    # Rank 0 waits for the scheduler only after leaving the cluster; in the other order it waited for
    # itself until the node timeout (30 s) and then killed the scheduler under the other ranks.
    assert ended - (run_dir / "eval.json").stat().st_mtime < 20


def test_two_msrun_nodes_train_like_one(exact_config, msrun_params):
    run_dir = exact_config.parent / "two_nodes"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    nodes = [["bash", str(LAUNCHERS["msrun"]), "--ranks-per-node", "1", "--nodes", "2", "--node-rank", str(node),
              "--master-addr", "127.0.0.1", "--master-port", port, str(exact_config),
              "--set", f"train.output_dir={run_dir}"] for node in (0, 1)]
    with _job(nodes[0], run_dir.parent / "node0") as node0, _job(nodes[1], run_dir.parent / "node1") as node1:
        statuses = [node0.wait(timeout=300), node1.wait(timeout=300)]
    assert statuses == [0, 0], [_read(run_dir.parent / f"node{n}.err")[-3000:] for n in (0, 1)]
    _assert_same_training(run_dir, msrun_params)


def test_nodes_must_share_a_named_run_directory(exact_config):
    result = msrun("--ranks-per-node", "1", "--nodes", "2", "--node-rank", "0", "--master-port", "8118",
                   str(exact_config))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: a job across 2 nodes needs train.output_dir")


@pytest.mark.parametrize("launcher, victim, bound", [
    ("msrun", 1, FAILURE_TIMEOUT + 12),  # msrun stops the other workers, its scheduler waits out the timeout
    ("mpirun", 0, 10),  # mpirun stops every rank at once; rank 0's scheduler dies with it
])
def test_a_killed_worker_ends_the_job(tiny_data, tmp_path, launcher, victim, bound):
    def kill_victim(run_dir: Path) -> None:
        os.kill(worker_pid(run_dir, victim), signal.SIGKILL)

    rank, log = _failing_job(tmp_path, _long_config(tmp_path, tiny_data), launcher, kill_victim, bound)
    assert rank == victim
    assert not (tmp_path / "run" / "logs" / "restarts.log").exists()  # --max-restarts 0: no restart
    last_line = [line for line in _read(log).splitlines() if not line.startswith(("[INFO]", "[WARNING]"))][-1]
    assert _read(tmp_path / "launcher.err").rstrip().endswith(last_line.rstrip())


def test_a_raising_worker_ends_the_mpirun_job(tmp_path):
    """One unreadable image, in rank 0's shard: rank 0 raises in its data pipeline while rank 1 waits in
    a collective. Rank 0 must neither wait for its scheduler, which waits for rank 0 to leave the cluster,
    nor block in MPI_Finalize, which waits for rank 1."""
    classes = ("digit0", "digit1", "digit7")
    data_root = write_image_folder(tmp_path / "data", {"train": {c: 16 for c in classes},
                                                       "val": {c: 3 for c in classes}})
    config = _long_config(tmp_path, data_root, shuffle=False)  # the 48 images in order: rank 0 reads #20

    def corrupt_an_image(_run_dir: Path) -> None:
        (data_root / "train" / "digit1" / "train_004.png").unlink()  # a decode failure is replaced, a read is not

    rank, log = _failing_job(tmp_path, config, "mpirun", corrupt_an_image, 15)
    assert rank == 0 and "Failed to open file" in _read(log)


def worker_pid(run_dir: Path, rank: int) -> int:
    """The pid of the worker of that rank: RUN_DIR/logs/pids/<pid> holds "RANK JOB"."""
    pids = run_dir / "logs" / "pids"
    return next(int(f.name) for f in pids.iterdir() if f.name.isdigit() and f.read_text().split()[0] == str(rank))


def _long_config(tmp_path: Path, data_root: Path, **data) -> Path:
    return tiny_config(tmp_path / "long.yaml", data_root, data=data,
                       train={"epochs": 1000, "max_steps": 3000, "log_interval": 1})


def _failing_job(tmp_path: Path, config: Path, launcher: str, fail, bound: float) -> tuple[int, Path]:
    """Starts a long 2-rank job, calls fail(run_dir) once rank 0 logged step 3, and checks that the launcher
    then exits non-zero within `bound` seconds, reports a rank and the end of its log, and that no process
    of the job remains. Returns the reported rank and its log."""
    run_dir = tmp_path / "run"
    cmd = ["bash", str(LAUNCHERS[launcher]), *TWO_RANKS[launcher], "--failure-timeout", str(FAILURE_TIMEOUT),
           str(config), "--set", f"train.output_dir={run_dir}"]
    with _job(cmd, tmp_path / "launcher") as job:
        _wait_for(lambda: "step 3/" in _read(run_dir / "logs" / "worker_0.log"), job)
        fail(run_dir)
        failed = time.monotonic()
        status = job.wait(timeout=120)
        elapsed = time.monotonic() - failed
        leftovers = _tagged_processes(job.tag)
    stderr = _read(tmp_path / "launcher.err")
    assert status != 0
    assert elapsed < min(bound, 60), (elapsed, stderr[-3000:])
    assert leftovers == []
    match = re.search(r"^error: rank (\d+) .*; last lines of (\S+):$", stderr, re.MULTILINE)
    assert match, stderr[-3000:]
    return int(match[1]), Path(match[2])


@contextmanager
def _job(cmd: list, output: Path):
    """Runs cmd in its own session, output to OUTPUT.out/.err, every process it starts tagged (`.tag`) through
    the environment (msrun's workers leave the session); on the way out, whatever carries the tag is killed."""
    tag = uuid.uuid4().hex
    with open(f"{output}.out", "w") as out, open(f"{output}.err", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=tool_env(VIT_DIST_TEST_TAG=tag, **MPI_AS_ROOT), stdout=out,
                                stderr=err, start_new_session=True)
    proc.tag = tag
    try:
        yield proc
    finally:
        for pid in _tagged_processes(tag):  # the launcher too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def _wait_for(condition, job: subprocess.Popen, timeout: float = 240, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, f"the job ended early with status {job.returncode}"
        assert time.monotonic() < deadline, "timed out waiting for training steps"
        time.sleep(poll)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _tagged_processes(tag: str) -> list[int]:
    """Every process that inherited the test's tag: launcher, workers, schedulers, whatever they started."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"VIT_DIST_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return found
