#!/usr/bin/env python
"""Split training for Qwen-Image-Edit-2511/2509.

    python train_2511.py cache  --preset configs/cache_2511.toml ...   # phase 1: text + VAE encodings to a cache
    python train_2511.py verify --cache-dir data/cache                  # check every cache entry
    python train_2511.py train  --preset configs/train_2511.toml ...   # phase 2: LoRA (+ STE) from the cache
    python train_2511.py export --checkpoint train/run/step-100.safetensors --out lora_comfy.safetensors
"""
import sys

COMMANDS = {
    "cache": ("diffsynth_edit.cache.cli", "main_cache"),
    "verify": ("diffsynth_edit.cache.cli", "main_verify"),
    "train": ("diffsynth_edit.training.cli", "main_train"),
    "export": ("diffsynth_edit.training.cli", "main_export"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, func = COMMANDS[argv[0]]
    import importlib

    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
