"""Qwen's real BPE vocabulary for the GPU benchmarks (token counts like the released model's, offline).

The released tokenizer cannot be downloaded on the bench machines, but Qwen's 151,643 byte-level BPE ranks ship in
the Apache-2.0 PyPI package `dashscope` (`dashscope/resources/qwen.tiktoken`; Qwen2/2.5-VL use the same ranks with
the special tokens from id 151643 on). `bash bench/fetch_qwen_tokenizer.sh` puts that file at
`bench/.assets/qwen.tiktoken` (not committed); `build_qwen_tokenizer` turns it into a transformers tokenizer with
Qwen2's pre-tokenizer and the special tokens at their real ids. Check: upstream drops the first 64 tokens of the
edit template (`DROP_IDX`), and this tokenizer gives the template's system part exactly 64 tokens.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

ASSET = Path(__file__).resolve().parent / ".assets" / "qwen.tiktoken"
ASSET_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
# Qwen2's split pattern (single digits, unlike GPT-4's 1-3).
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # ids 151643 ...


def qwen_tiktoken_path() -> Path | None:
    """$QWEN_TIKTOKEN or bench/.assets/qwen.tiktoken, if present."""
    path = Path(os.environ.get("QWEN_TIKTOKEN", ASSET))
    return path if path.is_file() else None


def _vocab_and_merges(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (byte-level vocab, merges ordered by the merged token's rank): tiktoken's BPE always merges
    the adjacent pair whose merged token has the lowest rank, so every split of a token into two known tokens is a
    merge at that token's rank."""
    ranks: dict[bytes, int] = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    from diffsynth_edit.tiny import _bytes_to_unicode

    table = _bytes_to_unicode()  # byte value -> its byte-level BPE symbol

    def sym(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {sym(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(sym(m[3]), sym(m[4])) for m in merges]


def build_qwen_tokenizer(path: Path | None = None):
    """A transformers Qwen2 tokenizer on Qwen's real vocabulary; special tokens at ids 151643.. (as released)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import Qwen2Tokenizer

    path = path or qwen_tiktoken_path()
    if path is None:
        raise FileNotFoundError(f"{ASSET} is missing: run `bash bench/fetch_qwen_tokenizer.sh` first")
    vocab, merges = _vocab_and_merges(path)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = Qwen2Tokenizer(tokenizer_object=core, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.convert_tokens_to_ids(t) != 151643 + i:
            raise AssertionError(f"{t} got id {tok.convert_tokens_to_ids(t)}, expected {151643 + i}")
    return tok
