"""The low-memory tier in one call: fp8 base weights (`fp8_base`) and swapped blocks (`block_swap`).

`apply_low_memory(dit, cfg, device)` takes a DiT loaded on the host (or already on the device), moves it to `device`
one block at a time (each block's linears quantised on the device as it arrives, so the card never holds a bf16
block more than one at a time), leaves the last `blocks_to_swap` blocks' frozen tensors in pinned host memory, and
moves the rest. LoRA must be injected before: its A/B are trainables and stay on the device.
"""
from __future__ import annotations

import torch

from .block_swap import BlockSwapper
from .config import ConfigError
from .fp8_base import frozen_linears, to_fp8_linear


def low_memory_enabled(cfg) -> bool:
    return bool(getattr(cfg, "fp8_base", False) or getattr(cfg, "blocks_to_swap", 0))


def check_low_memory_flags(fp8_base: bool, blocks_to_swap: int, n_blocks: int | None = None) -> None:
    """One-line errors naming the flag for values the model cannot take."""
    if not isinstance(blocks_to_swap, int) or isinstance(blocks_to_swap, bool) or blocks_to_swap < 0:
        raise ConfigError(f"--blocks-to-swap must be an integer ≥ 0, got {blocks_to_swap!r}")
    if n_blocks is not None and blocks_to_swap >= n_blocks:
        raise ConfigError(f"--blocks-to-swap {blocks_to_swap}: the DiT has {n_blocks} blocks; swap at most "
                          f"{n_blocks - 1} (one block stays resident)")


def apply_low_memory(dit: torch.nn.Module, cfg, device: torch.device | str, pipe=None) -> BlockSwapper | None:
    """fp8 storage for the frozen block linears (when `cfg.fp8_base`) and host-resident last `cfg.blocks_to_swap`
    blocks, the whole DiT on `device` otherwise. `pipe` (loaded on the host with the DiT): its VAE and text encoder
    move to `device` too, and it computes there. Returns the swapper (None without swapping)."""
    fp8, n_swap = bool(getattr(cfg, "fp8_base", False)), int(getattr(cfg, "blocks_to_swap", 0))
    blocks = dit.transformer_blocks
    check_low_memory_flags(fp8, n_swap, len(blocks))
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
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
        for name in ("vae", "text_encoder"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)
        pipe.device = str(device)
    if not n_swap:
        return None
    swapper = BlockSwapper.attach(dit, n_swap, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return swapper

