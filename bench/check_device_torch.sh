#!/usr/bin/env bash
# Run the fp8 / compile tests under the GPU machine's torch (2.11) on this CPU before spending device time on them:
# a venv with that torch (a CUDA build from PyPI, ~3 GB the first time) that borrows every other package from .venv,
# and a pytest plugin standing in for the CPU `_scaled_mm` with cuBLAS's layout rules (torch 2.11's CPU kernel takes
# per-tensor scales only).
#   bash bench/check_device_torch.sh [pytest args]   # default: the fp8, speed-up and low-memory tests
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH=${DEVICE_TORCH:-2.11.0} VISION=${DEVICE_TORCHVISION:-0.26.0} VENV=${DEVICE_TORCH_VENV:-/tmp/torch-device-venv}
[ -x "$ROOT/.venv/bin/python" ] || bash "$ROOT/scripts/setup.sh" test
if ! "$VENV/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('$TORCH')" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/pip" install -q --no-deps "torchvision==$VISION" 2>&1 | grep -v "^WARNING: Location" || true
  "$ROOT/.venv/bin/python" -c "import site; print(site.getsitepackages()[0])" \
    > "$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")/zz_project_venv.pth"
fi
cd "$ROOT"
[ $# -gt 0 ] || set -- tests/test_fp8_matmuls.py tests/test_speedups.py tests/test_lowmem.py
PYTHONPATH="$ROOT/bench/torch_compat:$ROOT/DiffSynth-Studio" "$VENV/bin/python" -m pytest -q -p rowwise_scaled_mm_cpu "$@"
