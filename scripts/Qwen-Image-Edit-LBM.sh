#!/usr/bin/env bash
# Latent Bridge Matching on the phase-1 cache (run Qwen-Image-Edit-2511.sh first, or at least its phase 1).
# Defaults: DDP (fastest when the model fits a card); ACCELERATE_CONFIG=configs/accelerate_zero3.yaml for ZeRO-3 on
# 96 GB cards. INIT_FROM=<SFT checkpoint> warm-starts LoRA and keeps its STE.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh
PY="${PYTHON:-$(bash scripts/setup.sh | tail -n 1)}"
ACCELERATE="$(dirname "$PY")/accelerate"
MODEL_ROOT="${MODEL_ROOT:-models}"
CACHE_PATH="${CACHE_PATH:-data/cache-2511}"
OUTPUT_PATH="${OUTPUT_PATH:-train}"
RUN_NAME="${RUN_NAME:-${WANDB_NAME:-Qwen-Image-Edit-2511-LBM}}"
NUM_GPUS="${NUM_GPUS:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L | wc -l || echo 1)}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate_ddp.yaml}"
PRESET="${PRESET:-configs/lbm_2511.toml}"
export WANDB_NAME="${WANDB_NAME:-$RUN_NAME}"
EXTRA=()
[ -n "${INIT_FROM:-}" ] && EXTRA+=(--init-from "$INIT_FROM")
if uses_zero3 "$ACCELERATE_CONFIG"; then
  EXTRA+=("${zero3_training_flags[@]}")
  echo "== ZeRO-3: the DiT blocks run uncompiled (${zero3_training_flags[*]})"
fi
ARGS=(train_lbm.py --preset "$PRESET" --cache-dir "$CACHE_PATH" --model-root "$MODEL_ROOT" --output-dir "$OUTPUT_PATH"
      --run-name "$RUN_NAME" --resume "${EXTRA[@]}" "$@")
if [ "$NUM_GPUS" -gt 1 ] || [[ "$ACCELERATE_CONFIG" == *zero* ]]; then
  "$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" "${ARGS[@]}"
else
  "$PY" "${ARGS[@]}"
fi
