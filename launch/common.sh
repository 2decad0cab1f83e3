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
device_target=""  # the config's, as pre-flight resolves it (auto: the device MindSpore finds)
# Launcher option -> the variable its value goes to; each launcher adds its own.
declare -A OPTIONS=()
# Launcher switch (no value) -> the variable set to 1 when it is given.
declare -A SWITCHES=()
# Numeric option -> its minimum, 0 or 1. Its value is checked as it is read (store_number), before
# any use: bash arithmetic evaluates a value such as 'a[$(cmd)]', and so would run cmd.
declare -A NUMBERS=()
# Variables of the arguments a launcher takes between its options and the job (rank_table.sh: the table).
LEADING=()
# Auto-restarts after a failed attempt (torchrun's --max-restarts), the hang watchdog's seconds (0: off),
# and the seconds the ranks have to stop and save after a signal before they are killed.
max_restarts=0
hang_timeout=600
grace_period=300
HANG_STATUS=124  # a job stopped by the hang watchdog, as timeout(1) ends
# The attempt's id in the environment of each of its processes and in its workers' pid files and
# heartbeats (vit_dist.bootstrap.LAUNCH_JOB): what this launcher signals, watches and kills.
JOB_VAR=VIT_DIST_JOB
job_id=""
attempt=0
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

OPTIONS+=([--max-restarts]=max_restarts [--hang-timeout]=hang_timeout [--grace-period]=grace_period)
NUMBERS+=([--max-restarts]=0 [--hang-timeout]=0 [--grace-period]=1)

# OPTIONS, LEADING, then the job: [train|eval|bench] CONFIG [--ckpt C] [--set k=v ...]
#   -> the options' variables, the LEADING variables, subcommand, config, worker_args, and launcher_args
#   (all of them, for the resume command)
parse_command_line() {
    launcher_args=("$@")
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
    if ((max_restarts > 0)); then
        summary_line restarts "at most $max_restarts, each from the newest verified checkpoint"
    else
        summary_line restarts "none: a failed job ends"
    fi
    if ((hang_timeout > 0)); then
        summary_line "hang timeout" "$hang_timeout s: a rank without progress this long (after its first step) ends the job"
    else
        summary_line "hang timeout" "off"
    fi
}

print_failure_timeout() {
    local timeout="$failure_timeout s"
    if [[ -z $failure_timeout ]]; then
        timeout="30 s (MindSpore's default)"
    fi
    summary_line "failure timeout" "$timeout: a worker silent this long ends the job"
}

# The worker command every launcher starts, writing into the run directory and on the device pre-flight
# resolved (a dry run resolves no device); a restart resumes from the newest verified checkpoint there,
# if the run has saved one.
worker_command() {
    worker_cmd=("$ROOT/launch/worker.py" "$subcommand" "$config" ${worker_args[@]+"${worker_args[@]}"}
        --set "train.output_dir=$run_dir" ${device_target:+"parallel.device_target=$device_target"})
    if ((attempt > 0)) && compgen -G "$run_dir/checkpoints/step_*.json" >/dev/null; then
        worker_cmd+=(train.resume=auto)
    fi
}

