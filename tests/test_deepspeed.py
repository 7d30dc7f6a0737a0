"""DeepSpeed ZeRO-2 through the real launcher (one CPU process): the trap checks pass with the shipped config, the
run trains and saves LoRA + STE checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_training import cache_dir  # noqa: F401  (module-scoped cache fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_zero2_one_process_trains_and_saves(cache_dir, tiny_root, tmp_path):  # noqa: F811
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs" / "accelerate_zero2.yaml"),
           "--num_processes", "1", str(REPO / "train_2511.py"), "train", "--cache-dir", str(cache_dir),
           "--model-root", str(tiny_root), "--output-dir", str(tmp_path), "--run-name", "z2", "--lora-rank", "4",
           "--optimizer", "prodigy", "--gradient-accumulation", "2", "--max-steps", "2", "--save-every", "1",
           "--wandb", "false", "--gradient-checkpointing", "false"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "each rank estimates Prodigy's step size" in out.stdout + out.stderr
    first, last = (load_file(str(tmp_path / "z2" / f"step-00000{i}.safetensors")) for i in (1, 2))
    lora_b = [k for k in last if ".lora_B." in k]
    assert lora_b and any(last[k].abs().sum() > 0 for k in lora_b)
    assert any(not (first[k] == last[k]).all() for k in lora_b)
    assert sum(k.startswith("pipe.ste.") for k in last) == 45  # 3 tiny blocks x 15 STE tensors
