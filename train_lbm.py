#!/usr/bin/env python
"""Latent Bridge Matching training (same loop and cache as train_2511.py, objective = lbm).

    python train_lbm.py --preset configs/lbm_2511.toml --cache-dir data/cache --init-from train/sft/step-001000.safetensors
"""
import sys

from diffsynth_edit.training.cli import main_lbm

if __name__ == "__main__":
    sys.exit(main_lbm(sys.argv[1:]))
