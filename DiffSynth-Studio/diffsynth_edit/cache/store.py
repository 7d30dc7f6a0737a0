"""Reading (and the on-disk form of) cache entries: one safetensors file per sample, no batch dimensions.

    index = open_cache("data/cache")          # CacheError if missing, incomplete or invalid
    index.variant, index.zero_cond_t, len(index), index.entries[i].size
    sample = index.load(i)                     # CachedSample

Keys of a sample file (h, w = size // 8; sh, sw = sub box // 8):
`input_latents` [16,h,w] (target), `edit_latents.<i>` [16,hi,wi] (0 = source, same size as the target),
`prompt_emb` [L,D], `prompt_emb_mask` [L] int64, `nega_prefix_len` [1] int64 (p), `nega_prompt_emb_tail` [L'-p,D],
`nega_prompt_emb_mask` [L'] int64 (the negative = prompt_emb[:p] + tail: the empty prompt with the same images shares
the prompt's leading tokens and the text encoder is causal; `load` rebuilds `nega_prompt_emb` [L',D]),
`sub_input_latents` [16,sh,sw] (ref_gt crop), `sub_noise` [16,sh,sw] (white crop), `mask_latent` [1,h,w] float32,
`subyx` [4] int64 (y1, y2, x1, x2 in 16-px tokens), `size` [2] int64 (height, width in pixels).
Latents and embeddings are in the cache dtype (manifest "dtype"). Header metadata: format, id, index, prompt,
edit_type, hash, variant, dtype, num_edit.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .manifest import FORMAT, MANIFEST_NAME, read_manifest

NEGA_TAIL = "nega_prompt_emb_tail"
NEGA_PREFIX = "nega_prefix_len"
TENSOR_KEYS = ("input_latents", "prompt_emb", "prompt_emb_mask", NEGA_PREFIX, NEGA_TAIL, "nega_prompt_emb_mask",
               "sub_input_latents", "sub_noise", "mask_latent", "subyx", "size")
EDIT_PREFIX = "edit_latents."


class CacheError(RuntimeError):
    """A cache directory or entry is missing or invalid; the message says which and what to do."""


@dataclass(frozen=True)
class CacheEntryInfo:
    path: Path
    id: str
    size: tuple[int, int]  # (height, width) in pixels
    sub_size: tuple[int, int]  # (height, width) of the sub box in pixels
    num_edit: int
    index: int = -1  # position in the dataset
    edit_sizes: tuple[tuple[int, int], ...] = ()  # (height, width) of each edit image


@dataclass
class CachedSample:
    id: str
    input_latents: torch.Tensor
    edit_latents: list[torch.Tensor]
    prompt_emb: torch.Tensor
    prompt_emb_mask: torch.Tensor
    nega_prompt_emb: torch.Tensor
    nega_prompt_emb_mask: torch.Tensor
    sub_input_latents: torch.Tensor
    sub_noise: torch.Tensor
    mask_latent: torch.Tensor
    subyx: torch.Tensor  # LongTensor [4]
    size: tuple[int, int]  # (height, width)
    metadata: dict[str, str] = field(default_factory=dict)


# ---- file-level helpers ------------------------------------------------------------------------------------------
def read_header(path: Path | str) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensor table, metadata) of a safetensors file, checking that the file is as long as its header says.

    Raises CacheError naming the file for a truncated or malformed file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CacheError(f"{path}: truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise CacheError(f"{path}: malformed header length {n}")
            blob = f.read(n)
        if len(blob) < n:
            raise CacheError(f"{path}: truncated header")
        header = json.loads(blob)
    except OSError as e:
        raise CacheError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CacheError(f"{path}: malformed safetensors header") from None
    if not isinstance(header, dict):
        raise CacheError(f"{path}: malformed safetensors header")
    meta = header.pop("__metadata__", None) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    actual = path.stat().st_size
    if actual != 8 + n + end:
        raise CacheError(f"{path}: truncated or padded file ({actual} bytes, header says {8 + n + end})")
    return header, meta


def quick_check(path: Path | str, expected_hash: str | None = None) -> str | None:
    """None when the file's header is readable, complete and has every required key; else the reason."""
    try:
        table, meta = read_header(path)
    except CacheError as e:
        return str(e)
    except FileNotFoundError:
        return f"{path}: missing"
    if meta.get("format") != FORMAT:
        return f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}"
    if expected_hash is not None and meta.get("hash") != expected_hash:
        return f"{path}: hash {meta.get('hash')!r} in the header, expected {expected_hash!r}"
    missing = [k for k in (*TENSOR_KEYS, EDIT_PREFIX + "0") if k not in table]
    if missing:
        return f"{path}: missing keys {missing}"
    return None


def edit_keys(keys) -> list[str]:
    """`edit_latents.<i>` keys in numeric order."""
    return sorted((k for k in keys if k.startswith(EDIT_PREFIX)), key=lambda k: int(k[len(EDIT_PREFIX):]))


