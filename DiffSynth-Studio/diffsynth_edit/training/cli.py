"""`train_2511.py train|export` and `train_lbm.py`: argument parsing only; the work is in loop.py/export.py."""
from __future__ import annotations

import os
import sys

from ..config import ConfigError, parse_config
from .config import TrainConfig


def main_train(argv: list[str] | None = None, objective: str | None = None, prog: str = "train_2511.py train") -> int:
    cfg = parse_config(TrainConfig, argv, prog=prog, section="train",
                       description="Phase 2: train LoRA (+ STE) from a phase-1 cache")
    if objective is not None and cfg.objective != objective:
        cfg.objective = objective
    if os.environ.get("WANDB_NAME") and cfg.run_name == "run":
        cfg.run_name = os.environ["WANDB_NAME"]
    from ..cache.store import CacheError
    from ..checkpoint import CheckpointError
    from ..loading import MissingWeightsError
    from ..variants import VariantMismatchError
    from .faults import TrainingError, TrainingStopped
    from .loop import train
    from .state_io import StateFileError

    try:
        train(cfg)
    except (TrainingError, CacheError, CheckpointError, MissingWeightsError, VariantMismatchError, ConfigError,
            StateFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(str(e), file=sys.stderr)
        return e.exit_code
    return 0


def main_lbm(argv: list[str] | None = None) -> int:
    return main_train(argv, objective="lbm", prog="train_lbm.py")


def main_export(argv: list[str] | None = None) -> int:
    import argparse

    from .export import export_checkpoint

    p = argparse.ArgumentParser(prog="train_2511.py export",
                                description="Write a checkpoint's LoRA in ComfyUI/diffusers form")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["comfyui", "diffusers", "kohya"], default="comfyui")
    a = p.parse_args(argv)
    from pathlib import Path

    from ..checkpoint import CheckpointError

    if Path(a.out).resolve() == Path(a.checkpoint).resolve():
        print(f"error: --out {a.out} is the --checkpoint itself; the export would overwrite it (and drop its STE): "
              f"give another file", file=sys.stderr)
        return 2

    try:
        path, n = export_checkpoint(a.checkpoint, a.out, a.format)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {path}")
    return 0
