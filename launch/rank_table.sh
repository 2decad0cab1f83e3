#!/usr/bin/env bash
# Runs `vit-dist train|eval|bench` on this server's devices of an HCCL rank table (Ascend), one worker each.
#
#   launch/rank_table.sh [--server-index K] [--visible-devices IDS] [--chip 910A|910B] [--bind-cores]
#                        [--dry-run] [--max-restarts K] [--hang-timeout S] [--grace-period S]
#                        RANK_TABLE [train|eval|bench] CONFIG [--ckpt C] [--set k=v ...]
#
# Run it on every server of the table, each with its own K: its entry in the table's server_list
# (default 0). The world size and this server's devices and ranks come from the table, which is
# validated before anything starts.
#   --visible-devices IDS  in a container that numbers its NPUs anew: the physical ids (the table's) of
#                 the NPUs it sees as 0, 1, ... (e.g. 4,5,6,7); each worker's DEVICE_ID is the container's id
#   --chip 910A   refuses a table HCCL refuses on Atlas training servers (1, 2 or 4 devices of one HCCS
#                 group 0-3/4-7, or all 8); --chip 910B (Atlas A2 and later) skips that rule; unset: a warning
#   --bind-cores  pins each worker to an equal share of this machine's cores (taskset)
#   --dry-run     prints each rank's environment and command; starts and creates nothing and checks
#                 only the table (RUN_DIR stands for the run directory the job's pre-flight check picks)
# The workers start without the variables another launcher leaves (MS_ROLE, MS_SCHED_*, MS_WORKER_NUM,
# MS_NODE_ID, OMPI_*, PMIX_*, PRTE_*, vit-dist's own): inherited from an outer job they would make a
# worker wait for that job's peers. The summary names those removed.
# The config and data are checked once here (one clear line, no process started) before the workers
# start; the first local worker's log streams to the console, every rank's log is kept in RUN_DIR/logs.
# When a worker fails every worker is stopped; on Ctrl-C or TERM each finishes its step and rank 0
# saves a checkpoint. Across servers, every server runs this with the same train.output_dir (a shared
# directory). --max-restarts, --hang-timeout and --grace-period are as for launch/msrun.sh (see its --help).
# User errors exit with status 2, a failed job with the failed worker's, a stop on TERM or INT with
# 143 or 130, a hung one with 124.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

server_index=0
visible_devices=""
chip=""
bind_cores=""
dry_run=""
OPTIONS+=([--server-index]=server_index [--visible-devices]=visible_devices [--chip]=chip)
NUMBERS+=([--server-index]=0)
SWITCHES+=([--bind-cores]=bind_cores [--dry-run]=dry_run)
LEADING=(rank_table)
rank_count_hint="rank_table.sh takes the rank counts from RANK_TABLE"
pids=()  # the workers of the attempt
running=()  # their indices, while they run

