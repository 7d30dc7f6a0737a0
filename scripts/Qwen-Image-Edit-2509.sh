#!/usr/bin/env bash
# Split training for Qwen-Image-Edit-2509 (zero_cond_t off, 2509 LoRA targets). Same knobs as Qwen-Image-Edit-2511.sh.
set -euo pipefail
VARIANT=2509 exec bash "$(dirname "${BASH_SOURCE[0]}")/Qwen-Image-Edit-2511.sh" "$@"
