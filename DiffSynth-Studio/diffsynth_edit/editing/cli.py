"""Command line of `edit_images.py`: batch editing, evaluation and the tiny test model.

    edit_images.py edit --dataset data/test.json --model-root models --checkpoint run/step-1000.safetensors --out out/
    edit_images.py edit --image in.png --mask mask.png --prompt "..." --model-root models --out out/
    edit_images.py evaluate --dataset data/test.json --model-root models --checkpoint ... --out eval/
    edit_images.py tiny-model --out models_tiny

Each command is one dataclass (`--preset FILE.toml` plus one `--kebab-case` flag per field, the CLI wins).
Outputs are `<out>/<id>.png` (the edited image), `<out>/<id>_sub.png` (the sub stream, bridge mode only) and
`<out>/<id>.json` (settings, input notices and a settings fingerprint), each written atomically; a re-run reuses a
sample only when its outputs exist and were made with the same settings, checkpoint and inputs (see `reuse`), and
redoes the others (`--overwrite` redoes all). docs/editing.md has the details.

The options are in `options.py`, batch edits in `batch.py`, the evaluation in `evaluate_run.py`.
"""
from __future__ import annotations

import sys
from typing import Sequence

from ..config import ConfigError, parse_config
from .batch import run_edit
from .evaluate_run import run_evaluate
from .options import EditConfig, EvaluateConfig, TinyModelConfig

USAGE = """usage:
  edit_images.py edit (--dataset FILE.json | --image IMG --prompt TEXT [--mask MASK]) --out DIR [model/sampler flags]
  edit_images.py evaluate --dataset FILE.json --out DIR [model/sampler flags]
  edit_images.py tiny-model --out DIR
Run `edit_images.py <command> --help` for every flag; docs/editing.md describes inputs and outputs."""


def run_tiny_model(cfg: TinyModelConfig, log=print) -> int:
    from ..tiny import write_tiny_model

    root = write_tiny_model(cfg.out, seed=cfg.seed)
    log(f"tiny model in {root}; use it with --model-root {root}")
    return 0


COMMANDS = {
    "edit": (EditConfig, run_edit),
    "evaluate": (EvaluateConfig, run_evaluate),
    "tiny-model": (TinyModelConfig, run_tiny_model),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    cls, run = COMMANDS[command]
    cfg = parse_config(cls, rest, prog=f"edit_images.py {command}", section=command.replace("-", "_"),
                       description=(cls.__doc__ or "").strip())
    from ..checkpoint import CheckpointError
    from ..loading import MissingWeightsError

    try:
        return run(cfg)
    except (ConfigError, CheckpointError, MissingWeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # dataset format errors name the file, entry and key
        print(f"error: {e}", file=sys.stderr)
        return 2
