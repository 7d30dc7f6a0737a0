# Sourced by the scripts: offline-safe defaults for every run.
export DIFFSYNTH_SKIP_DOWNLOAD="${DIFFSYNTH_SKIP_DOWNLOAD:-true}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}"
export WANDB_PROJECT="${WANDB_PROJECT:-qwen-image}"
if [ -z "${WANDB_API_KEY:-}" ] && [ ! -f "$HOME/.netrc" ]; then export WANDB_MODE="${WANDB_MODE:-offline}"; fi
export PYTHONUNBUFFERED=1
# On SIGTERM/SIGINT a training run saves its resume state before it exits (docs/training.md); torchrun, under
# `accelerate launch` with several processes, kills its workers this many seconds after forwarding the signal
# (torch's default: 30 s, too short to save a rank-512 LoRA with its Prodigy state).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

# Whether an accelerate config runs DeepSpeed ZeRO-3 (inline `zero_stage: 3`, or "stage": 3 in its
# deepspeed_config_file, a path from the repository root): the training presets compile the DiT blocks, which ZeRO-3
# cannot run, so the scripts then add `zero3_training_flags`.
uses_zero3() {
  local cfg=$1 ds
  grep -Eq '^[[:space:]]*zero_stage:[[:space:]]*3([^0-9]|$)' "$cfg" && return 0
  ds=$(sed -nE 's/^[[:space:]]*deepspeed_config_file:[[:space:]]*"?([^"]*[^"[:space:]])"?[[:space:]]*$/\1/p' "$cfg")
  [ -n "$ds" ] && [ -f "$ds" ] && grep -Eq '"stage"[[:space:]]*:[[:space:]]*3([^0-9]|$)' "$ds"
}
zero3_training_flags=(--compile-blocks false --recompute-budget none --save-attention false)
