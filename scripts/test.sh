#!/usr/bin/env bash
# Set up (if needed) and run the test suite: CPU only, tiny models, no network.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$(bash scripts/setup.sh test | tail -n 1)"
source scripts/env.sh
export WANDB_MODE=offline
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
