#!/usr/bin/env bash
# The main job on its built-in default, on a fresh machine (CPU is enough, nothing is downloaded
# besides the packages themselves): installs what it needs, then runs `fakequant demo` (a small GPT trained on the
# Python standard library once per recipe; writes runs/summary.md and runs/loss_curves.png, about 10 minutes
# on a 2-core CPU). Other commands: `bash scripts/run_main.sh report`, `... compare-loss runs/bf16 runs/mxfp4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
exec fakequant "${@:-demo}"
