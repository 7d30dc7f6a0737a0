"""Entry points behind `python train_2511.py cache` and `python train_2511.py verify`.

    python train_2511.py cache --preset configs/cache_2511.toml --dataset data/train.json --cache-dir data/cache
    accelerate launch --num_processes 8 train_2511.py cache --preset configs/cache_2511.toml ...   # 8 GPUs
    python train_2511.py verify --cache-dir data/cache
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def main_cache(argv: Sequence[str] | None = None) -> int:
    from ..config import parse_config
    from ..loading import MissingWeightsError
    from ..variants import VariantMismatchError
    from .config import CacheConfig, CacheRunError
    from .encode import run_cache

    from ..lifetime import EXIT_CODES, Terminated, sigterm_raises
    from ..output_errors import OutputWriteError
    from .workers import _shutdown_pool

    cfg = parse_config(CacheConfig, argv, prog="train_2511.py cache", section="cache",
                       description="Encode a dataset (text encoder + VAE, never the DiT) into a resumable cache.")
    try:
        with sigterm_raises():
            summary = run_cache(cfg)
    except (VariantMismatchError, CacheRunError, MissingWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:
        _shutdown_pool(kill=True)
        print(f"error: {e}; the files written so far are kept: make room (or make {cfg.cache_dir} writable) and run "
              f"the same command again to finish the cache", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as e:
        _shutdown_pool(kill=True)
        name, shown = ("SIGTERM", "SIGTERM") if isinstance(e, Terminated) else ("SIGINT", "SIGINT (Ctrl-C)")
        print(f"error: stopped by {shown}; the files written so far are kept: run the same command again to finish "
              f"the cache", file=sys.stderr)
        return EXIT_CODES[name]
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(summary.format())
    if summary.failed and not cfg.allow_failures:
        return 1
    return 0


def main_verify(argv: Sequence[str] | None = None) -> int:
    from .verify import verify_cache

    parser = argparse.ArgumentParser(prog="train_2511.py verify",
                                     description="Load every cache entry and check keys, shapes, dtypes, finiteness.")
    parser.add_argument("--cache-dir", required=True, help="folder made by `train_2511.py cache`")
    parser.add_argument("--progress", action="store_true", help="tqdm progress bar")
    args = parser.parse_args(argv)
    report = verify_cache(args.cache_dir, progress=args.progress)
    print(report.format())
    return 0 if report.ok else 1
