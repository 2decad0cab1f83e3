#!/usr/bin/env bash
# Runs `vit-dist train|eval|bench` on N ranks per node through MindSpore's msrun.
#
#   launch/msrun.sh --ranks-per-node N [--failure-timeout S] [--max-restarts K] [--hang-timeout S]
#                   [--grace-period S] [train|eval|bench] CONFIG [--ckpt C] [--set k=v ...]
#   launch/msrun.sh --ranks-per-node N --nodes M --node-rank R --master-addr A --master-port P
#                   [train|eval] CONFIG ...
#
# The world is N x M ranks. The config and data are checked once here (one clear line, no process
# started) before msrun spawns the workers; rank 0's log streams to the console, every rank's log is
# kept in RUN_DIR/logs. Across nodes, every node runs this with the same train.output_dir (a shared
# directory).
#   --max-restarts K  runs a failed job again, from its newest verified checkpoint, at most K times (default 0)
#   --hang-timeout S  ends the job when a rank makes no progress for S s after its first step (default 600; 0: off)
#   --grace-period S  after TERM or INT, seconds the ranks have to finish their step and save (default 300)
# User errors exit with status 2, a failed job with msrun's, a stop on TERM or INT with 143 or 130, a
# hung one with 124.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ranks_per_node=""
nodes=1
node_rank=0
master_port=""
join_timeout=${VIT_DIST_CLUSTER_TIMEOUT:-300}
add_scheduler_options
OPTIONS+=([--ranks-per-node]=ranks_per_node [--nodes]=nodes [--node-rank]=node_rank [--master-port]=master_port)
NUMBERS+=([--ranks-per-node]=1 [--nodes]=1 [--node-rank]=0 [--master-port]=1)
rank_count_hint="use --ranks-per-node N (msrun.sh starts N ranks on each of the --nodes M nodes)"
parse_command_line "$@"
[[ -n $ranks_per_node ]] || fail "--ranks-per-node N is required: the ranks msrun starts on each node"
if ((node_rank >= nodes)); then
    fail "--node-rank $node_rank is out of range: --nodes $nodes numbers the nodes 0 to $((nodes - 1))"
fi
if [[ -z $master_port ]] && ((nodes > 1)); then
    fail "--master-port is required with --nodes > 1 (every node must name the same port)"
fi
world=$((ranks_per_node * nodes))
put_python_first_on_path
preflight "$world" "$nodes"

free_port() {
    "$PYTHON" -c 'import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$master_addr"
}

fixed_port=1
if [[ -z $master_port ]]; then
    fixed_port=0
    master_port=$(free_port)
fi
print_summary msrun "$world ($nodes node(s) x $ranks_per_node rank(s))" "$nodes; this is node $node_rank" \
    scheduler "$master_addr:$master_port"

# Ranks on one node share its cores; runtime.cpu_threads splits them by this count.
export LOCAL_WORLD_SIZE=$ranks_per_node
if [[ -n $failure_timeout ]]; then
    export MS_NODE_TIMEOUT=$failure_timeout
fi
# Lets the scheduler msrun starts on every node whose address is the master address tell whether it serves.
export VIT_DIST_NODE_RANK=$node_rank
transcript="$log_dir/msrun_node_$node_rank.log"

start_attempt() {
    if ((attempt > 0 && !fixed_port)); then
        master_port=$(free_port)  # the last attempt's scheduler may still hold its port
    fi
    start_logged_job "$transcript" "$PYTHON" -m mindspore.parallel.cluster.run \
        --worker_num "$world" --local_worker_num "$ranks_per_node" \
        --master_addr "$master_addr" --master_port "$master_port" --node_rank "$node_rank" \
        --log_dir "$log_dir" --join True --cluster_time_out "$join_timeout" --tail_worker_log 0 \
        "${worker_cmd[@]}"
}

# msrun names a failed worker by pid only ("Worker process P exit with exception. Error code: C"), and
# each worker writes its rank to RUN_DIR/logs/pids/<pid>.
attempt_over() {
    logged_job_over || return 1
    local pid code="" job
    local failure_line='s/.*Worker process ([0-9]+) exit with exception\. Error code: (-?[0-9]+).*/\1 \2/p'
    failed_rank=""
    read -r pid code < <(sed -n -E "$failure_line" "$transcript") || true
    if [[ -n ${pid:-} ]]; then
        read -r failed_rank job <"$log_dir/pids/$pid" 2>/dev/null || true
    fi
    failure="exited with status $code"
    worker_status=${code:-$job_status}
}

run_job
