"""The app's configuration: one dataclass, a TOML preset (`configs/app.toml`, section `[app]`) and CLI flags.

Every field is a `--kebab-case` flag (see `python app_gradio.py --help`); `--checkpoint-root` may be repeated.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from ..config import ConfigError, ModelPathOptions, add_config_flags, build_config, load_preset
from ..low_memory import LowMemoryOptions

DEFAULT_PORT = 7999


def _help(text: str):
    return {"help": text}


@dataclass
class AppConfig(ModelPathOptions, LowMemoryOptions):
    # serving
    host: str | None = field(default=None, metadata=_help(
        "interface to bind (default 127.0.0.1: this machine only; give 0.0.0.0 to serve the network)"))
    port: int = field(default=DEFAULT_PORT, metadata=_help("port (default 7999)"))
    auth_file: Path | None = field(default=None, metadata=_help(
        "login for the page and API: a file of `user:password` lines (or set QWEN_EDIT_APP_AUTH=user:password)"))
    share: bool = field(default=False, metadata=_help("open a public gradio.live link (needs the internet)"))
    # model
    tiny: bool = field(default=False, metadata=_help("run on the tiny random model (demo and tests)"))
    tiny_root: Path = field(default=Path("models/tiny"), metadata=_help("where the tiny model is written/cached"))
    tiny_fallback: bool = field(default=True, metadata=_help(
        "when no weights are found, fall back to the tiny model with a notice instead of exiting"))
    variant: str = field(default="2511", metadata=_help("2511 or 2509"))
    model_root: Path | None = field(default=Path("models"), metadata=_help(
        "folder in the hub layout (models/Qwen/Qwen-Image-Edit-2511/transformer/...)"))
    device: str = field(default="auto", metadata=_help("auto (cuda if available), cuda, cuda:N or cpu"))
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(default="auto", metadata=_help(
        "auto: bf16 on cuda, fp32 on cpu"))
    dit_activation: Literal["auto", "gelu-tanh", "sigmoid-1.702"] = field(default="auto", metadata=_help(
        "DiT MLP activation: auto = each checkpoint's (its metadata; older workspace checkpoints: sigmoid-1.702, "
        "other LoRAs: gelu-tanh), gelu-tanh (the released model's) without one; or force one"))
    # checkpoints
    checkpoint_root: list[Path] = field(default_factory=lambda: [Path("train")], metadata=_help(
        "folder searched for *.safetensors checkpoints; repeat the flag for several (default train/)"))
    checkpoint: str = field(default="", metadata=_help("checkpoint selected at start (path relative to a root)"))
    # limits and defaults
    max_upload_pixels: int = field(default=4096 * 4096, metadata=_help(
        "uploads above this many pixels are downscaled (with a notice)"))
    max_file_mb: int = field(default=100, metadata=_help("largest upload in MB (refused by the server above)"))
    max_pixels: int = field(default=1024 * 1024, metadata=_help("working resolution of an edit (pixels)"))
    max_references: int = field(default=3, metadata=_help("extra reference images accepted"))
    max_extra_loras: int = field(default=3, metadata=_help(
        "third-party LoRAs (from the checkpoint roots) that can be stacked on the checkpoint, each with a strength"))
    max_steps: int = field(default=100, metadata=_help("upper bound for flow-matching steps"))
    steps: int = field(default=40, metadata=_help("default flow-matching steps"))
    cfg_scale: float = field(default=4.0, metadata=_help("default CFG scale"))
    lbm_steps: int = field(default=4, metadata=_help("default LBM steps (1-4)"))
    queue_size: int = field(default=64, metadata=_help("longest generation queue"))
    compile: bool = field(default=False, metadata=_help(
        "CUDA: torch.compile each DiT/STE block (the first edit at a new size compiles, ~1 min)"))
    fp8: bool = field(default=False, metadata=_help(
        "CUDA, Ada/Hopper: fp8 matmuls in the DiT blocks (approximate; LoRAs hot-load beside them)"))
    fp8_fast_accum: bool = field(default=False, metadata=_help(
        "with `fp8`: Hopper's fast fp8 accumulation (measured on an H100: a 40-step edit 8 % faster, the same error "
        "against an fp32 forward as plain fp8)"))
    fp8_keep_bf16: list[str] = field(default_factory=list, metadata=_help(
        "with `fp8`: DiT block linears left in bf16, e.g. img_mlp.net.0.proj (the one that carries the most fp8 "
        "error: a quarter less error for 8 % more forward time, H200)"))

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"`port` must be in 1..65535, got {self.port}")
        if self.variant not in ("2511", "2509"):
            raise ConfigError(f"`variant` must be 2511 or 2509, got {self.variant!r}")
        if not self.checkpoint_root:
            raise ConfigError("give at least one `checkpoint-root`")
        if self.max_upload_pixels < 64 * 64:
            raise ConfigError("`max-upload-pixels` must be at least 4096")
        if self.max_file_mb < 1:
            raise ConfigError(f"`max-file-mb` must be at least 1, got {self.max_file_mb}")
        if self.max_pixels < 256:
            raise ConfigError("`max-pixels` must be at least 256")
        if not 0 <= self.max_extra_loras <= 16:
            raise ConfigError("`max-extra-loras` must be in 0..16")
        from ..limits import LBM_MAX_STEPS

        if not 1 <= self.lbm_steps <= LBM_MAX_STEPS:
            raise ConfigError(f"`lbm-steps` must be in 1..{LBM_MAX_STEPS}")
        if not 1 <= self.steps <= self.max_steps:
            raise ConfigError(f"`steps` must be in 1..{self.max_steps}")
        if self.fp8_fast_accum and not self.fp8:
            raise ConfigError("`fp8-fast-accum` changes how the fp8 matmuls accumulate: it needs `fp8`")
        from ..editing.options import validate_fp8_keep_bf16

        validate_fp8_keep_bf16(self.fp8_keep_bf16, self.fp8, "`fp8-keep-bf16`", "`fp8`")

    @property
    def bind_host(self) -> str:
        """Loopback unless a host is given; `--share` tunnels to the loopback server, so it needs no wider bind."""
        return self.host or "127.0.0.1"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Mask-guided Qwen-Image-Edit app (gradio).")
    parser.add_argument("--preset", default=None, help="TOML preset (values under [app] or at top level)")
    add_config_flags(parser, AppConfig)
    return parser


def parse_app_config(argv: Sequence[str] | None = None, prog: str | None = None) -> AppConfig:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "preset" and v is not None}
    try:
        return build_config(AppConfig, load_preset(args.preset, "app"), overrides,
                            source=f"preset {args.preset}" if args.preset else "preset")
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
