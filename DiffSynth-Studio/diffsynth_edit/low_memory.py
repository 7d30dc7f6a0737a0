"""The low-memory tier in one call: fp8 base weights (`fp8_base`) and swapped blocks (`block_swap`).

`apply_low_memory(dit, cfg, device, pipe)` takes a DiT loaded on the host (or already on the device). It moves the
DiT to `device` one block at a time, and each block's linears are quantised on the device as the block arrives, so
the card never holds more than one bf16 block. The last `blocks_to_swap` blocks keep their frozen tensors in pinned
host memory; everything else moves to the device. With `pipe`, the pipeline's VAE and text encoder move too, except
the text encoder's last `text_encoder_blocks_to_swap` decoder layers (editing: the 7 B text encoder and the fp8 DiT
do not fit 24 GiB together). In training, inject the LoRA before this call: its A/B are trainables and stay on the
device. In the editor, call it after the `Editor` is built (the hot-swap wrappers then exist) and before LoRAs load.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .block_swap import BlockSwapper
from .config import ConfigError
from .fp8_base import frozen_linears, to_fp8_linear


@dataclass
class LowMemoryOptions:
    """The editor's and the app's low-memory flags (training has `fp8_base` / `blocks_to_swap` in TrainConfig)."""

    fp8_base: bool = field(default=False, metadata={"help": (
        "store the DiT blocks' linear weights in fp8 (e4m3, per-row scales) and compute in bf16: half the DiT's "
        "memory, weights rounded to 3 mantissa bits; LoRAs run beside them (hot swap)")})
    blocks_to_swap: int = field(default=0, metadata={"help": (
        "keep the last N of the DiT's 60 blocks in pinned host memory, each copied to the GPU one block ahead of "
        "use")})
    text_encoder_blocks_to_swap: int = field(default=0, metadata={"help": (
        "the same for the last N of the text encoder's 28 decoder layers (24 GiB cards: 24)")})


def low_memory_enabled(cfg) -> bool:
    return bool(getattr(cfg, "fp8_base", False) or getattr(cfg, "blocks_to_swap", 0)
                or getattr(cfg, "text_encoder_blocks_to_swap", 0))


def check_low_memory_flags(blocks_to_swap: int, n_blocks: int | None = None, flag: str = "--blocks-to-swap") -> None:
    """One-line errors naming the flag for values the model cannot take."""
    if not isinstance(blocks_to_swap, int) or isinstance(blocks_to_swap, bool) or blocks_to_swap < 0:
        raise ConfigError(f"{flag} must be an integer ≥ 0, got {blocks_to_swap!r}")
    if n_blocks is not None and blocks_to_swap >= n_blocks:
        raise ConfigError(f"{flag} {blocks_to_swap}: the model has {n_blocks} blocks; swap at most "
                          f"{n_blocks - 1} (one block stays resident)")


def _text_encoder_layers(text_encoder: torch.nn.Module) -> torch.nn.ModuleList:
    return text_encoder.model.language_model.layers


def several_processes() -> bool:
    """Whether this process is one of several (torch.distributed initialised with world size > 1)."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def apply_low_memory(dit: torch.nn.Module, cfg, device: torch.device | str, pipe=None) -> BlockSwapper | None:
    """fp8 storage for the frozen block linears (when `cfg.fp8_base`) and host-resident last `cfg.blocks_to_swap`
    blocks, the whole DiT on `device` otherwise. `pipe` (loaded on the host with the DiT): its VAE and text encoder
    move to `device` too (`cfg.text_encoder_blocks_to_swap` of its layers stay on the host), and it computes there.
    Returns the DiT's swapper (None without swapping)."""
    fp8, n_swap = bool(getattr(cfg, "fp8_base", False)), getattr(cfg, "blocks_to_swap", 0)
    n_te = getattr(cfg, "text_encoder_blocks_to_swap", 0)
    blocks = dit.transformer_blocks
    check_low_memory_flags(n_swap, len(blocks))
    if getattr(cfg, "fp8", False):
        raise ConfigError("--fp8 (fp8 matmuls) does not combine with the low-memory flags; use --fp8-base (fp8 "
                          "storage) with --blocks-to-swap / --text-encoder-blocks-to-swap")
    if n_swap and (getattr(cfg, "compile", False) or getattr(cfg, "compile_blocks", False)):
        raise ConfigError("--blocks-to-swap does not combine with --compile (the swap runs in the blocks' forward "
                          "hooks); turn one off")
    if several_processes():
        raise ConfigError("--fp8-base / --blocks-to-swap are single-process modes (DDP would broadcast the fp8 "
                          "buffers every step and the swapped placeholders differ per rank); run one process")
    device = torch.device(device)
    for block in blocks:
        block.to(device)
        if fp8:
            for _, layer in frozen_linears(block):
                to_fp8_linear(layer)
    for name, child in dit.named_children():
        if name != "transformer_blocks":
            child.to(device)
    if pipe is not None:
        place_encoders(pipe, n_te, device)
    swapper = BlockSwapper.attach(dit, n_swap, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return swapper


def place_encoders(pipe, n_te: int, device: torch.device | str) -> None:
    """The text encoder (its last `n_te` decoder layers swapped) and the VAE on `device` (phase 1, the editor)."""
    device = torch.device(device)
    te = getattr(pipe, "text_encoder", None)
    if te is not None:
        layers = _text_encoder_layers(te)
        check_low_memory_flags(n_te, len(layers), flag="--text-encoder-blocks-to-swap")
        BlockSwapper.attach(te, n_te, device, blocks=layers)  # placeholders already on `device`
        te.to(device)
    elif n_te:
        raise ConfigError("--text-encoder-blocks-to-swap: this pipeline has no text encoder")
    if getattr(pipe, "vae", None) is not None:
        pipe.vae.to(device)
    pipe.device = str(device)
