#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs vit-dist into it.
#   launch/install.sh [EXTRAS]     e.g. launch/install.sh demo   or   launch/install.sh test,mpi
# VENV (default: .venv in the repository) and PYTHON_FOR_VENV (default: python3, 3.9-3.11) override.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
extras=${1:-}

if [[ ! -x $VENV/bin/python ]]; then
    "${PYTHON_FOR_VENV:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e "$ROOT${extras:+[$extras]}"
"$VENV/bin/python" -c 'import sys, mindspore, numpy
print("vit-dist environment:", sys.prefix, "- mindspore", mindspore.__version__, "numpy", numpy.__version__)'
