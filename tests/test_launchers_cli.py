"""The three launchers' command lines, which end before any process starts: one meaning for the rank
counts, numbers checked before bash computes with them, one line with exit status 2 for every user
error, and for what stops mpirun.sh before mpirun would (no mpirun, root without OpenMPI's consent)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import MPI_AS_ROOT, PYTHON, ROOT, run, tool_env

LAUNCH = ROOT / "launch"
TABLE = str(ROOT / "rank_tables" / "rank_table_1server_8dev.json")
# What each launcher needs besides the option under test to get past its command line.
REST = {"msrun.sh": ["--ranks-per-node", "1", "cfg.yaml"], "mpirun.sh": ["--ranks", "1", "cfg.yaml"],
        "rank_table.sh": ["--dry-run", TABLE, "cfg.yaml"]}
HINTS = {"msrun.sh": "use --ranks-per-node N (msrun.sh starts N ranks on each of the --nodes M nodes)",
         "mpirun.sh": "use --ranks N (mpirun.sh starts N ranks in all, placed by mpirun)",
         "rank_table.sh": "rank_table.sh takes the rank counts from RANK_TABLE"}
# Every numeric option, and its minimum.
NUMBERS = [("msrun.sh", "--ranks-per-node", 1), ("msrun.sh", "--nodes", 1), ("msrun.sh", "--node-rank", 0),
           ("msrun.sh", "--master-port", 1), ("msrun.sh", "--failure-timeout", 1), ("mpirun.sh", "--ranks", 1),
           ("mpirun.sh", "--failure-timeout", 1), ("rank_table.sh", "--server-index", 0)] + [
    (launcher, flag, minimum) for launcher in ("msrun.sh", "mpirun.sh", "rank_table.sh")
    for flag, minimum in (("--max-restarts", 0), ("--hang-timeout", 0), ("--grace-period", 1))]


def launch(launcher: str, *args: str) -> subprocess.CompletedProcess:
    return run(["bash", str(LAUNCH / launcher), *args], timeout=60, env=tool_env(PYTHONPATH=str(ROOT)))


def assert_refused(result: subprocess.CompletedProcess, line: str) -> None:
    assert (result.returncode, result.stderr.splitlines(), result.stdout) == (2, [line], "")


def injection(marker: Path) -> str:
    """A value that bash arithmetic would evaluate, running `touch marker`."""
    return f"a[$(touch {marker})]"


def test_the_injection_value_runs_its_command_in_bash_arithmetic(tmp_path):
    """What the launchers must never do with a value: evaluate it as a number."""
    marker = tmp_path / "ran"
    subprocess.run(["bash", "-c", 'value=$1; [[ $value -gt 1 ]]', "_", injection(marker)])
    assert marker.exists()


@pytest.mark.parametrize("launcher", HINTS)
@pytest.mark.parametrize("flag", ["-n", "--np", "--nproc"])
def test_the_ambiguous_rank_count_is_refused(launcher, flag, tmp_path):
    marker = tmp_path / "ran"
    result = launch(launcher, flag, injection(marker), *REST[launcher])
    assert_refused(result, f"error: {flag} is ambiguous; {HINTS[launcher]}")
    assert not marker.exists()


@pytest.mark.parametrize("launcher, flag, minimum", NUMBERS)
def test_a_number_that_is_none_runs_nothing(launcher, flag, minimum, tmp_path):
    marker = tmp_path / "ran"
    value = injection(marker)
    result = launch(launcher, flag, value, *REST[launcher])
    assert_refused(result, f"error: {flag} needs a whole number >= {minimum}, got '{value}'")
    assert not marker.exists()


@pytest.mark.parametrize("value", ["", "x", "-1", "1.5", " 2", "2 ", "0x10", "1e3", "+3", "1234567890"])
def test_only_plain_whole_numbers_are_numbers(value):
    result = launch("msrun.sh", "--nodes", value, *REST["msrun.sh"])
    assert_refused(result, f"error: --nodes needs a whole number >= 1, got '{value}'")


@pytest.mark.parametrize("launcher, flag", [(launcher, flag) for launcher, flag, minimum in NUMBERS if minimum == 1])
def test_a_count_is_at_least_one(launcher, flag):
    assert_refused(launch(launcher, flag, "00", *REST[launcher]), f"error: {flag} needs a whole number >= 1, got '00'")


def test_the_failure_timeout_from_the_environment_is_checked_too(tmp_path):
    marker = tmp_path / "ran"
    value = injection(marker)
    result = run(["bash", str(LAUNCH / "mpirun.sh"), *REST["mpirun.sh"]], timeout=60,
                 env=tool_env(VIT_DIST_FAILURE_TIMEOUT=value))
    assert_refused(result, f"error: VIT_DIST_FAILURE_TIMEOUT needs a whole number >= 1, got '{value}'")
    assert not marker.exists()


def test_a_number_is_read_as_decimal():
    """08 is no octal number: bash arithmetic would refuse it."""
    result = launch("rank_table.sh", "--server-index", "00", "--dry-run", TABLE, "cfg.yaml")
    assert result.returncode == 0, result.stderr
    assert "  nodes           1; this is server 0 (192.98.92.100)" in result.stdout
    result = launch("msrun.sh", "--ranks-per-node", "1", "--nodes", "08", "--node-rank", "09", "cfg.yaml")
    assert_refused(result, "error: --node-rank 9 is out of range: --nodes 8 numbers the nodes 0 to 7")


@pytest.mark.parametrize("launcher, missing", [("msrun.sh", "--ranks-per-node N is required: the ranks msrun starts "
                                                            "on each node"),
                                               ("mpirun.sh", "--ranks N is required: the ranks mpirun starts in all")])
def test_the_rank_count_is_required(launcher, missing):
    assert_refused(launch(launcher, "cfg.yaml"), f"error: {missing}")


@pytest.mark.parametrize("launcher", HINTS)
def test_an_unknown_option_is_refused(launcher, tmp_path):
    marker = tmp_path / "ran"
    option = f"--x{injection(marker)}"
    result = launch(launcher, option, "1", *REST[launcher])
    assert_refused(result, f"error: unknown option {option}; see {LAUNCH / launcher} --help")
    assert not marker.exists()


@pytest.mark.parametrize("launcher, args, option, where", [
    ("msrun.sh", ["--ranks-per-node", "1", "train", "cfg.yaml", "--nodes", "2"], "--nodes", "CONFIG"),
    ("rank_table.sh", [TABLE, "cfg.yaml", "--dry-run"], "--dry-run", "RANK_TABLE and CONFIG"),  # the old order
])
def test_a_launcher_option_after_the_config_is_refused(launcher, args, option, where):
    assert_refused(launch(launcher, *args), f"error: {option} is a launcher option: put it before {where}")


@pytest.mark.parametrize("launcher", HINTS)
def test_the_usage_is_the_header_and_exits_2(launcher):
    result = launch(launcher, "--help")
    assert result.returncode == 2
    assert f"launch/{launcher} " in result.stderr and not result.stderr.startswith("#")


def test_mpirun_sh_without_mpirun_names_the_install(tmp_path):
    """A Python whose environment has no mpirun (no mpi extra) and none on PATH: one line, not bash's 127."""
    if shutil.which("mpirun", path="/usr/bin:/bin"):
        pytest.skip("this machine has a system mpirun")
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.symlink_to(PYTHON)
    result = run(["bash", str(LAUNCH / "mpirun.sh"), *REST["mpirun.sh"]], timeout=60,
                 env=dict(tool_env(), PYTHON=str(python), PATH="/usr/bin:/bin"))
    assert_refused(result, f"error: mpirun not found beside {python} or on PATH; install OpenMPI and mpi4py with: "
                           "bash launch/install.sh mpi")


@pytest.mark.skipif(os.geteuid() != 0, reason="OpenMPI's refusal concerns root only")
def test_mpirun_sh_as_root_names_the_two_variables_before_starting_mpirun():
    env = tool_env()
    for name in MPI_AS_ROOT:
        env.pop(name, None)
    result = run(["bash", str(LAUNCH / "mpirun.sh"), *REST["mpirun.sh"]], timeout=60, env=env)
    assert_refused(result, "error: OpenMPI refuses to run as root: run as another user, or allow it with "
                           f"OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 {LAUNCH / 'mpirun.sh'} ...")
