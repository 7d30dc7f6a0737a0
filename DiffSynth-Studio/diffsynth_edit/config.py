"""Typed configuration: one dataclass per command, built from an optional TOML preset plus CLI overrides.

Every dataclass field becomes a `--kebab-case` flag; the preset supplies defaults; the CLI wins. The built object is
passed down; nothing below the entry point parses arguments again.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A preset or flag is wrong; the message names it."""


@dataclasses.dataclass
class ModelPathOptions:
    """Where the weights are: the fields shared by the configs that load the encoders (cache, editor CLI, app)."""

    model_root: Path | None = dataclasses.field(default=None, metadata={
        "help": "local model folder in the hub layout (<root>/Qwen/Qwen-Image-Edit-2511/transformer/...)"})
    dit_path: Path | None = dataclasses.field(default=None, metadata={
        "help": "DiT weights (file or folder); overrides model_root"})
    text_encoder_path: Path | None = dataclasses.field(default=None, metadata={
        "help": "text encoder weights (file or folder)"})
    vae_path: Path | None = dataclasses.field(default=None, metadata={"help": "VAE weights file"})
    tokenizer_path: Path | None = dataclasses.field(default=None, metadata={"help": "tokenizer folder"})
    processor_path: Path | None = dataclasses.field(default=None, metadata={"help": "processor folder"})
    allow_download: bool = dataclasses.field(default=False, metadata={
        "help": "let diffsynth download missing weights"})

    def model_sources(self, variant: str):
        """`loading.ModelSources` of these paths for `variant`."""
        from .loading import ModelSources

        return ModelSources(variant=variant, model_root=self.model_root, dit_path=self.dit_path,
                            text_encoder_path=self.text_encoder_path, vae_path=self.vae_path,
                            tokenizer_path=self.tokenizer_path, processor_path=self.processor_path,
                            allow_download=self.allow_download)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None`/Optional[X]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(name: str, tp: Any, value: Any) -> Any:
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"`{name}` may not be empty")
    if optional and isinstance(value, str) and value.lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if inner in (int, float, str):
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return inner(value)
        if inner is Path:
            return Path(value)
        if origin in (list, tuple):
            (elem,) = typing.get_args(inner)[:1] or (str,)
            values = value if isinstance(value, (list, tuple)) else [value]
            # Repeated flags (`--x a --x b`) and comma lists (`--x a,b`) both work, also mixed.
            items = [piece for v in values for piece in (v.split(",") if isinstance(v, str) else [v]) if
                     not isinstance(piece, str) or piece.strip()]
            out = [_convert(name, elem, v.strip() if isinstance(v, str) else v) for v in items]
            return tuple(out) if origin is tuple else out
        if typing.get_origin(inner) is typing.Literal:
            choices = typing.get_args(inner)
            if value not in choices:
                raise ConfigError(f"`{name}` must be one of {', '.join(map(str, choices))}, got {value!r}")
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"`{name}` expects {getattr(inner, '__name__', inner)}, got {value!r}") from None
    return value


# The preset tables of every command (a preset may hold several; each command reads its own).
PRESET_SECTIONS = frozenset({"train", "cache", "app", "edit", "evaluate", "tiny_model", "build", "validate",
                             "sample_data"})


def load_preset(path: Path | str | None, section: str | None = None) -> dict[str, Any]:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preset {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"preset {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"preset {path} cannot be read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {path} is not valid TOML: {e}") from None
    stray = [k for k, v in data.items() if isinstance(v, dict) and k != section and k not in PRESET_SECTIONS]
    if stray:
        reads = f"top-level keys and [{section}]" if section else "top-level keys"
        raise ConfigError(f"preset {path}: unknown table [{stray[0]}] (this command reads {reads}; tables of the "
                          f"other commands are {', '.join(f'[{s}]' for s in sorted(PRESET_SECTIONS))})")
    if section is not None and section in data and isinstance(data[section], dict):
        merged = {k: v for k, v in data.items() if not isinstance(v, dict)}
        merged.update(data[section])
        return merged
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def build_config(cls: type[T], preset: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 source: str = "preset") -> T:
    """Instantiate `cls` from preset values, then overrides; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for origin, mapping in ((source, preset or {}), ("command line", overrides or {})):
        for key, value in mapping.items():
            name = key.replace("-", "_")
            if name not in fields:
                close = [f for f in fields if f.startswith(name[:4])]
                hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
                raise ConfigError(f"unknown setting `{key}` in {origin}{hint}")
            values[name] = _convert(key, hints[name], value)
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--kebab-name` flag per field; values stay strings and are converted by build_config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help strings with %
        if inner is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", default=None, metavar="BOOL", help=help_text)
        elif typing.get_origin(inner) in (list, tuple):
            parser.add_argument(flag, dest=f.name, action="append", default=None,
                                help=(help_text + " " if help_text else "") + "(repeat the flag or use commas)")
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
                 section: str | None = None, description: str | None = None) -> T:
    """argparse front-end: `--preset FILE.toml` plus one flag per field."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--preset", default=None, help="TOML preset; CLI flags override it")
    add_config_flags(parser, cls)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "preset" and v is not None}
    try:
        return build_config(cls, load_preset(args.preset, section), overrides,
                            source=f"preset {args.preset}" if args.preset else "preset")
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
    return out


def die(message: str, code: int = 2) -> typing.NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