# Refuses an invalid table (the helper names every problem) and reads this server's part of it: sets
# rank_table_file, rank_size, server_count, server_id, devices (the table's physical ids), ranks and
# device_ids (the workers' DEVICE_ID: the container's ids with --visible-devices, else the same). Also
# sets scrubbed, the names of another launcher's variables exported here (the helper lists them:
# bootstrap.launcher_variables), scrub, env's options that remove them, never evaluated, and removed.
read_rank_table() {
    case $chip in
        "" | 910A | 910B) ;;
        *) fail "--chip is 910A (Atlas training series) or 910B (Atlas A2 and later), got '$chip'" ;;
    esac
    "$PYTHON" -m vit_dist rank-table validate ${chip:+--chip "$chip"} "$rank_table" >/dev/null ||
        fail "invalid rank table $rank_table; fix the problems above, or make it anew (vit-dist rank-table generate)"
    rank_table_file=$(realpath -- "$rank_table")  # workers may chdir; HCCL needs an absolute path
    local listing key first second third
    # On an index out of range the helper's one line says which indices the table has.
    listing=$("$PYTHON" -m vit_dist rank-table local-ranks "$rank_table_file" --server-index "$server_index" \
        ${visible_devices:+--visible-devices "$visible_devices"}) || exit 2
    devices=()
    ranks=()
    device_ids=()
    scrubbed=()
    scrub=()
    while read -r key first second third; do
        case $key in
            rank_size) rank_size=$first ;;
            server_count) server_count=$first ;;
            server_id) server_id=$first ;;
            device) devices+=("$first"); ranks+=("$second"); device_ids+=("$third") ;;
            foreign) scrubbed+=("$first"); scrub+=(-u "$first") ;;
        esac
    done <<<"$listing"
    removed="no other launcher's variables"
    if ((${#scrubbed[@]} > 0)); then
        removed="${scrubbed[*]} (another launcher's, removed for the workers)"
    fi
}

# With --bind-cores, each worker gets an equal share of the cores; sets cores_per_worker and binding.
split_cores() {
    cores_per_worker=0
    binding=no
    if [[ -n $bind_cores ]]; then
        cores_per_worker=$(($(nproc) / ${#devices[@]}))
        ((cores_per_worker > 0)) || fail "--bind-cores: $(nproc) cores cannot be split among ${#devices[@]} workers"
        binding="$cores_per_worker core(s) per worker"
    fi
}

# Local worker $1 (an index into devices): sets worker_env (env's arguments) and worker_argv, arrays,
# never eval'd.
worker_process() {
    local i=$1
    worker_env=(${scrub[@]+"${scrub[@]}"} "DEVICE_ID=${device_ids[i]}" "RANK_ID=${ranks[i]}" "RANK_SIZE=$rank_size"
        "RANK_TABLE_FILE=$rank_table_file" "MINDSPORE_HCCL_CONFIG_PATH=$rank_table_file"
        # Ranks on one server share its cores; runtime.cpu_threads splits them by this count.
        "LOCAL_WORLD_SIZE=${#devices[@]}")
    if [[ -n $job_id ]]; then  # not in a dry run
        worker_env+=("$JOB_VAR=$job_id")
    fi
    worker_argv=()
    if [[ -n $bind_cores ]]; then
        local first=$((i * cores_per_worker))
        worker_argv=(taskset -c "$first-$((first + cores_per_worker - 1))")
    fi
    worker_argv+=("$PYTHON" "${worker_cmd[@]}")
}

# One copy-pasteable line per rank (through env when it removes variables).
print_dry_run() {
    local i
    for i in "${!devices[@]}"; do
        worker_process "$i"
        if ((${#scrub[@]} > 0)); then
            printf 'env '
        fi
        printf '%q ' "${worker_env[@]}" "${worker_argv[@]}"
        printf '>%q 2>&1\n' "$log_dir/worker_${ranks[i]}.log"
    done
}

# Each worker in a session of its own, so that a Ctrl-C reaches the launcher alone, which passes it on;
# the first one's output also goes to the console, through a tee that ignores the signals so that the
# worker can still say how it stopped.
start_attempt() {
    local i log
    pids=()
    running=()
    for i in "${!devices[@]}"; do
        worker_process "$i"
        log="$log_dir/worker_${ranks[i]}.log"
        # Not a process-group leader here (no job control), so setsid execs in place: $! is the worker's pid.
        # A background command would ignore INT: trap - gives the worker the default back.
        if ((i == 0)); then
            (trap - INT TERM; exec setsid env "${worker_env[@]}" "${worker_argv[@]}") \
                > >(trap '' INT TERM; tee "$log" | without_chatter) 2>&1 </dev/null &
        else
            (trap - INT TERM; exec setsid env "${worker_env[@]}" "${worker_argv[@]}") >"$log" 2>&1 </dev/null &
        fi
        pids+=("$!")
    done
    running=("${!pids[@]}")
}

# True once every worker succeeded, or one failed (run_job then stops the others). Polls rather than
# `wait -n -p` (bash >= 5.1) so that older server images work too.
attempt_over() {
    local i status still=()
    for i in "${running[@]}"; do
        if kill -0 "${pids[i]}" 2>/dev/null; then
            still+=("$i")
            continue
        fi
        status=0
        wait "${pids[i]}" || status=$?
        if ((status != 0)); then
            job_status=$status worker_status=$status failed_rank=${ranks[i]}
            failure="(device ${devices[i]}) exited with status $status"
            return 0
        fi
    done
    running=(${still[@]+"${still[@]}"})
    job_status=0
    [[ ${#running[@]} -eq 0 ]]
}

# The launcher started the workers itself.
job_workers() {
    local i
    workers=()
    for i in ${running[@]+"${running[@]}"}; do
        workers+=("${pids[i]}")
    done
}

parse_command_line "$@"
put_python_first_on_path
read_rank_table
split_cores
if [[ -n $dry_run ]]; then
    # Pre-flight makes the run directory, so a dry run, which creates nothing, names it RUN_DIR.
    run_dir=RUN_DIR
    log_dir=$run_dir/logs
else
    preflight "$rank_size" "$server_count"
fi
local_devices="${devices[*]} (ranks ${ranks[*]})"
if [[ -n $visible_devices ]]; then
    local_devices+="; DEVICE_ID ${device_ids[*]} in this container"
fi
print_summary rank_table "$rank_size" "$server_count; this is server $server_index ($server_id)" \
    "rank table" "$rank_table_file" "local devices" "$local_devices" "bind cores" "$binding" \
    "environment" "$removed"
if [[ -n $dry_run ]]; then
    worker_command
    print_dry_run
    exit 0
fi
run_job
echo "all ${#devices[@]} workers of server $server_index finished; logs in $log_dir"
