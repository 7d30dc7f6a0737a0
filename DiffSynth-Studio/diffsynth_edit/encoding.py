"""Prompt and image encoding shared by the editor and the cache (one implementation, so they cannot drift).

Prompts use the multi-image template ("Picture i: <image>") with references resized to about 384² for the
Qwen2.5-VL encoder (upstream's `encode_prompt_edit_multi`); images are VAE-encoded at their own (≤ 1 MP, 16-aligned)
size. The negative prompt is the empty string encoded with the same images.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .speedups import sdpa_any_length

_EMBEDDER = None


def _embedder():
    global _EMBEDDER
    if _EMBEDDER is None:
        from diffsynth.pipelines.qwen_image import QwenImageUnit_PromptEmbedder

        _EMBEDDER = QwenImageUnit_PromptEmbedder()
    return _EMBEDDER


# Every text-encoder call runs SDPA without cuDNN's backend (`speedups.sdpa_any_length`, used as a decorator): prompt
# lengths, padded batch lengths and image token counts change from call to call, and cuDNN builds a plan for each
# new one (H100: 56 ms per new length for one prompt, 440 ms for a padded batch; 0.1 ms per call either way once
# built).
@torch.no_grad()
@sdpa_any_length()
def encode_prompt(pipe, prompt: str, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding [1, L, D] in the pipeline dtype, mask [1, L] long) for one prompt with its reference images."""
    if pipe.text_encoder is None or pipe.processor is None:
        raise RuntimeError("prompt encoding needs the text encoder and the processor loaded")
    hidden = _embedder().encode_prompt_edit_multi(pipe, [prompt], list(images))[0]
    emb = hidden.unsqueeze(0).to(dtype=pipe.torch_dtype)
    mask = torch.ones(1, emb.shape[1], dtype=torch.long, device=emb.device)
    return emb, mask


@torch.no_grad()
def vae_encode(pipe, images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """Latents [1, 16, H/8, W/8] per image; images of the same size are encoded in one batch."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.size, []).append(i)
    for idx in groups.values():
        lat = vae_encode_uint8(pipe, [image_to_uint8(images[i]) for i in idx])  # converted on the device
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


# ---- several prompts with the same images (the cache: prompt + empty negative) ------------------------------------
# Constants of upstream's `encode_prompt_edit_multi` (diffsynth 2.1.12), which `encode_prompt` calls; the functions
# below build the same token sequences and are checked against `encode_prompt` in tests/test_encoding.py.
_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
_IMAGE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
DROP_IDX = 64  # leading (system template) tokens dropped from every embedding


_PROCESSOR_LOCK = threading.Lock()  # HF (Rust) tokenizers are not safe to call from several threads at once


def prompt_inputs(pipe, prompts: Sequence[str], images: Sequence[Image.Image]):
    """Processor outputs for `prompts` (all with the same `images`), images processed ONCE: (input_ids list of 1-D
    long tensors, pixel_values, image_grid_thw). CPU only and thread-safe (the cache runs it in reader threads)."""
    with _PROCESSOR_LOCK:
        return _prompt_inputs(pipe, prompts, images)


def _prompt_inputs(pipe, prompts: Sequence[str], images: Sequence[Image.Image]):
    emb = _embedder()
    vl_images = [emb.resize_image(im) for im in images]
    base = "".join(_IMAGE_TEMPLATE.format(i + 1) for i in range(len(images)))
    texts = [_TEMPLATE.format(base + p) for p in prompts]
    first = pipe.processor(text=[texts[0]], images=vl_images or None, padding=False, return_tensors="pt")
    ids = [first["input_ids"][0]]
    if len(texts) > 1:
        # The processor expands every <|image_pad|> to the image's token count; the other prompts reuse the images,
        # so the expanded text is tokenised without processing the images again.
        merge = getattr(pipe.processor.image_processor, "merge_size", 2)
        expanded = []
        for t in texts[1:]:
            for thw in (first["image_grid_thw"] if vl_images else []):
                t = t.replace("<|image_pad|>", "<|placeholder|>" * (int(thw.prod()) // merge ** 2), 1)
            expanded.append(t.replace("<|placeholder|>", "<|image_pad|>"))
        tok = pipe.processor.tokenizer(expanded, padding=False, add_special_tokens=True)["input_ids"]
        ids += [torch.tensor(t, dtype=torch.long) for t in tok]
    return ids, first.get("pixel_values"), first.get("image_grid_thw")


def common_prefix_len(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of leading token ids two 1-D id sequences share."""
    n = min(len(a), len(b))
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0, 0]) if len(diff) else n


