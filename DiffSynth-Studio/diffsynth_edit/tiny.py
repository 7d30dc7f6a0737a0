"""Tiny Qwen-Image-Edit models for tests, the quickstart and the demo.

They keep the real module names (so LoRA keys and targets match the 20B model) and are written in the same folder
layout as the real weights, then loaded by the same loader (`loading.load_pipeline`). Only the widths shrink.
A `tiny_models.json` at the root tells the loader which tiny classes the files' key hashes belong to.
The DiT and the text encoder are random (the text encoder's token embeddings at unit scale, so each output row
carries its token); the VAE is set analytically (`tiny_vae`: it reconstructs low-frequency
images), and by default the DiT's output projection is zero, so an untrained LBM edit returns the source.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from diffsynth.models.general_modules import AdaLayerNorm, RMSNorm, TimestepEmbeddings
from diffsynth.models.qwen_image_dit import QwenEmbedRope, QwenImageDiT, QwenImageTransformerBlock
from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
from diffsynth.models.qwen_image_vae import QwenImageVAE

from .tiny_vae import set_analytic_vae

TINY_TEXT_DIM = 64
TINY_MARKER = "tiny_models.json"
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
TOKEN_IDS = {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)}
# Whole-word tokens (built by BPE merges) for the words of diffsynth's prompt templates and common edit instructions,
# so the tiny model's prompts have realistic lengths (~70 tokens, not ~400 bytes) and text does not swamp the few
# image tokens of a 64² edit.
TEMPLATE_WORDS = """system user assistant Describe describe the key features of input image color shape size texture
objects background then explain how user's text instruction should alter or modify Generate generate a new that meets
requirements while maintaining consistency with original where appropriate by detailing quantity spatial relationships
and Picture is to Make make change Change add Add remove Remove replace Replace recolour recolor square circle
triangle object red green blue yellow purple orange cyan white black colour into in on from it Fill fill box""".split()
VOCAB_SIZE = 640
# The text encoder's token embeddings are drawn at this std (transformers draws them at initializer_range = 0.02, the
# size of the random layers' residual updates, so each output row came out a mix of its own token and an average over
# the prompt and the image: the colour word of "Fill the white box with <colour>." was no longer readable). At unit
# scale the residual updates are small beside the token, so every output row is (close to) its token's embedding.
TEXT_EMBED_STD = 1.0


class TinyQwenImageDiT(QwenImageDiT):
    """QwenImageDiT with small widths; same attribute names as the 20B model."""

    def __init__(self, num_layers: int = 3, dim: int = 64, num_heads: int = 2, axes_dim=(8, 12, 12),
                 text_dim: int = TINY_TEXT_DIM, use_layer3d_rope: bool = False, use_additional_t_cond: bool = False):
        nn.Module.__init__(self)
        head_dim = sum(axes_dim)
        assert dim == num_heads * head_dim
        self.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(axes_dim), scale_rope=True)
        self.time_text_embed = TimestepEmbeddings(256, dim, diffusers_compatible_format=True, scale=1000,
                                                  align_dtype_to_timestep=False,
                                                  use_additional_t_cond=use_additional_t_cond)
        self.txt_norm = RMSNorm(text_dim, eps=1e-6)
        self.img_in = nn.Linear(64, dim)
        self.txt_in = nn.Linear(text_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [QwenImageTransformerBlock(dim=dim, num_attention_heads=num_heads, attention_head_dim=head_dim)
             for _ in range(num_layers)])
        self.norm_out = AdaLayerNorm(dim, single=True)
        self.proj_out = nn.Linear(dim, 64)


class TinyQwenImageTextEncoder(QwenImageTextEncoder):
    """Qwen2.5-VL with a 2-layer, 64-wide language model and a 2-layer vision tower; forward is upstream's."""

    def __init__(self):
        nn.Module.__init__(self)
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

        config = Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=VOCAB_SIZE, hidden_size=TINY_TEXT_DIM, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-6,
                rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                rope_theta=1e6, use_sliding_window=False, sliding_window=None,
                bos_token_id=TOKEN_IDS["<|endoftext|>"], eos_token_id=TOKEN_IDS["<|im_end|>"]),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=TINY_TEXT_DIM,
                fullatt_block_indexes=[1], tokens_per_second=2),
            image_token_id=TOKEN_IDS["<|image_pad|>"], video_token_id=TOKEN_IDS["<|video_pad|>"],
            vision_start_token_id=TOKEN_IDS["<|vision_start|>"], vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
            tie_word_embeddings=False)
        self.model = Qwen2_5_VLModel(config)
        self.lm_head = nn.Linear(TINY_TEXT_DIM, VOCAB_SIZE, bias=False)
        self.config = config


class TinyQwenImageVAE(QwenImageVAE):
    """The real VAE class at base_dim 8, one res block; z_dim stays 16 as the pipeline requires. `write_tiny_model`
    sets its weights with `tiny_vae.set_analytic_vae`."""

    def __init__(self):
        super().__init__(base_dim=8, num_res_blocks=1)


