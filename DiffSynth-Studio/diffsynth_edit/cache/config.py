"""The cache run's configuration (`CacheConfig`: TOML preset + flags) and its start-up error."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..config import ModelPathOptions
from ..variants import get_variant

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class CacheRunError(RuntimeError):
    """The cache run cannot start (bad dataset, other variant, ...); the message says why."""


@dataclass
class CacheConfig(ModelPathOptions):
    dataset: Path | None = field(default=None, metadata={"help": "dataset JSON/JSONL (required)"})
    base_path: Path | None = field(default=None, metadata={"help": "folder the dataset's paths are relative to "
                                                                   "(default: the JSON's folder)"})
    cache_dir: Path = field(default=Path("data/cache"), metadata={"help": "output folder (one per dataset, variant "
                                                                         "and resolution policy)"})
    variant: str = field(default="2511", metadata={"help": "2511 or 2509 (recorded in the manifest)"})
    dit_path: Path | None = field(default=None, metadata={"help": "accepted for preset symmetry; the DiT is never "
                                                                  "loaded by the cache"})
    max_pixels: int = field(default=1024 * 1024, metadata={"help": "images are scaled down to at most this many "
                                                                   "pixels, sides multiples of 16"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda, cuda:N or cpu"})
    dtype: Literal["bf16", "fp16", "fp32"] = field(default="bf16", metadata={"help": "model and cache dtype"})
    text_encoder_blocks_to_swap: int = field(default=0, metadata={"help": (
        "keep the last N of the text encoder's 28 decoder layers in pinned host memory, each copied to the GPU one "
        "layer ahead of use (small cards)")})
    batch_size: int = field(default=4, metadata={"help": "samples per device batch (one text-encoder call) and "
                                                          "images per VAE call (same-shape images only)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N samples (no pruning)"})
    num_workers: int = field(default=4, metadata={"help": "workers reading/resizing images (and hashing threads)"})
    workers: Literal["auto", "process", "thread"] = field(default="auto", metadata={
        "help": "image preparation in worker processes (no GIL contention with the device loop) or threads; "
                "auto: processes on CUDA, threads on CPU"})
    fsync: bool = field(default=True, metadata={"help": "fsync each sample file before its rename (power-loss "
                                                        "safety; the rename alone already survives a killed run)"})
    cudnn_benchmark: bool = field(default=False, metadata={"help": "cudnn.benchmark for the VAE (re-tunes for "
                                                                   "every new sub-crop shape: off by default)"})
    compile_vae: bool = field(default=False, metadata={"help": "torch.compile the VAE encoder on CUDA (~2x faster "
                                                                "per image, but most new image or sub-crop sizes "
                                                                "compile again: only for datasets of few sizes; "
                                                                "falls back to eager with a message if compiling "
                                                                "fails)"})
    prune: bool = field(default=True, metadata={"help": "remove cache files no sample of this dataset maps to"})
    allow_failures: bool = field(default=False, metadata={"help": "exit 0 even when some samples failed"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})
    manifest_every: float = field(default=60.0, metadata={"help": "seconds between incremental manifest writes"})

    def validate(self) -> None:
        from ..config import ConfigError

        if self.dataset is None:
            raise ConfigError("`dataset` is required (a dataset JSON/JSONL)")
        try:
            get_variant(self.variant)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.variant = get_variant(self.variant).name
        if self.max_pixels < 256:
            raise ConfigError("`max_pixels` must be at least 256")
        if not isinstance(self.text_encoder_blocks_to_swap, int) or self.text_encoder_blocks_to_swap < 0:
            raise ConfigError(f"--text-encoder-blocks-to-swap must be an integer ≥ 0, got "
                              f"{self.text_encoder_blocks_to_swap!r}")
        if self.batch_size < 1:
            raise ConfigError("`batch_size` must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("`limit` must be at least 1")
        if self.num_workers < 1:
            raise ConfigError("`num_workers` must be at least 1")
        if self.workers not in ("auto", "process", "thread"):
            raise ConfigError(f"`workers` must be auto, process or thread, not {self.workers!r}")

    def sources(self):
        return self.model_sources(self.variant)