def _image_embeds(model, pixel_values, grid):
    feats = model.get_image_features(pixel_values, grid)
    feats = getattr(feats, "pooler_output", feats)
    return torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats


@torch.no_grad()
@sdpa_any_length()
def encode_prompts(pipe, prompts: Sequence[str], images: Sequence[Image.Image]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`[encode_prompt(pipe, p, images) for p in prompts]` in ONE text-encoder call (batch len(prompts)).

    The images are processed (CPU) and run through the vision tower once and scattered into every row. Rows are
    RIGHT-padded: the text encoder is causal and (as in upstream's call, which passes no `mm_token_type_ids`) its
    positions are 0..L-1 whatever the mask, so a row's real tokens see exactly what they see alone; left padding
    would shift the positions. Equality with separate `encode_prompt` calls is tested (fp32, 1e-5)."""
    if pipe.text_encoder is None or pipe.processor is None:
        raise RuntimeError("prompt encoding needs the text encoder and the processor loaded")
    ids, pixel_values, grid = prompt_inputs(pipe, prompts, images)
    return _encode_ids(pipe, ids, pixel_values, grid)


def _inputs_embeds(te, input_ids: torch.Tensor, pixel_values, grid, rows: int):
    """Token embeddings with the vision tower's output (run once) scattered into the image tokens of every row: what
    the text encoder's forward does with `pixel_values`, without running the vision tower once per row."""
    return _scatter_images(te, input_ids, _image_embeds(te.model, pixel_values, grid).repeat(rows, 1))


def _scatter_images(te, input_ids: torch.Tensor, image_rows: torch.Tensor) -> torch.Tensor:
    """Token embeddings of `input_ids` with `image_rows` (vision-tower outputs, in row-major order of the image
    tokens) written over the image tokens."""
    embeds = te.model.get_input_embeddings()(input_ids)
    mask = (input_ids == te.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, image_rows.to(embeds.device, embeds.dtype))


def _right_padded(pipe, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [len(ids), longest] on the pipeline's device, rows right-padded."""
    pad_id = pipe.processor.tokenizer.pad_token_id or 0
    length = max(len(t) for t in ids)
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(ids), length), dtype=torch.long)
    for i, t in enumerate(ids):
        input_ids[i, :len(t)] = t
        attn[i, :len(t)] = 1
    return input_ids.to(pipe.device, non_blocking=True), attn.to(pipe.device, non_blocking=True)


def _encode_ids(pipe, ids: list[torch.Tensor], pixel_values, grid) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dev = pipe.device
    te = pipe.text_encoder
    input_ids, attn = _right_padded(pipe, ids)
    kw: dict = {}
    if pixel_values is not None:
        pv, grid = pixel_values.to(dev), grid.to(dev)
        try:  # vision tower once, its output scattered into every row
            kw["inputs_embeds"] = _inputs_embeds(te, input_ids, pv, grid, len(ids))
        except (AttributeError, TypeError):  # other transformers versions: vision tower once per row
            kw["pixel_values"] = pv.repeat(len(ids), 1)
            kw["image_grid_thw"] = grid.repeat(len(ids), 1)
    hidden = te(input_ids=input_ids, attention_mask=attn, output_hidden_states=True, **kw)[-1]
    out = []
    for i, t in enumerate(ids):
        emb = hidden[i:i + 1, DROP_IDX:len(t)].to(dtype=pipe.torch_dtype)
        out.append((emb, torch.ones(1, emb.shape[1], dtype=torch.long, device=emb.device)))
    return out


@dataclass
class PromptPair:
    """A prompt and a negative prompt encoded with the same images. The negative shares the prompt's leading tokens
    (system template + "Picture i: <image>" part; images always come before the prompt text), and the text encoder is
    causal, so its hidden states over that prefix ARE the prompt's: it is kept as `nega_prefix` (a length into
    `emb`) + `nega_tail` (its remaining rows). `nega_emb` rebuilds the full negative embedding."""

    emb: torch.Tensor  # [1, L, D]
    mask: torch.Tensor  # [1, L] long
    nega_prefix: int  # rows of `emb` the negative shares
    nega_tail: torch.Tensor  # [1, T, D]

    @property
    def nega_emb(self) -> torch.Tensor:
        return torch.cat([self.emb[:, :self.nega_prefix], self.nega_tail], dim=1)

    @property
    def nega_mask(self) -> torch.Tensor:
        return torch.ones(1, self.nega_prefix + self.nega_tail.shape[1], dtype=torch.long, device=self.emb.device)


@torch.no_grad()
@sdpa_any_length()
def encode_prompt_pair(pipe, prompt: str, images: Sequence[Image.Image], negative_prompt: str = "",
                       inputs=None) -> PromptPair:
    """`encode_prompt(pipe, prompt, images)` and `encode_prompt(pipe, negative_prompt, images)` for the cost of ONE
    text-encoder pass plus a few tokens: the prompt is encoded with a KV cache, the cache is cut to the common token
    prefix (computed from the token ids) and only the negative's remaining tokens are run on it (positions continue
    at the prefix length, as in a full pass). `inputs`: `prompt_inputs(pipe, [prompt, negative_prompt], images)`
    computed beforehand (e.g. in a reader thread). Equality with separate calls is tested (fp32, 1e-5)."""
    if pipe.text_encoder is None or pipe.processor is None:
        raise RuntimeError("prompt encoding needs the text encoder and the processor loaded")
    ids, pixel_values, grid = inputs if inputs is not None else prompt_inputs(pipe, [prompt, negative_prompt], images)
    pos, neg = ids
    te, dev = pipe.text_encoder, pipe.device
    prefix = common_prefix_len(pos, neg)
    image_token = getattr(te.config, "image_token_id", None)
    model = getattr(te, "model", None)
    if (prefix == 0 or (image_token is not None and bool((neg[prefix:] == image_token).any()))
            or not hasattr(model, "get_image_features")):
        # images after the divergence (not this template) or an unknown model layout: one batched call
        (emb, mask), (nemb, _) = _encode_ids(pipe, [pos, neg], pixel_values, grid)
        return PromptPair(emb, mask, 0, nemb)
    x = pos[None].to(dev, non_blocking=True)
    kw = {}
    if pixel_values is not None:
        kw["inputs_embeds"] = _inputs_embeds(te, x, pixel_values.to(dev), grid.to(dev), 1)
    # te.model: the encoder's own forward (QwenImageTextEncoder.forward) returns the hidden states only, not the cache
    out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, output_hidden_states=True,
                return_dict=True, **kw)
    hidden = out.hidden_states[-1]
    emb = hidden[:, DROP_IDX:].to(dtype=pipe.torch_dtype)
    mask = torch.ones(1, emb.shape[1], dtype=torch.long, device=emb.device)
    tail_ids = neg[prefix:]
    if len(tail_ids) == 0:
        tail = hidden[:, :0]
    else:
        cache = out.past_key_values
        if len(pos) > prefix:
            cache.crop(prefix - len(pos))  # negative: drop that many tokens from the end
        y = tail_ids[None].to(dev, non_blocking=True)
        tail = model(input_ids=y, past_key_values=cache, use_cache=True, output_hidden_states=True,
                     return_dict=True).hidden_states[-1]
    # stored rows start at DROP_IDX: a divergence inside the dropped part (not this template) drops tail rows too
    tail = tail[:, max(0, DROP_IDX - prefix):].to(dtype=pipe.torch_dtype)
    return PromptPair(emb, mask, max(0, prefix - DROP_IDX), tail)


