#!/usr/bin/env bash
# Runs `vit-dist train|eval` on N ranks per node through MindSpore's msrun.
#
#   launch/msrun.sh -n N [train|eval] CONFIG [--ckpt C] [--set k=v ...]
#   launch/msrun.sh -n N --nodes M --node-rank R --master-addr A [--master-port P] [train|eval] CONFIG ...
#
# The config and data are checked once here (one clear line, no process started) before msrun
# spawns the workers; rank 0's log streams to the console, every rank's log is kept in RUN_DIR/logs.
set -euo pipefail

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
ranks_per_node=""
nodes=1
node_rank=0
master_addr=127.0.0.1
master_port=""
join_timeout=${VIT_DIST_CLUSTER_TIMEOUT:-300}

while [[ $# -gt 0 ]]; do
    case $1 in
        -n|--nproc) ranks_per_node=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --node-rank) node_rank=$2; shift 2 ;;
        --master-addr) master_addr=$2; shift 2 ;;
        --master-port) master_port=$2; shift 2 ;;
        -h|--help) usage ;;
        *) break ;;
    esac
done
[[ -n $ranks_per_node && $# -ge 1 ]] || usage
subcommand=train
if [[ $1 == train || $1 == eval ]]; then
    subcommand=$1
    shift
fi
[[ $# -ge 1 ]] || usage
config=$1
shift
worker_args=("$@")
world=$((ranks_per_node * nodes))

# msrun starts workers with the first `python` on PATH: make it the one that has vit_dist installed.
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
export PATH

# Prints the run directory and the device target, or one line naming the problem.
checked=$("$PYTHON" -m vit_dist preflight "$config" --world "$world" ${worker_args[@]+"${worker_args[@]}"})
run_dir=$(sed -n 1p <<<"$checked")
device_target=$(sed -n 2p <<<"$checked")
if [[ -z $master_port ]]; then
    if [[ $nodes -gt 1 ]]; then
        echo "error: --master-port is required with --nodes > 1 (every node must name the same port)" >&2
        exit 2
    fi
    master_port=$("$PYTHON" -c 'import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$master_addr")
fi
log_dir="$run_dir/logs"
mkdir -p "$log_dir"
declare -A backends=([Ascend]=HCCL [GPU]=NCCL [CPU]=MCCL)

cat <<EOF
vit-dist $subcommand
  launcher        msrun
  world size      $world ($nodes node(s) x $ranks_per_node rank(s)); this node: rank $node_rank
  scheduler       $master_addr:$master_port
  device target   $device_target, communication ${backends[$device_target]}
  config          $config ${worker_args[*]:-}
  run directory   $run_dir
  logs            $log_dir/worker_<rank>.log
EOF

# Ranks on one node share its cores; runtime.cpu_threads splits them by this count.
export LOCAL_WORLD_SIZE=$ranks_per_node
# The console shows rank 0's own lines; MindSpore's INFO/WARNING chatter stays in the log files.
set +e +o pipefail
"$PYTHON" -m mindspore.parallel.cluster.run \
    --worker_num "$world" --local_worker_num "$ranks_per_node" \
    --master_addr "$master_addr" --master_port "$master_port" --node_rank "$node_rank" \
    --log_dir "$log_dir" --join True --cluster_time_out "$join_timeout" --tail_worker_log 0 \
    "$ROOT/launch/worker.py" "$subcommand" "$config" ${worker_args[@]+"${worker_args[@]}"} \
    --set "train.output_dir=$run_dir" 2>&1 | grep --line-buffered -v -E '^\[(INFO|WARNING)\] '
status=${PIPESTATUS[0]}
exit "$status"