# MindSpore's INFO/WARNING chatter stays in the log files.
without_chatter() {
    grep --line-buffered -v -E '^\[(INFO|WARNING)\] '
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

# Runs the job until it succeeds, fails for good or is stopped by a signal; returns if it succeeded,
# exits with its status otherwise. After a failure that is no user error (status 2), it runs it again,
# resuming, at most max_restarts times. The launcher defines start_attempt (starts this attempt's
# processes in the background, their environment carrying JOB_VAR=job_id, and sets pids to the
# launcher's children among them) and attempt_over (true once
# they ended; sets job_status, and after a failure worker_status, the failed worker's, failed_rank and
# failure: what happened to it); job_workers may set workers to the pids to pass a signal on to.
# While an attempt runs, its poll (run_attempt's loop) waits on no foreground command and runs
# no $(...): bash 5.2 may forget a SIGINT that arrives as it reaps a foreground command, and runs no trap
# for one that arrives during a $(...), so the stop would never come.
run_job() {
    attempt=0
    stop_signal=""
    trap 'request_stop TERM' TERM
    trap 'request_stop INT' INT
    trap kill_job EXIT
    while true; do
        run_attempt
        if [[ -n $stop_signal || -s $log_dir/stopped ]]; then
            exit_stopped
        fi
        if ((job_status == 0)); then
            return 0
        fi
        if [[ -n $hung_rank ]]; then
            report_failure "$job_status" "$hung_rank" "made no progress for more than $hang_timeout s ($hung_what)"
        else
            report_failure "$job_status" "$failed_rank" "$failure"
        fi
        restart_or_exit
    done
}

run_attempt() {
    job_id="$HOSTNAME-$$-$attempt"
    hung_rank=""
    killing=""
    declare -gA signaled=()
    rm -f "$log_dir/stopped"
    worker_command
    start_attempt
    while ! attempt_over; do
        if [[ -n $stop_signal ]]; then
            pass_on_stop
        elif [[ -n $killing ]]; then
            kill_job  # again: a process may have been starting while the last sweep ran
        elif ((hang_timeout > 0)) && find_hung_rank; then
            killing=1
            kill_job
        fi
        # A trapped signal ends the wait and its trap runs at once. The sleep, which may outlive the
        # launcher by a second, keeps no pipe of the caller open.
        sleep 1 >/dev/null 2>&1 &
        wait "$!" || true
    done
    if [[ -n $hung_rank ]]; then
        job_status=$HANG_STATUS worker_status=$HANG_STATUS
    fi
    kill_job  # whatever the attempt left, e.g. msrun's workers once msrun is gone
    wait "${pids[@]}" 2>/dev/null || true  # reaped quietly: bash would report each killed one at exit
}

# The trap of TERM and INT: the workers finish their step and rank 0 saves; a second signal ends the wait.
request_stop() {
    if [[ -n $stop_signal ]]; then
        stop_deadline=0
        return
    fi
    stop_signal=$1
    printf -v stop_deadline '%(%s)T' -1
    stop_deadline=$((stop_deadline + grace_period))
    echo "SIG$1: stopping the workers: each finishes its step, then rank 0 saves a checkpoint (at most $grace_period s)" >&2
}

# Passes the signal on to each worker of the attempt once (a worker may announce itself late), and kills
# the job when the grace period is over. Once only: a worker killed by a repeated signal while it exits
# would make msrun or mpirun kill the others, maybe rank 0 in its save.
pass_on_stop() {
    local now pid
    printf -v now '%(%s)T' -1
    if ((now >= stop_deadline)); then
        [[ -n $killing ]] || echo "error: the workers did not stop within the grace period; killing them" >&2
        killing=1
        kill_job
        return
    fi
    job_workers
    for pid in ${workers[@]+"${workers[@]}"}; do
        if [[ -z ${signaled[$pid]:-} ]]; then
            signaled[$pid]=1
            kill -s "$stop_signal" "$pid" 2>/dev/null || true
        fi
    done
}

# Sets workers to this attempt's workers on this host: the pids whose RUN_DIR/logs/pids/<pid> holds this
# job's id.
job_workers() {
    local file rank job
    workers=()
    for file in "$log_dir"/pids/*; do
        if [[ ${file##*/} =~ ^[0-9]+$ ]] && read -r rank job 2>/dev/null <"$file" && [[ $job == "$job_id" ]]; then
            workers+=("${file##*/}")
        fi
    done
}

