#!/usr/bin/env bash
# Installs the test environment and runs the whole suite: tests/run.sh [pytest arguments]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
export VENV
# torch's CUDA build and its libraries are GBs: a cached second copy could fill a test machine's disk.
export PIP_NO_CACHE_DIR=1
bash "$ROOT/launch/install.sh" test,mpi
cd "$ROOT"
# Two workers: much of a launch test is waiting (process start, MindSpore's cluster joining, a
# failure or hang timeout), which the other worker's tests fill. See tests/conftest.py.
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile "$@"