def sample_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path | str = "?") -> CachedSample:
    missing = [k for k in TENSOR_KEYS if k not in tensors]
    ek = edit_keys(tensors)
    if missing or not ek:
        raise CacheError(f"{path}: missing keys {missing + ([] if ek else [EDIT_PREFIX + '0'])}")
    size = tuple(int(v) for v in tensors["size"].tolist())
    prefix = int(tensors[NEGA_PREFIX].reshape(-1)[0])
    if not 0 <= prefix <= tensors["prompt_emb"].shape[0]:
        raise CacheError(f"{path}: {NEGA_PREFIX} {prefix} outside the prompt's {tensors['prompt_emb'].shape[0]} rows")
    nega = torch.cat([tensors["prompt_emb"][:prefix], tensors[NEGA_TAIL]]) if prefix else tensors[NEGA_TAIL]
    return CachedSample(
        id=meta.get("id", Path(path).stem),
        input_latents=tensors["input_latents"],
        edit_latents=[tensors[k] for k in ek],
        prompt_emb=tensors["prompt_emb"],
        prompt_emb_mask=tensors["prompt_emb_mask"],
        nega_prompt_emb=nega,
        nega_prompt_emb_mask=tensors["nega_prompt_emb_mask"],
        sub_input_latents=tensors["sub_input_latents"],
        sub_noise=tensors["sub_noise"],
        mask_latent=tensors["mask_latent"],
        subyx=tensors["subyx"].long(),
        size=(size[0], size[1]),
        metadata=dict(meta),
    )


def load_sample(path: Path | str) -> CachedSample:
    """Load one sample file (safetensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CacheError(f"cache entry {path} is missing: run `python train_2511.py cache` again")
    try:
        _, meta = read_header(path)
        tensors = load_file(str(path))
    except CacheError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CacheError(f"{path}: cannot load ({e})") from None
    return sample_from_tensors(tensors, meta, path)


# ---- the index ---------------------------------------------------------------------------------------------------
class CacheIndex:
    """The entries of a cache directory, in dataset order."""

    def __init__(self, cache_dir: Path, manifest: dict[str, Any], entries: list[CacheEntryInfo]):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.entries = entries

    @property
    def variant(self) -> str:
        return str(self.manifest["variant"])

    @property
    def zero_cond_t(self) -> bool:
        return bool(self.manifest["zero_cond_t"])

    @property
    def dtype(self) -> str:
        return str(self.manifest.get("dtype", "bf16"))

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, i: int) -> CachedSample:
        return load_sample(self.entries[i].path)

    def check_variant(self, variant: str) -> None:
        """Raise VariantMismatchError when this cache was made for another variant."""
        from ..variants import check_same_variant

        check_same_variant(variant, self.variant, f"cache {self.cache_dir}")

    def __repr__(self) -> str:
        return f"CacheIndex({str(self.cache_dir)!r}, variant={self.variant}, entries={len(self)})"


def entry_info(cache_dir: Path, sample_id: str, rec: dict[str, Any]) -> CacheEntryInfo:
    return CacheEntryInfo(
        path=cache_dir / rec["file"], id=str(sample_id), size=(int(rec["size"][0]), int(rec["size"][1])),
        sub_size=(int(rec["sub_size"][0]), int(rec["sub_size"][1])), num_edit=int(rec["num_edit"]),
        index=int(rec.get("index", -1)), edit_sizes=tuple((int(h), int(w)) for h, w in rec.get("edit_sizes", ())))


def open_cache(cache_dir: Path | str, allow_incomplete: bool = False) -> CacheIndex:
    """Open a cache made by `python train_2511.py cache`.

    Raises CacheError when the directory or its manifest is missing or invalid, when the manifest is of another
    format, or (unless `allow_incomplete`) when the run that wrote it did not finish."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(f"cache directory {cache_dir} does not exist: run `python train_2511.py cache` first")
    try:
        manifest = read_manifest(cache_dir)
    except ValueError as e:
        raise CacheError(f"{e}: run `python train_2511.py cache` again to rewrite it") from None
    if manifest is None:
        raise CacheError(f"no {MANIFEST_NAME} in {cache_dir}: run `python train_2511.py cache` first")
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{cache_dir / MANIFEST_NAME} has format {manifest.get('format')!r}, this code reads "
                         f"{FORMAT!r}: re-create the cache with `python train_2511.py cache`")
    for key in ("variant", "zero_cond_t", "entries"):
        if key not in manifest:
            raise CacheError(f"{cache_dir / MANIFEST_NAME} lacks {key!r}: re-create the cache")
    if not manifest.get("complete", False) and not allow_incomplete:
        raise CacheError(f"cache {cache_dir} is incomplete (its cache run was interrupted): run "
                         f"`python train_2511.py cache` again with the same settings to finish it")
    try:
        entries = [entry_info(cache_dir, sid, rec) for sid, rec in manifest["entries"].items()]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CacheError(f"{cache_dir / MANIFEST_NAME} has a malformed entry ({e!r}): re-create the cache") from None
    if not entries and manifest.get("complete", False):
        raise CacheError(f"cache {cache_dir} has no entries (every sample failed?): check the dataset and run "
                         f"`python train_2511.py cache` again")
    entries.sort(key=lambda e: e.index)
    return CacheIndex(cache_dir, manifest, entries)
