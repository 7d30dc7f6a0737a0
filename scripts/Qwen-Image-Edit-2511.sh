#!/usr/bin/env bash
# Split training for Qwen-Image-Edit-2511: phase 1 (cache: text encoder + VAE) then phase 2 (LoRA + STE from the cache).
# Override from the environment: DATASET, MODEL_ROOT, CACHE_PATH, OUTPUT_PATH, RUN_NAME, NUM_GPUS, ACCELERATE_CONFIG,
# WANDB_PROJECT (default qwen-image), WANDB_NAME. Extra arguments go to phase 2 (e.g. --max-steps 2000).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh
VARIANT="${VARIANT:-2511}"
PY="${PYTHON:-$(bash scripts/setup.sh | tail -n 1)}"
ACCELERATE="$(dirname "$PY")/accelerate"
DATASET="${DATASET:-data/dataset.json}"
MODEL_ROOT="${MODEL_ROOT:-models}"
CACHE_PATH="${CACHE_PATH:-data/cache-${VARIANT}}"
RUN_NAME="${RUN_NAME:-${WANDB_NAME:-Qwen-Image-Edit-${VARIANT}-lora}}"
OUTPUT_PATH="${OUTPUT_PATH:-train}"
NUM_GPUS="${NUM_GPUS:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L | wc -l || echo 1)}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate_ddp.yaml}"
PRESET="${PRESET:-configs/train_${VARIANT}.toml}"
export WANDB_NAME="${WANDB_NAME:-$RUN_NAME}"

launch() {
  if [ "$NUM_GPUS" -gt 1 ]; then
    "$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NUM_GPUS" "$@"
  else
    "$PY" "$@"
  fi
}

echo "== phase 1: cache $DATASET -> $CACHE_PATH"
launch train_2511.py cache --dataset "$DATASET" --cache-dir "$CACHE_PATH" --variant "$VARIANT" --model-root "$MODEL_ROOT"
echo "== phase 2: train -> $OUTPUT_PATH/$RUN_NAME"
SPEED=()
if [ "$NUM_GPUS" -gt 1 ] && uses_zero3 "$ACCELERATE_CONFIG"; then
  SPEED=("${zero3_training_flags[@]}")
  echo "== ZeRO-3: the DiT blocks run uncompiled (${SPEED[*]})"
fi
launch train_2511.py train --preset "$PRESET" --cache-dir "$CACHE_PATH" --model-root "$MODEL_ROOT" \
  --output-dir "$OUTPUT_PATH" --run-name "$RUN_NAME" --resume "${SPEED[@]}" "$@"
