#!/usr/bin/env bash
# Install fakequant and what it needs into the current Python, without a multi-GB CUDA torch download:
# an importable torch is kept as it is; with none, the CPU wheel torch==2.13.0 is installed first.
# Usage: bash scripts/install.sh [extras]      (extras e.g. "dev" or "lightning"; default: none)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[install] no importable torch: installing the CPU wheel torch==2.13.0"
  "$PY" -m pip install -q "torch==2.13.0"
fi
extras=${1:-}
target="."
[ -n "$extras" ] && target=".[$extras]"
"$PY" -m pip install -q -e "$target"
"$PY" -c "import torch, fakequant; print(f'[install] fakequant {fakequant.__version__}, torch {torch.__version__}')"
