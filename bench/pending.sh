#!/usr/bin/env bash
# Issue 13's GPU measurements, in groups that each fit one 10-minute device call (H200, full-size models with random
# weights), to re-run them after a change (bench/RESULTS.md session 13 ran train-fp8's best case, default, edit and
# numerics on an H200, lowmem on an H100). Run from the repository root on the GPU machine:
#
#   bash bench/pending.sh GROUP [FLAGS]   # GROUP: train-fp8 | default | edit | lowmem | numerics
#
# FLAGS go to every bench of the group (`--tiny --repeats 1` is the CPU smoke test of a group).
# Each command has its own time limit, so one slow bench cannot eat the next one's output; every bench prints its
# RESULT lines as it goes and writes its table to $OUT. When diffsynth is not importable, it and its pinned
# dependencies are installed from .whl/*.whl (carry that folder to the GPU machine).
set -uo pipefail
case "${1:-}" in
  train-fp8|default|edit|lowmem|numerics) ;;
  *) echo "usage: bash bench/pending.sh train-fp8|default|edit|lowmem|numerics" >&2; exit 2 ;;
esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GROUP=$1; shift
if ! python3 -c "import diffsynth" 2> /dev/null && compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$ROOT"/.whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$ROOT/DiffSynth-Studio"
else
  export PYTHONPATH="$ROOT/DiffSynth-Studio"
fi
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/bench_out}"
mkdir -p "$OUT"
cd "$ROOT/bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

run() {  # run SECONDS CMD...: the command under a time limit, its exit status reported
  local limit=$1; shift
  echo "== $* (limit ${limit}s)"
  timeout "$limit" "$@" "${FLAGS[@]}"
  echo "== exit $?"
}

FLAGS=("$@")
case "$GROUP" in
  train-fp8)  # target 1 on the H200: fp8 matmuls + partitioner budget on the r32 step (H100: RESULTS sessions 11, 12; H200: 13)
    run 580 python3 bench_train_levers.py --cases up,r32cb30,r32cb20f8,r32cb20f8sa,r32cb10f8sa,r32cb30sa --profile r32cb20f8sa ;;
  default)  # target 2: the shipped default as the presets run it (budget 0.1 + save_attention), with fp32
    # trainables and with fp8 matmuls, every block recomputing as the baseline; the LBM step (H200: session 13)
    run 460 python3 bench_train_levers.py --cases defc,defcb10sa,defcb10f8sa,defc32b10sa
    run 150 python3 bench_lbm.py --only-train --train-dtype bf16 --train-preset ../configs/lbm_2511.toml ;;
  edit)  # target 3: 40-step edits, compiled + fp8 with and without fast accumulation; upstream in the same call
    run 580 python3 bench_dit_forward.py --fast-loop --skip-bridge-loop --skip-sequential-cfg ;;
  lowmem)  # the low-memory Prodigy rows and the eager default after the batched optimizer
    run 330 python3 bench_lowmem.py --skip-edit
    run 240 python3 bench_train_levers.py --cases def ;;
  numerics)  # target 4: fp8 fast accumulation's error per block and end to end (row f8f)
    run 580 python3 bench_forward_numerics.py ;;
esac
