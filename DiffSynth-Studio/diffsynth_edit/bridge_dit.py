"""The DiT forward with the workspace's token layout.

Image stream `[main | sub | edit_1 ... edit_k]`, RoPE frame index 0 for main, 1 for sub, 2+ for edits (plain mode:
`[main | edit...]`, frames 0, 1+, exactly upstream's `model_fn_qwen_image`). With `zero_cond_t`, main and sub tokens
are modulated with t and edit tokens with t = 0; the text stream and the output norm use t. In bridge mode the STE
gate picks, per block and per sub token, its own RoPE (gate 1) or the main image's RoPE at the same bbox cell (gate
0). Batches of any size; each sample may have its own timestep, prompt length and sub box (sub sizes must agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from .speedups import real_rope
from .ste import STE

real_rope()  # the blocks take real (cos, sin) RoPE tables from this forward: same numbers, fusable by inductor


@dataclass
class DiTInputs:
    """One batched DiT call. Latents are [B, 16, H/8, W/8]; `timestep` is [B] or [1] on the 0..1000 scale."""

    latents: torch.Tensor
    timestep: torch.Tensor
    prompt_emb: torch.Tensor
    prompt_emb_mask: torch.Tensor
    edit_latents: Sequence[torch.Tensor] = ()
    sub_latents: torch.Tensor | None = None
    subyx: torch.Tensor | None = None  # [B, 4] (y1, y2, x1, x2) in token units (16 px)


def patchify(x: torch.Tensor) -> torch.Tensor:
    return rearrange(x, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2)


def unpatchify(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return rearrange(x, "B (H W) (C P Q) -> B C (H P) (W Q)", H=h, W=w, P=2, Q=2)


def _as_batch_timestep(timestep: torch.Tensor, batch: int) -> torch.Tensor:
    t = timestep.reshape(-1)
    if t.numel() == 1 and batch > 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep has {t.numel()} values for a batch of {batch}")
    return t


def swapped_sub_freqs(main_freqs: torch.Tensor, main_hw: tuple[int, int], subyx: torch.Tensor) -> torch.Tensor:
    """Per sample, the main image's RoPE on the sub box: [B, L_sub, D/2] (complex) or [B, L_sub, D/2, 2] (real)."""
    hm, wm = main_hw
    grid = main_freqs.unflatten(0, (hm, wm))
    return torch.stack([grid[y1:y2, x1:x2].flatten(0, 1) for y1, y2, x1, x2 in subyx.tolist()])


