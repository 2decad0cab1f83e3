#!/usr/bin/env bash
# Start one vit-dist worker per local Ascend device of an HCCL rank table (rank-table launch).
# Run it once on every server of the table, each with its own --server-index.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: launch/rank_table.sh RANK_TABLE CONFIG [--server-index K] [--bind-cores] [--dry-run]
                            [--log-dir D] [--set k=v ...] [other worker args ...]

  --server-index K  which server_list entry this machine is (default 0)
  --bind-cores      pin each worker to an equal share of this machine's cores (taskset)
  --dry-run         print each rank's environment and command, start nothing
  --log-dir D       worker logs D/rank_N.log (default logs/rank_table_<timestamp>)
Other arguments (e.g. --set k=v) go to: worker.py train CONFIG ...
Environment: PYTHON (default python) runs both the rank-table helper and the workers.
EOF
}

die() { echo "rank_table.sh: $*" >&2; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}
# Import the helper straight from the module so the launcher does not depend on the CLI wiring.
RANK_TABLE_MAIN='import sys; from vit_dist.rank_table import main; sys.exit(main(sys.argv[1:]))'

rank_table_tool() {
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "$RANK_TABLE_MAIN" "$@"
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
if (($# < 2)); then usage >&2; exit 2; fi
RANK_TABLE=$1
CONFIG=$2
shift 2

SERVER_INDEX=0
BIND_CORES=0
DRY_RUN=0
LOG_DIR="logs/rank_table_$(date +%Y%m%d_%H%M%S)"
PASSTHROUGH=()
while (($#)); do
    case $1 in
        --server-index) (($# >= 2)) || die "--server-index needs a value"; SERVER_INDEX=$2; shift 2 ;;
        --log-dir) (($# >= 2)) || die "--log-dir needs a value"; LOG_DIR=$2; shift 2 ;;
        --bind-cores) BIND_CORES=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) PASSTHROUGH+=("$1"); shift ;;
    esac
done
[[ $SERVER_INDEX =~ ^[0-9]+$ ]] || die "--server-index must be a non-negative integer, got '$SERVER_INDEX'"

# (a) refuse a broken table before anything starts; the tool prints every problem on stderr.
rank_table_tool validate "$RANK_TABLE" >/dev/null || die "invalid rank table: $RANK_TABLE"
RANK_TABLE_FILE=$(realpath -- "$RANK_TABLE")  # workers may chdir; HCCL needs an absolute path

# (b) this server's devices and ranks, plus the world size.
RANK_SIZE="" SERVER_COUNT="" SERVER_ID=""
DEVICES=()
RANKS=()
LOCAL_RANKS=$(rank_table_tool local-ranks "$RANK_TABLE_FILE" --server-index "$SERVER_INDEX")
while read -r key first second; do
    case $key in
        rank_size) RANK_SIZE=$first ;;
        server_count) SERVER_COUNT=$first ;;
        server_id) SERVER_ID=$first ;;
        device) DEVICES+=("$first"); RANKS+=("$second") ;;
    esac
done <<<"$LOCAL_RANKS"
NUM_LOCAL=${#DEVICES[@]}

CORES_PER_WORKER=0
BINDING=no
if ((BIND_CORES)); then
    CORES_PER_WORKER=$(($(nproc) / NUM_LOCAL))
    ((CORES_PER_WORKER > 0)) || die "--bind-cores: $(nproc) cores cannot be split among $NUM_LOCAL workers"
    BINDING="$CORES_PER_WORKER cores per worker"
fi

# (d) summary first, so a wrong table or index is visible before any log appears.
cat <<EOF
launcher       rank_table
rank table     $RANK_TABLE_FILE
world size     $RANK_SIZE
servers        $SERVER_COUNT
server index   $SERVER_INDEX ($SERVER_ID)
local devices  ${DEVICES[*]} (ranks ${RANKS[*]})
device target  Ascend
backend        HCCL
config         $CONFIG
log dir        $LOG_DIR
bind cores     $BINDING
EOF

# Environment and command of local worker $1 (index into DEVICES), as arrays: never eval'd.
worker_argv() {
    local i=$1
    WORKER_ENV=(
        "DEVICE_ID=${DEVICES[i]}"
        "RANK_ID=${RANKS[i]}"
        "RANK_SIZE=$RANK_SIZE"
        "RANK_TABLE_FILE=$RANK_TABLE_FILE"
        "MINDSPORE_HCCL_CONFIG_PATH=$RANK_TABLE_FILE"
    )
    WORKER_CMD=()
    if ((BIND_CORES)); then
        local first=$((i * CORES_PER_WORKER))
        WORKER_CMD=(taskset -c "$first-$((first + CORES_PER_WORKER - 1))")
    fi
    WORKER_CMD+=("$PYTHON" "$ROOT/launch/worker.py" train "$CONFIG" "${PASSTHROUGH[@]}")
}

# (f) dry run: one copy-pasteable line per rank.
if ((DRY_RUN)); then
    for ((i = 0; i < NUM_LOCAL; i++)); do
        worker_argv "$i"
        printf '%q ' "${WORKER_ENV[@]}" "${WORKER_CMD[@]}"
        printf '>%q 2>&1\n' "$LOG_DIR/rank_${RANKS[i]}.log"
    done
    exit 0
fi

# (c) start the workers, each in its own session so a failure can take down its whole group.
mkdir -p -- "$LOG_DIR"
PIDS=()
kill_workers() {
    local pid tries
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for ((tries = 0; tries < 10; tries++)); do  # grace period before SIGKILL
        for pid in "${PIDS[@]}"; do
            if kill -0 -- "-$pid" 2>/dev/null; then sleep 1; continue 2; fi
        done
        return 0
    done
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
# setsid detaches workers from the terminal, so forward Ctrl-C / TERM ourselves.
on_signal() { echo "rank_table.sh: $1, stopping workers" >&2; kill_workers; exit "$2"; }
trap 'on_signal interrupted 130' INT
trap 'on_signal terminated 143' TERM

for ((i = 0; i < NUM_LOCAL; i++)); do
    worker_argv "$i"
    # Not a process-group leader here (no job control), so setsid execs in place and $! is the group id.
    setsid env "${WORKER_ENV[@]}" "${WORKER_CMD[@]}" >"$LOG_DIR/rank_${RANKS[i]}.log" 2>&1 </dev/null &
    PIDS+=("$!")
    echo "started rank ${RANKS[i]} on device ${DEVICES[i]} (pid $!)"
done

# (e) poll rather than `wait -n -p` (bash >= 5.1) so older server images work too.
remaining=("${!PIDS[@]}")
while ((${#remaining[@]})); do
    still_running=()
    for i in "${remaining[@]}"; do
        if kill -0 "${PIDS[i]}" 2>/dev/null; then still_running+=("$i"); continue; fi
        status=0
        wait "${PIDS[i]}" || status=$?
        if ((status != 0)); then
            log="$LOG_DIR/rank_${RANKS[i]}.log"
            kill_workers
            echo "rank_table.sh: rank ${RANKS[i]} (device ${DEVICES[i]}) failed with status $status;" \
                "stopped the other workers" >&2
            echo "---- last 20 lines of $log ----" >&2
            tail -n 20 -- "$log" >&2
            exit "$status"
        fi
    done
    remaining=("${still_running[@]}")
    if ((${#remaining[@]})); then sleep 1; fi
done
echo "all $NUM_LOCAL workers on server $SERVER_INDEX finished successfully; logs in $LOG_DIR"
