#!/usr/bin/env bash
# Runs `vit-dist train|eval` on N ranks through OpenMPI's mpirun (install with: launch/install.sh mpi).
#
#   launch/mpirun.sh --ranks N [--hostfile F --master-addr A] [--failure-timeout S] [--max-restarts K]
#                    [--hang-timeout S] [--grace-period S] [train|eval] CONFIG [--ckpt C] [--set k=v ...]
#
# N is the world size; mpirun places the ranks (on the hosts of F, if given). Each rank learns its
# place from mpirun; rank 0 starts MindSpore's scheduler on A (127.0.0.1 unless F lists other hosts:
# then rank 0's address, which all ranks reach) and every rank joins it. Across hosts,
# train.output_dir and the Python environment must be on paths every host shares.
# --max-restarts, --hang-timeout and --grace-period are as for launch/msrun.sh (see its --help).
# User errors exit with status 2, a failed job with mpirun's, a stop on TERM or INT with 143 or 130, a
# hung one with 124.
# As root, OpenMPI wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ranks=""
hostfile=""
add_scheduler_options
OPTIONS+=([--ranks]=ranks [--hostfile]=hostfile)
NUMBERS+=([--ranks]=1)
rank_count_hint="use --ranks N (mpirun.sh starts N ranks in all, placed by mpirun)"
parse_command_line "$@"
[[ -n $ranks ]] || fail "--ranks N is required: the ranks mpirun starts in all"
put_python_first_on_path
command -v mpirun >/dev/null ||
    fail "mpirun not found beside $PYTHON or on PATH; install OpenMPI and mpi4py with: bash launch/install.sh mpi"
# OpenMPI refuses root in a screenful; the two variables are the user's decision, so they are named, not set.
if ((EUID == 0)) && [[ ${OMPI_ALLOW_RUN_AS_ROOT:-} != 1 || ${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM:-} != 1 ]]; then
    fail "OpenMPI refuses to run as root: run as another user, or allow it with" \
        "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 $0 ..."
fi
preflight "$ranks" 1
print_summary mpirun "$ranks" "${hostfile:+hosts of $hostfile, as mpirun places the ranks}${hostfile:-this host}" \
    scheduler "$master_addr, on a free port rank 0 picks"

# Read by every rank (runtime.join_mpi_job) and by the scheduler rank 0 starts; -x carries them to other hosts.
export VIT_DIST_MASTER_ADDR=$master_addr
mpirun_args=(-n "$ranks" -x VIT_DIST_MASTER_ADDR
    # MindSpore sizes each rank's kernel thread pool itself (runtime.cpu_threads); OpenMPI's default
    # binding of up to 2 ranks to one core each would squeeze those threads onto that core.
    --bind-to none)
if [[ -n $failure_timeout ]]; then
    export MS_NODE_TIMEOUT=$failure_timeout
    mpirun_args+=(-x MS_NODE_TIMEOUT)
fi
if [[ -n $hostfile ]]; then
    mpirun_args+=(--hostfile "$hostfile")
fi
transcript="$log_dir/mpirun.log"

start_attempt() {
    start_logged_job "$transcript" mpirun "${mpirun_args[@]}" -x "$JOB_VAR" \
        bash "$ROOT/launch/mpi_rank.sh" "$log_dir" "$PYTHON" "${worker_cmd[@]}"
}

# mpirun names the first failed rank: "process rank R with PID ..." (killed by a signal), or
# "Process name: [...,R]" before its exit code.
attempt_over() {
    logged_job_over || return 1
    failed_rank=$(sed -n -E -e 's/.*process rank ([0-9]+) with PID.*/\1/p' -e 's/^ *Process name: .*,([0-9]+)\]$/\1/p' \
        "$transcript" | head -n 1)
    failure="failed (mpirun's message above says how)"
    worker_status=$job_status
}

run_job
