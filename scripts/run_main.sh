#!/usr/bin/env bash
# The main job on its built-in default, on a fresh machine (CPU is enough, nothing is downloaded
# besides the packages themselves): installs what it needs, then runs `fakequant report` (the quantization-error report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
exec fakequant "${@:-report}"
