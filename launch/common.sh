# Sourced by launch/msrun.sh and launch/mpirun.sh: what both launchers do around their own start of
# the workers. The command line, the pre-flight check, the one-screen summary, the run, the failure report.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
master_addr=127.0.0.1
# Seconds a worker may go unheard before MindSpore's scheduler ends the job, given to MindSpore as
# MS_NODE_TIMEOUT. Unset, MindSpore's defaults hold: 30 s, and 200 s for the start-up queries the
# same variable bounds (large Ascend clusters need those).
failure_timeout=${VIT_DIST_FAILURE_TIMEOUT:-}
declare -A BACKENDS=([Ascend]=HCCL [GPU]=NCCL [CPU]=MCCL)
# Launcher option -> the variable its value goes to; each launcher adds its own.
declare -A OPTIONS=([--master-addr]=master_addr [--failure-timeout]=failure_timeout)

# The launcher's header comment is its usage message.
usage() {
    sed -n '2,/^[^#]/ s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

# OPTIONS, then the job: [train|eval|bench] CONFIG [--ckpt C] [--set k=v ...] -> subcommand, config, worker_args
parse_command_line() {
    while [[ $# -gt 0 && -n $1 && -n ${OPTIONS[$1]:-} ]]; do
        [[ $# -ge 2 ]] || usage
        printf -v "${OPTIONS[$1]}" '%s' "$2"
        shift 2
    done
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        usage
    fi
    if [[ -n $failure_timeout && ! $failure_timeout =~ ^[1-9][0-9]*$ ]]; then
        echo "error: the failure timeout is whole seconds, got '$failure_timeout'" >&2
        exit 2
    fi
    subcommand=train
    if [[ ${1:-} == train || ${1:-} == eval || ${1:-} == bench ]]; then
        subcommand=$1
        shift
    fi
    [[ $# -ge 1 ]] || usage
    config=$1
    shift
    worker_args=("$@")
}

# The launchers start `python` and `mpirun` from PATH: make them the ones beside PYTHON (its venv).
put_python_first_on_path() {
    PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
    export PATH
}

# Checks config and data for $1 ranks started by $2 launchers, once, before any process starts (one
# line and exit status 2 on a problem); sets run_dir, device_target and log_dir.
preflight() {
    local checked
    local bench=()
    if [[ $subcommand == bench ]]; then
        bench=(--bench)
    fi
    checked=$("$PYTHON" -m vit_dist preflight "$config" --world "$1" --nodes "$2" ${bench[@]+"${bench[@]}"} \
        ${worker_args[@]+"${worker_args[@]}"})
    run_dir=$(sed -n 1p <<<"$checked")
    device_target=$(sed -n 2p <<<"$checked")
    log_dir="$run_dir/logs"
    mkdir -p "$log_dir"
}

# The one screen before anything starts: $1 launcher, $2 world size, $3 nodes, $4 scheduler.
print_summary() {
    local timeout="$failure_timeout s"
    if [[ -z $failure_timeout ]]; then
        timeout="30 s (MindSpore's default)"
    fi
    cat <<EOF
vit-dist $subcommand
  launcher        $1
  world size      $2
  nodes           $3
  scheduler       $4
  device target   $device_target, communication ${BACKENDS[$device_target]}
  config          $config ${worker_args[*]:-}
  run directory   $run_dir
  logs            $log_dir/worker_<rank>.log
  failure timeout $timeout: a worker silent this long ends the job
EOF
}

# The worker command every launcher starts, writing into the run directory pre-flight resolved.
worker_command() {
    worker_cmd=("$ROOT/launch/worker.py" "$subcommand" "$config" ${worker_args[@]+"${worker_args[@]}"}
        --set "train.output_dir=$run_dir")
}

# MindSpore's INFO/WARNING chatter stays in the log files.
without_chatter() {
    grep --line-buffered -v -E '^\[(INFO|WARNING)\] '
}

# Runs the launcher command $2..., its whole output kept in $1 and shown without chatter; sets job_status.
run_job() {
    local transcript=$1
    shift
    set +e +o pipefail
    "$@" 2>&1 | tee "$transcript" | without_chatter
    job_status=${PIPESTATUS[0]}
    set -e -o pipefail
}

# After a failed job ($1 its status): names the failed rank $2 (empty: not known) and what happened to
# it ($3), and shows the end of its log, chatter removed so that a traceback stays in view.
report_failure() {
    if [[ -z $2 ]]; then
        echo "error: the job failed (status $1); logs in $log_dir" >&2
        return
    fi
    local log="$log_dir/worker_$2.log"
    echo "error: rank $2 $3, so the job was stopped (status $1); last lines of $log:" >&2
    without_chatter <"$log" | tail -n 20 >&2 || true
}