TINY_CLASSES = {
    "qwen_image_dit": f"{__name__}.TinyQwenImageDiT",
    "qwen_image_text_encoder": f"{__name__}.TinyQwenImageTextEncoder",
    "qwen_image_vae": f"{__name__}.TinyQwenImageVAE",
}
REAL_CLASSES = {
    "qwen_image_dit": "diffsynth.models.qwen_image_dit.QwenImageDiT",
    "qwen_image_text_encoder": "diffsynth.models.qwen_image_text_encoder.QwenImageTextEncoder",
    "qwen_image_vae": "diffsynth.models.qwen_image_vae.QwenImageVAE",
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable-unicode table (256 symbols), the base of Qwen's BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE on one word: merge the best-ranked adjacent pair until no pair has a merge."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def build_tokenizer():
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    byte_symbols = _bytes_to_unicode()
    vocab = {ch: i for i, ch in enumerate(byte_symbols)}
    vocab.update(TOKEN_IDS)
    merges: list[tuple[str, str]] = []
    # Letters-only words: their byte symbols are the characters themselves. (Space-prefixed forms are left out:
    # transformers re-encodes a merge containing the space symbol, so " word" stays two tokens.) Each word gets the
    # merges that join the pieces the earlier merges leave it in, left to right, so every word ends as one token
    # (prefix merges alone do not: "re" from "requirements" would leave "green" as g·re·e·n). A merge added later
    # ranks after every merge an earlier word uses, so it never changes that word's tokens.
    ranks: dict[tuple[str, str], int] = {}
    for word in TEMPLATE_WORDS:
        while len(pieces := _bpe(list(word), ranks)) > 1:
            joined = pieces[0] + pieces[1]
            vocab.setdefault(joined, 256 + len(SPECIAL_TOKENS) + 2 + len(merges))
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
    if len(vocab) > VOCAB_SIZE:
        raise AssertionError(f"tiny vocabulary of {len(vocab)} exceeds VOCAB_SIZE {VOCAB_SIZE}")
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIAL_TOKENS]})
    return tok


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 64, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**kw))


def _text_encoder_to_hf_keys(state_dict: dict) -> dict:
    """Inverse of diffsynth's converter: files on disk use the HF Qwen2.5-VL layout."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = v
    return out


def write_tiny_model(root: Path | str, seed: int = 0, dtype: torch.dtype = torch.float32,
                     identity_out: bool = True) -> Path:
    """Write a complete tiny model tree under `root` in the hub layout of the real weights.

    root/Qwen/Qwen-Image-Edit-2511/transformer/, root/Qwen/Qwen-Image-Edit-2509/transformer/ (same DiT),
    root/Qwen/Qwen-Image/{text_encoder,vae,tokenizer}/, root/Qwen/Qwen-Image-Edit/processor/, and tiny_models.json.
    `identity_out`: zero the DiT's `proj_out`, so the untrained DiT predicts 0 (an LBM edit returns the source and
    the LoRA on `proj_out` learns the edit from there); False keeps it random, for tests of the forward itself.
    Idempotent: an existing complete tree is left alone.
    """
    from safetensors.torch import save_file

    from .atomic import atomic_path
    from diffsynth.core.loader import hash_model_file

    root = Path(root)
    marker = root / TINY_MARKER
    if marker.is_file():
        return root
    torch.manual_seed(seed)
    files: dict[str, Path] = {}
    dit = TinyQwenImageDiT()
    if identity_out:
        with torch.no_grad():
            dit.proj_out.weight.zero_()
            dit.proj_out.bias.zero_()
    dit_sd = {k: v.to(dtype).contiguous() for k, v in dit.state_dict().items()}
    for repo in ("Qwen-Image-Edit-2511", "Qwen-Image-Edit-2509"):
        p = root / "Qwen" / repo / "transformer" / "diffusion_pytorch_model.safetensors"
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            save_file(dit_sd, str(tmp))
    files["qwen_image_dit"] = root / "Qwen/Qwen-Image-Edit-2511/transformer/diffusion_pytorch_model.safetensors"
    te = TinyQwenImageTextEncoder()
    with torch.no_grad():  # token embeddings at unit scale (see TEXT_EMBED_STD)
        te.model.language_model.embed_tokens.weight.mul_(TEXT_EMBED_STD / te.config.text_config.initializer_range)
    te_sd = {k: v.to(dtype).contiguous() for k, v in _text_encoder_to_hf_keys(te.state_dict()).items()}
    files["qwen_image_text_encoder"] = root / "Qwen/Qwen-Image/text_encoder/model.safetensors"
    vae = set_analytic_vae(TinyQwenImageVAE().eval())
    vae_sd = {k: v.to(dtype).contiguous() for k, v in vae.state_dict().items()}
    files["qwen_image_vae"] = root / "Qwen/Qwen-Image/vae/diffusion_pytorch_model.safetensors"
    for name, sd in (("qwen_image_text_encoder", te_sd), ("qwen_image_vae", vae_sd)):
        files[name].parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(files[name]) as tmp:
            save_file(sd, str(tmp))
    tok = build_tokenizer()
    tok.save_pretrained(str(root / "Qwen/Qwen-Image/tokenizer"))
    build_processor(tok).save_pretrained(str(root / "Qwen/Qwen-Image-Edit/processor"))
    registry = {name: {"hash": hash_model_file(str(path)), "class": TINY_CLASSES[name]} for name, path in files.items()}
    with atomic_path(marker) as tmp:
        tmp.write_text(json.dumps({"models": registry}, indent=2))
    return root
