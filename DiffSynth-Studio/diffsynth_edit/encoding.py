"""Prompt and image encoding shared by the editor and the cache (one implementation, so they cannot drift).

Prompts use the multi-image template ("Picture i: <image>") with references resized to about 384² for the
Qwen2.5-VL encoder (upstream's `encode_prompt_edit_multi`); images are VAE-encoded at their own (≤ 1 MP, 16-aligned)
size. The negative prompt is the empty string encoded with the same images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

_EMBEDDER = None


def _embedder():
    global _EMBEDDER
    if _EMBEDDER is None:
        from diffsynth.pipelines.qwen_image import QwenImageUnit_PromptEmbedder

        _EMBEDDER = QwenImageUnit_PromptEmbedder()
    return _EMBEDDER


@torch.no_grad()
def encode_prompt(pipe, prompt: str, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding [1, L, D] in the pipeline dtype, mask [1, L] long) for one prompt with its reference images."""
    if pipe.text_encoder is None or pipe.processor is None:
        raise RuntimeError("prompt encoding needs the text encoder and the processor loaded")
    hidden = _embedder().encode_prompt_edit_multi(pipe, [prompt], list(images))[0]
    emb = hidden.unsqueeze(0).to(dtype=pipe.torch_dtype)
    mask = torch.ones(1, emb.shape[1], dtype=torch.long, device=emb.device)
    return emb, mask


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32))
    return arr.permute(2, 0, 1) / 127.5 - 1.0


@torch.no_grad()
def vae_encode(pipe, images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """Latents [1, 16, H/8, W/8] per image; images of the same size are encoded in one batch."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    for idx in groups.values():
        batch = torch.stack([image_to_tensor(images[i]) for i in idx]).to(device=pipe.device, dtype=pipe.torch_dtype)
        lat = pipe.vae.encode(batch)
        for j, i in enumerate(idx):
            out[i] = lat[j:j + 1]
    return out  # type: ignore[return-value]


@torch.no_grad()
def vae_decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images from [B, 16, h, w] latents."""
    x = pipe.vae.decode(latents.to(device=pipe.device, dtype=pipe.torch_dtype))
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


@torch.no_grad()
def white_latents(pipe, width: int, height: int) -> torch.Tensor:
    """VAE latents of a pure white image (the LBM sub-stream start)."""
    return vae_encode(pipe, [Image.new("RGB", (width, height), (255, 255, 255))])[0]


def pad_prompts(embs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [1, Li, D] embeddings into [B, max L, D] with zero padding and a 0/1 mask."""
    length = max(e.shape[1] for e in embs)
    out_e, out_m = [], []
    for e, m in zip(embs, masks):
        pad = length - e.shape[1]
        out_e.append(torch.nn.functional.pad(e, (0, 0, 0, pad)))
        out_m.append(torch.nn.functional.pad(m, (0, pad)))
    return torch.cat(out_e), torch.cat(out_m)
