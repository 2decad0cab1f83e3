#!/usr/bin/env bash
# Installs the test environment and runs the whole suite: tests/run.sh [pytest arguments]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
export VENV
bash "$ROOT/launch/install.sh" test,mpi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
