#!/usr/bin/env python
"""Batch editing and evaluation with Qwen-Image-Edit (2511/2509) and workspace checkpoints.

    python edit_images.py edit --dataset data/test.json --model-root models --checkpoint train/run/step-1000.safetensors --out outputs/edit
    python edit_images.py edit --image photo.png --mask mask.png --prompt "Replace the dog with a cat" --model-root models --out outputs/one
    python edit_images.py evaluate --dataset data/test.json --model-root models --checkpoint ... --out outputs/eval
    python edit_images.py tiny-model --out models_tiny

`python edit_images.py <command> --help` lists every flag; docs/editing.md describes inputs and outputs.
"""
import sys


def main(argv: list[str]) -> int:
    from diffsynth_edit.editing.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