# Kills every process of the attempt on this host: whatever carries its id in its environment (msrun's
# workers leave its session, MindSpore's schedulers are started by msrun or a worker).
kill_job() {
    local dir pids=()
    [[ -n $job_id ]] || return 0
    for dir in /proc/[0-9]*; do
        if in_job "${dir#/proc/}"; then
            pids+=("${dir#/proc/}")
        fi
    done
    if ((${#pids[@]} > 0)); then
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
}

# True if process $1 is on this host and one of the attempt's: its environment carries the attempt's id.
in_job() {
    local var
    while IFS= read -r -d '' var; do
        if [[ $var == "$JOB_VAR=$job_id" ]]; then
            return 0
        fi
    done 2>/dev/null <"/proc/$1/environ"
    return 1
}

# True if a rank of the attempt has made no progress for hang_timeout seconds (its heartbeat, see
# vit_dist/host/heartbeat.py); sets hung_rank and hung_what. The ranks waiting for a hung one in a
# collective make no progress either, so the one named is a stopped process (SIGSTOP) if there is one,
# else the rank furthest behind, else the one silent longest.
find_hung_rank() {
    local file job time pid progress what now key best=""
    printf -v now '%(%s)T' -1
    for file in "$log_dir"/heartbeat/*; do
        read -r job time pid progress what 2>/dev/null <"$file" || continue
        if [[ $job != "$job_id" || ! $time =~ ^[0-9]{1,12}$ || ! $pid =~ ^[0-9]{1,9}$ ||
            ! $progress =~ ^[0-9]{1,12}$ ]] || ((now - time <= hang_timeout)); then
            continue
        fi
        if is_stopped "$pid"; then
            what="$what; the process is stopped"
            key=0
        else
            key=1
        fi
        printf -v key '%s %012d %012d' "$key" "$progress" "$time"
        if [[ -z $best || $key < $best ]]; then
            best=$key
            hung_rank=${file##*/}
            hung_what="last: $what"
        fi
    done
    [[ -n $best ]]
}

# True if process $1 is one of the attempt's, on this host, and stopped.
is_stopped() {
    local stat
    in_job "$1" && read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    stat=${stat##*) }
    [[ ${stat%% *} == [Tt] ]]
}

# After a failed attempt: exits with its status if it was a user error or the restarts are used up,
# otherwise notes the restart on the console and in RUN_DIR/logs/restarts.log.
restart_or_exit() {
    if ((worker_status == 2 || attempt >= max_restarts)); then
        exit "$job_status"
    fi
    attempt=$((attempt + 1))
    local line why="the job failed with status $job_status"
    if [[ -n $hung_rank ]]; then
        why="rank $hung_rank made no progress for more than $hang_timeout s"
    elif [[ -n $failed_rank ]]; then
        why="rank $failed_rank $failure"
    fi
    printf -v line '%(%Y-%m-%dT%H:%M:%S%z)T restart %d of %d: %s; resuming from the newest verified checkpoint' \
        -1 "$attempt" "$max_restarts" "$why"
    echo "$line" >&2
    echo "$line" >>"$log_dir/restarts.log"
    keep_attempt_logs $((attempt - 1))
}

# The next attempt writes its logs afresh, so the last attempt's move to RUN_DIR/logs/attempt_<k>/ (as
# torchrun keeps attempt_<k>): the failure they hold is what a user reads first.
keep_attempt_logs() {
    local kept="$log_dir/attempt_$1" file
    mkdir -p "$kept"
    for file in "$log_dir"/*.log; do
        if [[ -f $file && ! -L $file && $file != "$log_dir/restarts.log" ]]; then
            mv -f -- "$file" "$kept/" 2>/dev/null || true  # another node's launcher may have moved it
        fi
    done
}

# After a stop on a signal (to the launcher, or to a worker: then rank 0's RUN_DIR/logs/stopped says
# which): one line saying where the job stopped and, for train, how to resume it; exits 128+signal.
exit_stopped() {
    local name="" step checkpoint where="" resume=""
    if [[ -s $log_dir/stopped ]] && read -r name step checkpoint <"$log_dir/stopped"; then
        where=" after step $step (checkpoint $checkpoint)"
    fi
    name=${stop_signal:-${name#SIG}}
    if [[ $subcommand == train ]]; then
        printf -v resume ' %q' "$0" ${launcher_args[@]+"${launcher_args[@]}"} --set train.resume=auto \
            "train.output_dir=$run_dir"
        resume="; resume with:$resume"
    fi
    echo "error: stopped by SIG$name$where$resume" >&2
    if [[ $name == INT ]]; then
        exit 130
    fi
    exit 143
}

# Starts "$@" as this attempt's job, in a session of its own (a Ctrl-C reaches the launcher alone, which
# passes it on), its output kept in $1 and shown without chatter; sets pids. The console's tee and
# filter ignore the signals, so that the job can still say how it stopped.
start_logged_job() {
    local transcript=$1
    shift
    (
        trap '' INT TERM
        set +e +o pipefail
        (trap - INT TERM; exec setsid env "$JOB_VAR=$job_id" "$@") 2>&1 | tee "$transcript" | without_chatter
        exit "${PIPESTATUS[0]}"
    ) &
    pids=("$!")
}

# True once the job start_logged_job started has ended; sets job_status.
logged_job_over() {
    if kill -0 "${pids[0]}" 2>/dev/null; then
        return 1
    fi
    job_status=0
    wait "${pids[0]}" || job_status=$?
}
