#!/usr/bin/env bash
# The main job: install, write the demo digits, train and evaluate a ViT on 2 msrun ranks (CPU).
#   launch/demo.sh [--set k=v ...]       (extra arguments go to launch/msrun.sh)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
export VENV
bash "$ROOT/launch/install.sh" demo
cd "$ROOT"
if [[ ! -d data/digits/val ]]; then
    "$VENV/bin/vit-dist" demo-data data/digits
fi
PYTHON="$VENV/bin/python" exec bash "$ROOT/launch/msrun.sh" --ranks-per-node 2 train demo "$@"
