"""The bootstrap layer: the process's place in the job, read from the environment once (under a rank
table, checked against the table and completed from it); the device
(parallel.device_target auto resolved); the mpirun bootstrap of MindSpore's cluster; the scheduler
role; the backend brought up; rank 0's run directory shared with ranks started without one.

This is the only module that reads launcher environment variables. Everything below it receives
a `Placement`. It imports MindSpore only inside functions: to ask which devices it can load (never
in an mpirun rank before its join), and in init_backend, after the mpirun bootstrap.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from vit_dist.host.atomic import write_atomic
from vit_dist.host.config import AUTO_DEVICE, DEVICES
from vit_dist.host.errors import ConfigError
from vit_dist.host.placement import Placement
from vit_dist.host.rank_table import RankTable, RankTableError, Server, load_rank_table
from vit_dist.host.run_record import PIDS_DIR

COMM_BACKENDS = {"Ascend": "hccl", "GPU": "nccl", "CPU": "mccl"}
# Under mpirun: the address rank 0 starts MindSpore's scheduler on (launch/mpirun.sh --master-addr).
MASTER_ADDR = "VIT_DIST_MASTER_ADDR"
# In the scheduler rank 0 starts: rank 0's pid, which the scheduler must not outlive.
SCHEDULER_PARENT = "VIT_DIST_SCHEDULER_PARENT"
# Set by launch/msrun.sh on each node's launcher.
NODE_RANK = "VIT_DIST_NODE_RANK"
# The launcher's id of this attempt of the job, in the pid file and heartbeat of each of its workers:
# what the launcher signals and watches is this attempt's, on this node (host.heartbeat).
LAUNCH_JOB = "VIT_DIST_JOB"
# Seconds MindSpore's scheduler waits on a silent worker (launch/*.sh --failure-timeout; MindSpore's default is 30).
NODE_TIMEOUT = "MS_NODE_TIMEOUT"
# Set by MindSpore's msrun --sim_level (DryRun): this one process compiles as rank RANK_ID of RANK_SIZE,
# the devices mocked.
SIMULATION_LEVEL = "MS_SIMULATION_LEVEL"
# What OpenMPI gives each process it starts; the scheduler is none of them.
MPI_ENV_PREFIXES = ("OMPI_", "PMIX_", "PRTE_")
# Either names the HCCL rank table of a rank-table start (MindSpore reads both; launch/rank_table.sh sets both).
RANK_TABLE_VARS = ("RANK_TABLE_FILE", "MINDSPORE_HCCL_CONFIG_PATH")
# What a launcher gives the processes it starts, besides OpenMPI's (MPI_ENV_PREFIXES): MindSpore's
# dynamic cluster (msrun, DryRun) and vit-dist's launchers. A process started by another launcher inside
# such a job must not inherit them: detect_placement would take that job's path and wait for its peers.
LAUNCHER_VARS = ("MS_ROLE", "MS_SCHED_HOST", "MS_SCHED_PORT", "MS_WORKER_NUM", "MS_NODE_ID", SIMULATION_LEVEL,
                 NODE_RANK, MASTER_ADDR, SCHEDULER_PARENT, LAUNCH_JOB)
# A rank-table start's placement (launch/rank_table.sh sets it for each worker).
RANK_TABLE_PLACEMENT = (*RANK_TABLE_VARS, "RANK_ID", "RANK_SIZE")


def announce_worker(run_dir, placement: Placement) -> None:
    """Writes RUN_DIR/logs/pids/<this pid> = "rank job" (under msrun across nodes the rank is provisional):
    a launcher told only the pid of a dead worker (msrun) finds its rank there, and a launcher passing
    on a signal finds its workers."""
    folder = Path(run_dir).joinpath(*PIDS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / str(os.getpid()), f"{placement.rank} {placement.job}\n")


def user_cache_dir(env: Mapping[str, str]) -> Path:
    """$XDG_CACHE_HOME/vit-dist, else ~/.cache/vit-dist: the per-user cache (the image check's answers)."""
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit-dist"


def is_scheduler(env: Mapping[str, str]) -> bool:
    """msrun starts the worker script as the cluster's scheduler process too; under mpirun rank 0 does."""
    return env.get("MS_ROLE") == "MS_SCHED"


def serve_scheduler(env: Mapping[str, str]) -> None:
    """The scheduler's part of init(): it brokers the cluster until the workers are done."""
    if env.get(NODE_RANK, "0") != "0":
        # msrun starts a scheduler on every node whose address is the master address: with several
        # nodes' launchers on one host, only node 0's may serve (the others could not bind its port).
        return
    if SCHEDULER_PARENT in env:
        _exit_with_parent(int(env[SCHEDULER_PARENT]))
    from mindspore.communication import init

    init()


def _exit_with_parent(parent: int) -> None:
    """A killed rank 0 runs no exit handler: have the kernel kill its scheduler with it (Linux)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # rank 0 died before the request was made
        sys.exit(1)


def detect_placement(env: Mapping[str, str]) -> Placement:
    """Which launcher started this process and where the process sits, with the launcher's id of this
    attempt of the job. Under msrun across nodes the rank may only be known after init(), so `rank`
    here is provisional there."""
    return replace(_placement(env), job=env.get(LAUNCH_JOB, ""))


def _placement(env: Mapping[str, str]) -> Placement:
    if env.get(SIMULATION_LEVEL):  # before msrun's: a DryRun worker has msrun's MS_WORKER_NUM but no MS_ROLE
        return Placement(launcher="dryrun", rank=_env_int(env, "RANK_ID"), world_size=_env_int(env, "RANK_SIZE"),
                         local_rank=0, local_world_size=1)
    if env.get("MS_ROLE") == "MS_WORKER":  # msrun (or any MindSpore dynamic-cluster bootstrap)
        world = int(env["MS_WORKER_NUM"])
        local_rank = int(env.get("DEVICE_ID", "0"))
        return Placement(launcher="msrun", rank=int(env.get("RANK_ID", local_rank)), world_size=world,
                         local_rank=local_rank, local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)))
    if "OMPI_COMM_WORLD_SIZE" in env:  # OpenMPI's mpirun
        return Placement(launcher="mpirun", rank=int(env["OMPI_COMM_WORLD_RANK"]),
                         world_size=int(env["OMPI_COMM_WORLD_SIZE"]),
                         local_rank=int(env["OMPI_COMM_WORLD_LOCAL_RANK"]),
                         local_world_size=int(env["OMPI_COMM_WORLD_LOCAL_SIZE"]))
    table_path = next((env[name] for name in RANK_TABLE_VARS if env.get(name)), None)
    if table_path is not None:
        return _rank_table_placement(table_path, env)
    return Placement.single()


def _rank_table_placement(path: str, env: Mapping[str, str]) -> Placement:
    """A process of a rank-table start (launch/rank_table.sh or a user's own script): the world size is the
    table's (RANK_SIZE, if set, must agree), RANK_ID may be left out where DEVICE_ID names one device of
    the table, DEVICE_ID where RANK_ID is given (the table's device of that rank). Each contradiction or
    gap is one ConfigError."""
    table = _read_rank_table(path)
    world = table.rank_size
    if "RANK_SIZE" in env and _env_int(env, "RANK_SIZE") != world:
        raise ConfigError(f"RANK_SIZE={env['RANK_SIZE']} but rank table {path} has {world} device(s); "
                          f"set RANK_SIZE={world} or unset it")
    device = _env_int(env, "DEVICE_ID") if "DEVICE_ID" in env else None
    rank = _env_int(env, "RANK_ID") if "RANK_ID" in env else _rank_of_device(table, device, path)
    if rank >= world:
        raise ConfigError(f"RANK_ID={rank} is not a rank of rank table {path} (ranks 0-{world - 1}); set RANK_ID "
                          "to this process's rank_id in the table")
    server = table.server_of_rank(rank)
    if device is None:
        device = next(d.device_id for d in server.devices if d.rank_id == rank)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else len(server.devices)
    return Placement(launcher="rank_table", rank=rank, world_size=world, local_rank=device,
                     local_world_size=local_world)


def _read_rank_table(path: str) -> RankTable:
    try:
        return load_rank_table(path)
    except RankTableError as err:
        more = f" (and {len(err.problems) - 1} more problem(s))" if len(err.problems) > 1 else ""
        raise ConfigError(f"rank table {err.problems[0]}{more}; check it with vit-dist rank-table validate "
                          f"{path}") from None


def _rank_of_device(table: RankTable, device: int | None, path: str) -> int:
    """The rank of this process's device when only one server of the table lists it."""
    if device is None:
        raise ConfigError(f"rank table {path} is set but neither RANK_ID nor DEVICE_ID is: set RANK_ID to this "
                          "process's rank_id in the table, and DEVICE_ID to its device")
    servers: list[Server] = table.servers_with_device(device)
    if len(servers) != 1:
        where = "no server" if not servers else f"{len(servers)} servers"
        raise ConfigError(f"DEVICE_ID={device} is on {where} of rank table {path}, so this process's rank is "
                          "unknown; set RANK_ID to its rank_id in the table")
    return next(d.rank_id for d in servers[0].devices if d.device_id == device)


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    if not value.isdigit() or not value.isascii():
        raise ConfigError(f"{name}={value!r} is not a whole number; set it to one, or unset it")
    return int(value)


def _export_rank_table_placement(placement: Placement) -> None:
    """MindSpore's HCCL start reads RANK_ID, RANK_SIZE and DEVICE_ID itself: give it the values detected
    (the same where they were set, derived from the table where they were not)."""
    os.environ.update(RANK_ID=str(placement.rank), RANK_SIZE=str(placement.world_size),
                      DEVICE_ID=str(placement.local_rank))


def join_mpi_job(placement: Placement, env: Mapping[str, str]) -> None:
    """mpirun starts the workers but no MindSpore scheduler, so bring up the dynamic cluster from MPI:
    rank 0 picks a free port on the master address and starts the scheduler there, a broadcast tells
    every rank where it is, and each rank sets the MS_* variables init() reads. Call it before
    mindspore is imported (see _start_scheduler)."""
    if "mindspore" in sys.modules:
        raise RuntimeError("join_mpi_job must run before mindspore is imported: its exit handler has to run "
                           "after mindspore's, which unregisters this worker from the scheduler")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (placement.rank, placement.world_size):
        raise RuntimeError(f"mpirun started this process as rank {placement.rank} of {placement.world_size} but "
                           f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()}: mpi4py loaded another MPI "
                           "library than the mpirun's (install vit-dist[mpi] and use the mpirun it provides)")
    address = _free_address(env.get(MASTER_ADDR, "127.0.0.1")) if placement.is_main else None
    host, port = comm.bcast(address, root=0)
    # MPI has done its part. Finalizing now also spares a failing rank from blocking at exit in
    # MPI_Finalize, which would wait for the ranks stuck in a MindSpore collective.
    MPI.Finalize()
    cluster = {"MS_WORKER_NUM": str(placement.world_size), "MS_SCHED_HOST": host, "MS_SCHED_PORT": str(port)}
    if placement.is_main:
        _start_scheduler(cluster, float(env.get(NODE_TIMEOUT, "30")))
    os.environ.update(cluster, MS_ROLE="MS_WORKER", MS_NODE_ID=str(placement.rank))


def _free_address(host: str) -> tuple[str, int]:
    """(host, a port free on it now); the scheduler binds that port a moment later."""
    with socket.socket() as probe:
        try:
            probe.bind((host, 0))
        except OSError as err:
            raise RuntimeError(f"rank 0 cannot listen on master address {host} ({err.strerror}); "
                               "give launch/mpirun.sh --master-addr an address of rank 0's host") from None
        return host, probe.getsockname()[1]


def _start_scheduler(cluster: dict, node_timeout: float) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(MPI_ENV_PREFIXES)}
    env.update(cluster, MS_ROLE="MS_SCHED", **{SCHEDULER_PARENT: str(os.getpid())})
    scheduler = subprocess.Popen([sys.executable, "-m", "vit_dist"], env=env, stdin=subprocess.DEVNULL)
    # Exit handlers run last-registered first, and importing mindspore registers the one that
    # unregisters this worker from the scheduler: registered before that import, this one runs after
    # it. (Waiting for the scheduler before unregistering would wait for ourselves.)
    atexit.register(_stop_scheduler, scheduler, node_timeout)


def _stop_scheduler(scheduler: subprocess.Popen, node_timeout: float) -> None:
    """After a clean end the scheduler exits once the last worker has unregistered. After an uncaught
    exception (sys.last_value) MindSpore leaves this worker registered, and the job has failed anyway."""
    if getattr(sys, "last_value", None) is None:
        try:
            scheduler.wait(node_timeout)
        except subprocess.TimeoutExpired:
            pass
    scheduler.kill()
    scheduler.wait()


# What MindSpore needs to load a device's backend, on a server that has the device.
DEVICE_NEEDS = {"Ascend": "on an Ascend server, source CANN's set_env.sh before starting",
                "GPU": "on a GPU server, put the CUDA libraries MindSpore needs on LD_LIBRARY_PATH"}


def resolve_device_target(requested: str, placement: Placement) -> str:
    """The device the run uses: `auto` becomes the first of Ascend, GPU and CPU that this MindSpore can
    load; an explicit target it cannot load is one ConfigError naming those it can. CPU, which every
    MindSpore package has, is taken without asking (asking imports MindSpore: seconds). An mpirun rank
    may import MindSpore only after join_mpi_job, so there an explicit target passes unasked and auto
    is refused (launch/mpirun.sh's pre-flight resolves and checks it for its ranks)."""
    if requested == "CPU":
        return requested
    if placement.launcher == "mpirun" and placement.distributed:
        if requested == AUTO_DEVICE:
            raise ConfigError("parallel.device_target auto cannot be resolved in an mpirun rank before it joins "
                              "the job; start it with launch/mpirun.sh, which resolves it, or name the device "
                              f"with --set parallel.device_target={'|'.join(DEVICES)}")
        return requested
    available = available_devices()
    if requested == AUTO_DEVICE:
        return available[0]
    if requested not in available:
        choices = [AUTO_DEVICE, *available]
        raise ConfigError(f"parallel.device_target {requested} is not available (this MindSpore can load "
                          f"{', '.join(available)}); set parallel.device_target={', '.join(choices[:-1])} or "
                          f"{choices[-1]}, or {DEVICE_NEEDS[requested]}")
    return requested


def launcher_variables(env: Mapping[str, str] = os.environ, also: tuple[str, ...] = ()) -> list[str]:
    """The names in env that a launcher set (LAUNCHER_VARS, OpenMPI's), and those of `also`: what a
    process started afresh inside another job must not inherit (launch/rank_table.sh removes this
    process's, listed by `vit-dist rank-table local-ranks`)."""
    return sorted(k for k in env if k in LAUNCHER_VARS or k in also or k.startswith(MPI_ENV_PREFIXES))


def dry_run_env(env: Mapping[str, str], device_memory: bool) -> dict[str, str]:
    """The environment of MindSpore's DryRun launcher (tools.dry_run): this Python's folder first on PATH
    (msrun starts `python`), no other launcher's variables, and with device_memory MindSpore's INFO log,
    where its DryRun reports the simulated peak device memory."""
    foreign = launcher_variables(env, also=RANK_TABLE_PLACEMENT)
    clean = {k: v for k, v in env.items() if k not in foreign}
    clean["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), clean.get("PATH", "")])
    if device_memory:
        clean["GLOG_v"] = "1"
    return clean


def available_devices() -> list[str]:
    """The backends this MindSpore package can load, in auto's order (MindSpore's documented
    device_context.<device>.is_available(): the plugin loaded at import, no device initialised)."""
    import mindspore.device_context as devices

    # is_available() logs a warning of several lines for each backend that is missing; the caller says
    # what matters in one line. (vit-dist disables no logging anywhere else.)
    logging.disable(logging.WARNING)
    try:
        return [name for name in DEVICES if getattr(devices, name.lower()).is_available()]
    finally:
        logging.disable(logging.NOTSET)


def rank_0s_run_dir(run_dir: Path, placement: Placement) -> Path:
    """Rank 0's run directory, on every rank, for ranks started without train.output_dir (plain msrun),
    each of which named one of its own before the ranks could talk; call it after init_backend. The
    absolute path travels as bytes, summed over the ranks with only rank 0's non-zero."""
    import numpy as np

    from vit_dist.parallel.data_parallel import all_reduce_sum

    name = os.fsencode(run_dir.resolve()) if placement.is_main else b""
    buffer = np.zeros(os.pathconf("/", "PC_PATH_MAX"), np.float32)  # float32 holds every byte value exactly
    buffer[:len(name)] = np.frombuffer(name, np.uint8)
    total = all_reduce_sum(buffer, placement)
    return Path(os.fsdecode(total.astype(np.uint8).tobytes().rstrip(b"\0")))


def enable_compile_cache(path: str) -> None:
    """MindSpore saves each compiled graph under path (a folder per rank) and a later launch of the
    same code and config loads it instead of compiling. Read when a graph compiles, so it is set in
    the environment, MindSpore 2.10's interface for it (set_context(enable_compile_cache) is deprecated)."""
    os.environ["MS_COMPILER_CACHE_ENABLE"] = "1"
    os.environ["MS_COMPILER_CACHE_PATH"] = os.path.abspath(path)


def init_backend(device_target: str, threads_per_rank: int, placement: Placement,
                 data_parallel: bool = True, compile_cache: str | None = None) -> Placement:
    """Graph mode on the configured device; for a multi-rank job init() the collective backend
    (HCCL/NCCL/MCCL by device) and, if data_parallel, the data-parallel context (semi_auto's
    AutoParallel wrapper sets its own). Returns the placement with the rank the backend assigned."""
    if placement.launcher == "mpirun" and placement.distributed:
        join_mpi_job(placement, os.environ)  # before mindspore is imported
    if placement.launcher == "rank_table":
        _export_rank_table_placement(placement)
    if compile_cache:
        enable_compile_cache(compile_cache)
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    ms.set_context(mode=ms.GRAPH_MODE)
    if device_target == "CPU":
        ms.set_device("CPU")
        from vit_dist.backends.cpu.host import cpu_threads

        ms.device_context.cpu.op_tuning.threads_num(cpu_threads(threads_per_rank, placement.local_world_size))
    else:
        ms.set_device(device_target, placement.local_rank)
    if not placement.distributed and placement.launcher != "msrun":  # msrun's scheduler waits for its one worker too
        return placement
    init()
    placement = replace(placement, rank=get_rank(), world_size=get_group_size())
    if data_parallel:
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                     device_num=placement.world_size)
        if device_target != "CPU":  # per-parameter gradients (Backend.flat_optimizer): fused in 64 MB buckets
            ms.set_auto_parallel_context(comm_fusion={"allreduce": {"mode": "auto", "config": None}})
    return placement