@torch.no_grad()
@sdpa_any_length()
def encode_prompt_pairs(pipe, inputs: Sequence[tuple]) -> list[PromptPair]:
    """`encode_prompt_pair` for several samples in ONE text-encoder call (the cache's batches): `inputs[i]` is
    `prompt_inputs(pipe, [prompt_i, negative_i], images_i)`. Rows `[pos_1, neg_1, pos_2, neg_2, ...]`, right-padded
    (see `encode_prompts`), the vision tower run once over every sample's images, each sample's output scattered
    into its two rows. The negative is run in full here and stored, as by `encode_prompt_pair`, as the prompt's
    shared prefix + its own tail rows. At batch 1 the text encoder is bound by kernel launches, not by the GPU."""
    if pipe.text_encoder is None or pipe.processor is None:
        raise RuntimeError("prompt encoding needs the text encoder and the processor loaded")
    te, dev = pipe.text_encoder, pipe.device
    model = getattr(te, "model", None)
    with_images = [x for x in inputs if x[1] is not None]
    if not hasattr(model, "get_image_features") or 0 < len(with_images) < len(inputs):
        return [encode_prompt_pair(pipe, "", [], inputs=x) for x in inputs]  # mixed or unknown layouts: one by one
    input_ids, attn = _right_padded(pipe, [t for x in inputs for t in x[0][:2]])
    kw: dict = {}
    if with_images:
        pv = torch.cat([x[1] for x in inputs]).to(dev, non_blocking=True)
        grid = torch.cat([x[2] for x in inputs]).to(dev, non_blocking=True)
        feats = _image_embeds(model, pv, grid)
        merge = getattr(pipe.processor.image_processor, "merge_size", 2) ** 2
        counts = [int(x[2].prod(dim=1).sum()) // merge for x in inputs]
        per_sample = feats.split(counts)
        rows = torch.cat([f for f in per_sample for _ in range(2)])  # each sample's images for its two rows
        kw["inputs_embeds"] = _scatter_images(te, input_ids, rows)
    hidden = te(input_ids=input_ids, attention_mask=attn, output_hidden_states=True, **kw)[-1]
    out = []
    for n, x in enumerate(inputs):
        pos, neg = x[0][0], x[0][1]
        emb = hidden[2 * n:2 * n + 1, DROP_IDX:len(pos)].to(dtype=pipe.torch_dtype)
        nega_prefix = max(0, common_prefix_len(pos, neg) - DROP_IDX)
        tail = hidden[2 * n + 1:2 * n + 2, DROP_IDX + nega_prefix:len(neg)].to(dtype=pipe.torch_dtype)
        out.append(PromptPair(emb, torch.ones(1, emb.shape[1], dtype=torch.long, device=emb.device), nega_prefix,
                              tail))
    return out


def image_to_uint8(image: Image.Image, pin: bool = False) -> torch.Tensor:
    """[3, H, W] uint8 (a quarter of the float tensor's bytes to copy to the device); `pin`: page-locked."""
    t = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return t.pin_memory() if pin else t


@torch.no_grad()
def vae_encode_uint8(pipe, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """`vae_encode` of same-size images given as `image_to_uint8` tensors, in one batch: [B, 16, H/8, W/8]. The
    uint8 pixels are copied to the device (non-blocking) and converted there to [-1, 1] (x / 127.5 - 1)."""
    x = torch.stack([t.to(pipe.device, non_blocking=True) for t in images]) if len(images) > 1 else \
        images[0].to(pipe.device, non_blocking=True)[None]
    x = (x.float() / 127.5 - 1.0).to(dtype=pipe.torch_dtype)
    return pipe.vae.encode(x)
