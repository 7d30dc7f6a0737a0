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
