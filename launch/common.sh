# Sourced by launch/msrun.sh, launch/mpirun.sh and launch/rank_table.sh: what every launcher does around
# its own start of the workers. The command line, the pre-flight check, the one-screen summary, the run,
# the failure report.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
master_addr=127.0.0.1
# Seconds a worker may go unheard before MindSpore's scheduler ends the job, given to MindSpore as
# MS_NODE_TIMEOUT. Unset, MindSpore's defaults hold: 30 s, and 200 s for the start-up queries the
# same variable bounds (large Ascend clusters need those).
failure_timeout=${VIT_DIST_FAILURE_TIMEOUT:-}
declare -A BACKENDS=([Ascend]=HCCL [GPU]=NCCL [CPU]=MCCL)
device_target=""  # the config's, as pre-flight reads it
# Launcher option -> the variable its value goes to; each launcher adds its own.
declare -A OPTIONS=()
# Launcher switch (no value) -> the variable set to 1 when it is given.
declare -A SWITCHES=()
# Numeric option -> its minimum, 0 or 1. Its value is checked as it is read (store_number), before
# any use: bash arithmetic evaluates a value such as 'a[$(cmd)]', and so would run cmd.
declare -A NUMBERS=()
# Variables of the arguments a launcher takes between its options and the job (rank_table.sh: the table).
LEADING=()
# What the refusal of -n/--np/--nproc, which meant ranks per node to one launcher and all ranks to
# another, tells this launcher's user to write instead.
rank_count_hint=""

# One line on stderr, exit status 2: what every user error ends with.
fail() {
    echo "error: $*" >&2
    exit 2
}

# The launcher's header comment is its usage message.
usage() {
    sed -n '2,/^[^#]/ s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

# The options of the launchers whose workers meet at MindSpore's scheduler (msrun.sh, mpirun.sh).
add_scheduler_options() {
    OPTIONS+=([--master-addr]=master_addr [--failure-timeout]=failure_timeout)
    NUMBERS+=([--failure-timeout]=1)
    if [[ -n $failure_timeout ]]; then
        store_number VIT_DIST_FAILURE_TIMEOUT "$failure_timeout" failure_timeout 1
    fi
}

# OPTIONS, LEADING, then the job: [train|eval|bench] CONFIG [--ckpt C] [--set k=v ...]
#   -> the options' variables, the LEADING variables, subcommand, config, worker_args
parse_command_line() {
    while [[ $# -gt 0 && $1 == -* ]]; do
        if [[ $1 == -h || $1 == --help ]]; then
            usage
        elif [[ -n ${SWITCHES[$1]:-} ]]; then
            printf -v "${SWITCHES[$1]}" 1
            shift
        else
            refuse_unless_option "$1"
            [[ $# -ge 2 ]] || fail "$1 needs a value"
            store_option "$1" "$2"
            shift 2
        fi
    done
    local name
    for name in ${LEADING[@]+"${LEADING[@]}"}; do
        [[ $# -ge 1 ]] || usage
        printf -v "$name" '%s' "$1"
        shift
    done
    subcommand=train
    if [[ ${1:-} == train || ${1:-} == eval || ${1:-} == bench ]]; then
        subcommand=$1
        shift
    fi
    [[ $# -ge 1 ]] || usage
    config=$1
    shift
    worker_args=("$@")
    refuse_late_options
}

# $1 is no option of this launcher: one line saying what to write instead.
refuse_unless_option() {
    if [[ -n ${OPTIONS[$1]:-} ]]; then
        return
    fi
    case $1 in
        -n | --np | --nproc) fail "$1 is ambiguous; $rank_count_hint" ;;
        *) fail "unknown option $1; see $0 --help" ;;
    esac
}

# Option $1's value $2 into its variable; a number checked first.
store_option() {
    if [[ -n ${NUMBERS[$1]:-} ]]; then
        store_number "$1" "$2" "${OPTIONS[$1]}" "${NUMBERS[$1]}"
    else
        printf -v "${OPTIONS[$1]}" '%s' "$2"
    fi
}

# $2, the value of $1, into variable $3 if it matches ^[0-9]+$ and is at least $4 (0 or 1), with at
# most 9 digits so that no arithmetic overflows; as plain decimal, since bash would read 010 as octal.
store_number() {
    if [[ ! $2 =~ ^[0-9]{1,9}$ ]] || [[ $4 == 1 && $2 =~ ^0+$ ]]; then
        fail "$1 needs a whole number >= $4, got '$2'"
    fi
    printf -v "$3" '%d' "$((10#$2))"
}

# A launcher option after CONFIG would reach the worker (and a --dry-run there would start the job).
refuse_late_options() {
    local arg
    for arg in ${worker_args[@]+"${worker_args[@]}"}; do
        if [[ $arg == -* && (-n ${OPTIONS[$arg]:-} || -n ${SWITCHES[$arg]:-}) ]]; then
            fail "$arg is a launcher option: put it before ${LEADING[*]:+${LEADING[*]^^} and }CONFIG"
        fi
    done
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

# One "  name  value" line of the summary.
summary_line() {
    printf '  %-15s %s\n' "$1" "$2"
}

# The one screen before anything starts: $1 launcher, $2 world size, $3 nodes, then the launcher's own
# lines as name-value pairs.
print_summary() {
    local target="not checked in a dry run"
    if [[ -n $device_target ]]; then
        target="$device_target, communication ${BACKENDS[$device_target]}"
    fi
    echo "vit-dist $subcommand"
    summary_line launcher "$1"
    summary_line "world size" "$2"
    summary_line nodes "$3"
    shift 3
    while [[ $# -ge 2 ]]; do
        summary_line "$1" "$2"
        shift 2
    done
    summary_line "device target" "$target"
    summary_line config "$config ${worker_args[*]:-}"
    summary_line "run directory" "$run_dir"
    summary_line logs "$log_dir/worker_<rank>.log"
    if [[ -n ${OPTIONS[--failure-timeout]:-} ]]; then
        print_failure_timeout
    fi
}

print_failure_timeout() {
    local timeout="$failure_timeout s"
    if [[ -z $failure_timeout ]]; then
        timeout="30 s (MindSpore's default)"
    fi
    summary_line "failure timeout" "$timeout: a worker silent this long ends the job"
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
