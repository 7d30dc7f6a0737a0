"""The build's configuration (`BuildConfig`: TOML preset + flags), where its outputs go (`OutputLayout`) and what a
worker needs (`BuildSettings`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError
from .schema import DEFAULT_PROMPT_TEMPLATE, relative_path

BUILDER_VERSION = 1


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class BuildConfig:
    """`generate_dataset_json_mp.py build`: raw folders -> dataset JSON (see docs/dataset.md)."""

    out: Path | None = field(default=None, metadata=_h("dataset JSON to write, e.g. data/mydataset.json (required)"))
    source_dir: Path | None = field(default=None, metadata=_h("folder of source images (paired layout)"))
    target_dir: Path | None = field(default=None, metadata=_h("folder of target images, matched by stem"))
    mask_dir: Path | None = field(default=None, metadata=_h("optional folder of masks (white = edited)"))
    ref_dir: Path | None = field(default=None, metadata=_h("optional folder of extra references <stem>_1.png, ..."))
    samples_dir: Path | None = field(default=None, metadata=_h(
        "one folder per sample with source.*, target.*, optional mask.*, ref_<n>.*, prompt.txt"))
    instructions: Path | None = field(default=None, metadata=_h(
        "CSV or JSONL with `stem`, `instruction` (optional) and `edit_type` (optional)"))
    instruction: str | None = field(default=None, metadata=_h("one instruction for every sample without its own"))
    prompt_template: str = field(default=DEFAULT_PROMPT_TEMPLATE, metadata=_h(
        "prompt template; {instruction} is replaced (default 'Picture 1 is the image to modify. {instruction}'); "
        "the result always starts with that prefix (prompts.edit_prompt, the rule the editor and app apply too)"))
    max_pixels: int = field(default=1024 * 1024, metadata=_h("resize to at most this many pixels (1048576)"))
    max_input_pixels: int = field(default=89_478_485, metadata=_h(
        "refuse (error too_large) an input image above this many pixels, read from its header before decoding; "
        "0 = no limit (89478485 = Pillow's decompression-bomb threshold)"))
    diff_threshold: int = field(default=24, metadata=_h(
        "derived masks: per-pixel max abs RGB difference (0-255) above which a pixel is edited (24)"))
    mask_dilation: int = field(default=2, metadata=_h("derived masks: dilation radius in px, square (2)"))
    fixed_source: bool = field(default=False, metadata=_h(
        "write a fixed source (source inside the mask, target outside) and use it as edit_image[0]"))
    min_mask_area: float = field(default=0.001, metadata=_h("drop samples whose mask covers less (0.001)"))
    max_mask_area: float = field(default=0.95, metadata=_h("drop samples whose mask covers more (0.95)"))
    max_bg_change: float = field(default=0.1, metadata=_h(
        "drop samples whose mean abs difference outside the mask (0..1) is above this; 1 disables (0.1)"))
    test_fraction: float = field(default=0.0, metadata=_h("fraction of samples for <name>_test.json (0 = no split)"))
    test_per_type: int = field(default=0, metadata=_h("N test samples per edit_type instead of a fraction"))
    seed: int = field(default=42, metadata=_h("split seed (42)"))
    jsonl: bool = field(default=False, metadata=_h("also write .jsonl files beside the .json files"))
    workers: int = field(default=0, metadata=_h("worker processes (0 = all cores)"))
    strict: bool = field(default=False, metadata=_h("exit 1 on any bad input"))
    force: bool = field(default=False, metadata=_h("rebuild every sample, ignoring up-to-date sidecars"))
    progress: bool = field(default=True, metadata=_h("show a progress bar"))
    compress_level: int = field(default=1, metadata=_h("PNG compression level of derived files, 0-9 (1 = fast)"))

    def validate(self) -> None:
        if self.out is None:
            raise ConfigError("`out` is required (the dataset JSON to write, e.g. data/mydataset.json)")
        if self.out.suffix.lower() != ".json":
            raise ConfigError(f"`out` must end in .json (got {self.out}); use --jsonl for JSONL copies")
        paired = self.source_dir is not None or self.target_dir is not None
        if paired and self.samples_dir is not None:
            raise ConfigError("give either --source-dir/--target-dir or --samples-dir, not both")
        if not paired and self.samples_dir is None:
            raise ConfigError("give --source-dir and --target-dir, or --samples-dir")
        if paired and (self.source_dir is None or self.target_dir is None):
            raise ConfigError("--source-dir and --target-dir go together")
        if self.samples_dir is not None and (self.mask_dir or self.ref_dir):
            raise ConfigError("--mask-dir/--ref-dir belong to the paired layout, not --samples-dir")
        for name in ("source_dir", "target_dir", "mask_dir", "ref_dir", "samples_dir"):
            p = getattr(self, name)
            if p is not None and not p.is_dir():
                raise ConfigError(f"`{name}` {p} is not a folder")
        if self.instructions is not None and not self.instructions.is_file():
            raise ConfigError(f"`instructions` {self.instructions} is not a file")
        if "{instruction}" not in self.prompt_template:
            raise ConfigError("`prompt_template` must contain {instruction}")
        if self.max_pixels < 256:
            raise ConfigError("`max_pixels` must be at least 256 (16x16)")
        if self.max_input_pixels < 0:
            raise ConfigError("`max_input_pixels` must be >= 0 (0 = no limit)")
        if not 0 <= self.diff_threshold <= 255:
            raise ConfigError("`diff_threshold` must be in 0..255")
        if self.mask_dilation < 0:
            raise ConfigError("`mask_dilation` must be >= 0")
        if not 0 <= self.min_mask_area <= self.max_mask_area <= 1:
            raise ConfigError("need 0 <= min_mask_area <= max_mask_area <= 1")
        if not 0 <= self.max_bg_change <= 1:
            raise ConfigError("`max_bg_change` must be in 0..1")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError("`test_fraction` must be in [0, 1)")
        if self.test_per_type < 0:
            raise ConfigError("`test_per_type` must be >= 0")
        if self.test_fraction and self.test_per_type:
            raise ConfigError("give --test-fraction or --test-per-type, not both")
        if self.workers < 0:
            raise ConfigError("`workers` must be >= 0 (0 = all cores)")
        if not 0 <= self.compress_level <= 9:
            raise ConfigError("`compress_level` must be in 0..9")


@dataclass(frozen=True)
class OutputLayout:
    """Where everything of one dataset goes, derived from the JSON path."""

    json_path: Path

    @property
    def base_dir(self) -> Path:
        return self.json_path.parent

    @property
    def name(self) -> str:
        return self.json_path.stem

    @property
    def files_dir(self) -> Path:
        return self.base_dir / f"{self.name}_files"

    @property
    def meta_dir(self) -> Path:
        return self.files_dir / "meta"

    @property
    def report_path(self) -> Path:
        return self.base_dir / f"{self.name}_report.json"

    def split_path(self, split: str, suffix: str = ".json") -> Path:
        return self.base_dir / f"{self.name}_{split}{suffix}"


@dataclass(frozen=True)
class BuildSettings:
    """What a worker needs (picklable)."""

    base_dir: Path
    files_dir: Path
    prompt_template: str
    max_pixels: int
    diff_threshold: int
    mask_dilation: int
    fixed_source: bool
    compress_level: int
    min_mask_area: float
    max_mask_area: float
    max_bg_change: float
    force: bool
    max_input_pixels: int = 0

    @property
    def meta_dir(self) -> Path:
        return self.files_dir / "meta"

    def key(self) -> str:
        """The settings that shape a sample's outputs (not the filter thresholds: see `sidecar`)."""
        return json.dumps([BUILDER_VERSION, relative_path(self.files_dir, self.base_dir), self.prompt_template,
                           self.max_pixels, self.diff_threshold, self.mask_dilation, self.fixed_source,
                           self.compress_level])

    @staticmethod
    def from_config(cfg: BuildConfig, layout: OutputLayout) -> "BuildSettings":
        return BuildSettings(layout.base_dir, layout.files_dir, cfg.prompt_template, cfg.max_pixels,
                             cfg.diff_threshold, cfg.mask_dilation, cfg.fixed_source, cfg.compress_level,
                             cfg.min_mask_area, cfg.max_mask_area, cfg.max_bg_change, cfg.force,
                             cfg.max_input_pixels)
