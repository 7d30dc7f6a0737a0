#!/usr/bin/env bash
# The whole workspace end to end on the embedded tiny model (CPU is enough, a few minutes):
# sample raw data -> dataset JSON -> phase-1 cache -> phase-2 SFT (LoRA + STE) -> edit + evaluate
# -> LBM trained from scratch (its own preset) -> 1-step LBM edit. Re-running resumes / skips finished work.
# The data is the synthetic "fill" family (a white box filled with a named colour), built for the tiny model (analytic
# VAE, zero output projection): each evaluation prints its PSNR in/out of the mask beside the identity edit and the
# VAE round trip, and each run draws eval_curve.png (README: what these steps reach today).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="$(bash scripts/setup.sh | tail -n 1)"
source scripts/env.sh
export WANDB_MODE="${WANDB_MODE:-offline}"
# tiny models gain nothing from intra-op threads, and on a busy machine OpenMP barriers make every op wait
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
QS="${QUICKSTART_DIR:-data/quickstart}"
MODELS="${QUICKSTART_MODELS:-models/tiny}"
RUNS="${QUICKSTART_RUNS:-train}"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/8 tiny model -> $MODELS (real folder layout; random DiT and text encoder, analytic VAE)"
"$PY" edit_images.py tiny-model --out "$MODELS"

step "2/8 synthetic raw data -> $QS/raw"
"$PY" generate_dataset_json_mp.py sample-data --out "$QS/raw" --count "${QUICKSTART_COUNT:-256}" --size 64 --family fill

step "3/8 dataset JSON (train/test split) -> $QS/dataset.json"
"$PY" generate_dataset_json_mp.py build --source-dir "$QS/raw/source" --target-dir "$QS/raw/target" \
  --mask-dir "$QS/raw/mask" --instructions "$QS/raw/edit_types.csv" --out "$QS/dataset.json" \
  --test-fraction 0.0625 --seed 0
"$PY" generate_dataset_json_mp.py validate "$QS/dataset.json"

step "4/8 phase 1: cache (text encoder + VAE only)"
"$PY" train_2511.py cache --dataset "$QS/dataset_train.json" --cache-dir "$QS/cache-train" --model-root "$MODELS" \
  --variant 2511 --dtype fp32
"$PY" train_2511.py cache --dataset "$QS/dataset_test.json" --cache-dir "$QS/cache-test" --model-root "$MODELS" \
  --variant 2511 --dtype fp32
"$PY" train_2511.py verify --cache-dir "$QS/cache-train"

step "5/8 phase 2: SFT, bridge mode (LoRA + STE), validation grid"
"$PY" train_2511.py train --preset configs/tiny_quickstart.toml --cache-dir "$QS/cache-train" --model-root "$MODELS" \
  --output-dir "$RUNS" --run-name quickstart-sft --val-cache-dir "$QS/cache-test" --validate-every 25 --resume
SFT_CKPT="$(ls "$RUNS"/quickstart-sft/step-*.safetensors | sort | tail -n 1)"

step "6/8 edit + evaluate the test split with $SFT_CKPT"
"$PY" edit_images.py evaluate --dataset "$QS/dataset_test.json" --model-root "$MODELS" --checkpoint "$SFT_CKPT" \
  --steps 20 --cfg 2 --out "$RUNS/quickstart-sft/eval" --grid-rows 8 --grid-cell 128

step "7/8 LBM from scratch (the zero output projection makes the untrained 1-step edit the identity)"
"$PY" train_lbm.py --preset configs/tiny_quickstart_lbm.toml --cache-dir "$QS/cache-train" \
  --model-root "$MODELS" --output-dir "$RUNS" --run-name quickstart-lbm \
  --val-cache-dir "$QS/cache-test" --validate-every 200 --val-steps 1 --resume
LBM_CKPT="$(ls "$RUNS"/quickstart-lbm/step-*.safetensors | sort | tail -n 1)"

step "8/8 one-step LBM edit"
"$PY" edit_images.py evaluate --dataset "$QS/dataset_test.json" --model-root "$MODELS" --checkpoint "$LBM_CKPT" \
  --sampler lbm --steps 1 --cfg 1 --out "$RUNS/quickstart-lbm/eval" --grid-rows 8 --grid-cell 128

echo
echo "done. Look at:"
echo "  $RUNS/quickstart-{sft,lbm}/loss_curve.png, eval_curve.png (PSNR in/out of the mask per checkpoint), samples/"
echo "  $RUNS/quickstart-sft/eval/ and $RUNS/quickstart-lbm/eval/ (edits, metrics.csv/json with the identity edit and"
echo "  the VAE round trip as references, grid.png with each output's PSNR in/out of the mask)"
echo "  app: $PY app_gradio.py --model-root $MODELS --checkpoint-root $RUNS   (http://127.0.0.1:7999)"