def _image_tokens(inputs: DiTInputs) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """The image stream before `img_in`: the patchified `[main | sub | edit...]` tokens [B, L, 64] and each part's
    (frame, height, width) in tokens, in that order (edit latents of batch 1 are shared by the batch). Refuses sub
    latents without boxes, or boxes of another size."""
    x = inputs.latents
    batch = x.shape[0]
    img_shapes = [(1, x.shape[2] // 2, x.shape[3] // 2)]
    parts = [patchify(x)]
    if inputs.sub_latents is not None:
        s = inputs.sub_latents
        hs, ws = s.shape[2] // 2, s.shape[3] // 2
        img_shapes.append((1, hs, ws))
        parts.append(patchify(s))
        if inputs.subyx is None:
            raise ValueError("sub_latents given without subyx")
        sizes = (inputs.subyx[:, 1] - inputs.subyx[:, 0], inputs.subyx[:, 3] - inputs.subyx[:, 2])
        if bool((sizes[0] != hs).any()) or bool((sizes[1] != ws).any()):
            raise ValueError(f"subyx boxes {inputs.subyx.tolist()} do not match sub latents of {hs}x{ws} tokens")
    for e in inputs.edit_latents:
        if e.shape[0] != batch:
            e = e.expand(batch, -1, -1, -1)
        img_shapes.append((1, e.shape[2] // 2, e.shape[3] // 2))
        parts.append(patchify(e))
    return torch.cat(parts, dim=1), img_shapes


def _conditioning(dit, timestep: torch.Tensor, batch: int, image: torch.Tensor, n_noisy: int, zero_cond_t: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the time embedding, the per-token modulation index): with `zero_cond_t` the embedding holds t then t = 0 and
    the index picks the second for the edit tokens (those after the first `n_noisy`)."""
    t = _as_batch_timestep(timestep, batch).to(device=image.device) / 1000
    if zero_cond_t:
        t = torch.cat([t, t * 0])
        modulate_index = torch.zeros(batch, image.shape[1], dtype=torch.int, device=image.device)
        modulate_index[:, n_noisy:] = 1
    else:
        modulate_index = None
    addition = None
    if dit.time_text_embed.use_additional_t_cond:
        addition = torch.zeros(t.shape[0], dtype=torch.long, device=image.device)
    return dit.time_text_embed(t, image.dtype, addition_t_cond=addition), modulate_index


def _text_stream(dit, inputs: DiTInputs, image: torch.Tensor) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
    """(the text tokens cut to the longest prompt of the batch, each prompt's length, the attention mask over
    [text | image] keys, None when no prompt is padded)."""
    mask = inputs.prompt_emb_mask
    txt_len = int(mask.sum(dim=1).max())
    prompt_emb = inputs.prompt_emb[:, :txt_len]
    mask = mask[:, :txt_len]
    text = dit.txt_in(dit.txt_norm(prompt_emb))
    txt_seq_lens = mask.sum(dim=1).tolist()
    attention_mask = None
    if not bool(mask.bool().all()):
        keys = torch.cat([mask.bool(), torch.ones(image.shape[0], image.shape[1], dtype=torch.bool,
                                                  device=mask.device)], 1)
        attention_mask = keys[:, None, None, :]
    return text, txt_seq_lens, attention_mask


def bridge_forward(dit, inputs: DiTInputs, ste: STE | None = None, zero_cond_t: bool = False,
                   use_gradient_checkpointing: bool = False, checkpoint_last_n: int | None = None,
                   gate_override: float | None = None, return_gates: bool = False):
    """Returns (main_pred [B,16,H/8,W/8], sub_pred or None[, gates]).

    `ste=None` with sub latents routes nothing (sub tokens keep their own RoPE, gate 1).
    `gate_override` forces every gate to that value (0 or 1) for ablations/tests.
    `checkpoint_last_n`: with checkpointing on, only the last N blocks recompute (None = all).
    """
    batch = inputs.latents.shape[0]
    tokens, img_shapes = _image_tokens(inputs)
    _, hm, wm = img_shapes[0]
    n_main = hm * wm
    n_sub = img_shapes[1][1] * img_shapes[1][2] if inputs.sub_latents is not None else 0
    n_noisy = n_main + n_sub
    image = dit.img_in(tokens)
    conditioning, modulate_index = _conditioning(dit, inputs.timestep, batch, image, n_noisy, zero_cond_t)
    text, txt_seq_lens, attention_mask = _text_stream(dit, inputs, image)
    vid_freqs, txt_freqs = (torch.view_as_real(f) for f in dit.pos_embed(img_shapes, txt_seq_lens,
                                                                          device=image.device))

    routed = n_sub > 0 and (ste is not None or gate_override is not None)
    if routed:
        own_sub = vid_freqs[n_main:n_noisy]
        swapped = swapped_sub_freqs(vid_freqs[:n_main], (hm, wm), inputs.subyx)
        head = vid_freqs[:n_main].expand(batch, *vid_freqs[:n_main].shape)
        tail = vid_freqs[n_noisy:].expand(batch, *vid_freqs[n_noisy:].shape)

    def run_block(block, block_id, image, text):
        freqs = vid_freqs
        gate = None
        if routed:
            if gate_override is not None:
                gate = torch.full((batch, n_sub), float(gate_override), device=image.device)
            else:
                gate = ste(image, block_id, slice(n_main, n_noisy))
            g = gate[..., None, None]
            sub_freqs = own_sub.unsqueeze(0) * g + swapped * (1 - g)
            freqs = torch.cat([head, sub_freqs, tail], dim=1).unsqueeze(1)  # [B, 1, L, D/2, 2]
        text, image = block(image=image, text=text, temb=conditioning, image_rotary_emb=(freqs, txt_freqs),
                            attention_mask=attention_mask, modulate_index=modulate_index)
        return text, image, gate

    blocks = dit.transformer_blocks
    n_blocks = len(blocks)
    first_ckpt = 0 if checkpoint_last_n is None else max(0, n_blocks - checkpoint_last_n)
    gates = []
    for block_id, block in enumerate(blocks):
        if use_gradient_checkpointing and torch.is_grad_enabled() and block_id >= first_ckpt:
            text, image, gate = checkpoint(run_block, block, block_id, image, text, use_reentrant=False)
        else:
            text, image, gate = run_block(block, block_id, image, text)
        if return_gates and gate is not None:
            gates.append(gate.detach())

    # Not rebinding `conditioning`: checkpoint recomputation reads it from the closure during backward.
    out_conditioning = conditioning.chunk(2, dim=0)[0] if zero_cond_t else conditioning
    image = dit.proj_out(dit.norm_out(image, out_conditioning))
    main = unpatchify(image[:, :n_main], hm, wm)
    sub = None
    if n_sub:
        sub = unpatchify(image[:, n_main:n_noisy], img_shapes[1][1], img_shapes[1][2])
    if return_gates:
        return main, sub, gates
    return main, sub
