#!/usr/bin/env bash
# What launch/mpirun.sh has mpirun start as each rank: mpi_rank.sh LOG_DIR COMMAND...
# Keeps the rank's output in LOG_DIR/worker_<rank>.log, rank 0's on the console too (as under
# msrun), then becomes COMMAND, so that mpirun's signals reach the worker itself.
set -euo pipefail
log="$1/worker_${OMPI_COMM_WORLD_RANK}.log"
shift
if [[ $OMPI_COMM_WORLD_RANK == 0 ]]; then
    exec > >(tee "$log") 2>&1
else
    exec >"$log" 2>&1
fi
exec "$@"
