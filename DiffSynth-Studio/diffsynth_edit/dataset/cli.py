"""Command line of `generate_dataset_json_mp.py`: build / validate / sample-data (one dataclass per command,
`--preset FILE.toml` plus one `--kebab-case` flag per field; the CLI wins over the preset)."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence, TypeVar

from ..config import ConfigError, add_config_flags, build_config, load_preset

T = TypeVar("T")

USAGE = """usage:
  generate_dataset_json_mp.py build --source-dir DIR --target-dir DIR [--mask-dir DIR] [--ref-dir DIR]
                                    [--instructions FILE | --instruction TEXT] --out data/mydataset.json [...]
  generate_dataset_json_mp.py build --samples-dir DIR --out data/mydataset.json [...]
  generate_dataset_json_mp.py validate data/mydataset.json [--base-path DIR]
  generate_dataset_json_mp.py sample-data --out data/raw_sample [--count 16 --size 64 --seed 0 --family objects]
Each command's --help lists its flags; docs/dataset.md describes inputs and outputs."""


def _parse(cls: type[T], argv: Sequence[str], prog: str, section: str, positional: str | None = None) -> T:
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    parser.add_argument("--preset", default=None, help="TOML preset; CLI flags override it")
    if positional:
        parser.add_argument("_positional", nargs="?", default=None, metavar=positional.upper(),
                            help=f"same as --{positional.replace('_', '-')}")
    add_config_flags(parser, cls)
    args = parser.parse_args(list(argv))
    values = vars(args)
    pos = values.pop("_positional", None)
    preset = values.pop("preset")
    overrides = {k: v for k, v in values.items() if v is not None}
    if pos is not None:
        if positional in overrides:
            parser.error(f"give the {positional} once")
        overrides[positional] = pos
    try:
        return build_config(cls, load_preset(preset, section), overrides,
                            source=f"preset {preset}" if preset else "preset")
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def main_build(argv: Sequence[str]) -> int:
    from ..lifetime import EXIT_CODES
    from ..output_errors import OutputWriteError
    from .build_config import BuildConfig
    from .builder import build_dataset

    cfg = _parse(BuildConfig, argv, "generate_dataset_json_mp.py build", "build")
    try:
        summary = build_dataset(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:
        print(f"error: {e}; stopped: {cfg.out} and its report were not changed (samples already finished are "
              f"reused by the next run)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: stopped by SIGINT (Ctrl-C): {cfg.out} and its report were not changed (samples already "
              f"finished are reused by the next run)", file=sys.stderr)
        return EXIT_CODES["SIGINT"]
    print(summary.format())
    if not summary.records:
        print("error: no sample was written", file=sys.stderr)
    elif summary.lost:
        print(f"error: {len(summary.lost)} sample(s) not built because their worker process died: "
              + ", ".join(p.id or "?" for p in summary.lost[:10]) + (" ..." if len(summary.lost) > 10 else "")
              + "; the others are written; run the same command again to build them", file=sys.stderr)
    elif cfg.strict and summary.errors:
        print(f"error: --strict and {len(summary.errors)} bad inputs", file=sys.stderr)
    return summary.exit_code(cfg.strict)


def main_validate(argv: Sequence[str]) -> int:
    from .validate import ValidateConfig, validate_dataset

    cfg = _parse(ValidateConfig, argv, "generate_dataset_json_mp.py validate", "validate", positional="dataset")
    report = validate_dataset(cfg.dataset, cfg.base_path, cfg.workers, cfg.swap_check, cfg.progress)
    print(report.format(cfg.max_problems))
    return 0 if report.ok(cfg.strict) else 1


def main_sample_data(argv: Sequence[str]) -> int:
    from .synthetic import SampleDataConfig, make_sample_data

    cfg = _parse(SampleDataConfig, argv, "generate_dataset_json_mp.py sample-data", "sample_data")
    data = make_sample_data(cfg.out, cfg.count, cfg.size, cfg.seed, cfg.layout, cfg.format, family=cfg.family)
    print(f"wrote {len(data.stems)} synthetic {cfg.family} samples ({cfg.size}x{cfg.size}, {cfg.layout} layout) "
          f"to {data.root}")
    print("build it with:\n  python generate_dataset_json_mp.py build " + " ".join(data.build_args())
          + f" --out {data.root.parent / (data.root.name + '.json')}")
    return 0


COMMANDS = {"build": main_build, "validate": main_validate, "sample-data": main_sample_data}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(COMMANDS[argv[0]](argv[1:]) or 0)
