"""The cache's manifest and its content hashes.

`manifest.json` at the cache root records what produced the cache (variant, zero_cond_t, prompt template,
resolution policy, encoder identity, versions, dtype) and an index of entries (id -> file, shapes). Each sample file
is named by a content hash over its input bytes and every setting that changes its tensors, so a changed input or
setting yields a new file name and the old file becomes an orphan.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..atomic import atomic_write_json
from ..variants import get_variant

FORMAT = "qwen-edit-cache/2"  # 2: the negative prompt stored as prefix length + tail (1: in full)
MANIFEST_NAME = "manifest.json"
SAMPLES_DIR = "samples"
SAMPLE_SUFFIX = ".safetensors"
HASH_CHARS = 32  # 128 bits of sha256 in the file name

# diffsynth 2.1.12 QwenImageUnit_PromptEmbedder.encode_prompt_edit_multi (used through encoding.encode_prompt);
# recorded for the reader's information, the code path is the shared one.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
IMAGE_PROMPT_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
PROMPT_DROP_TOKENS = 64
VL_IMAGE_AREA = 384 * 384

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolution_policy(max_pixels: int) -> dict[str, Any]:
    """Everything that decides image sizes (part of every sample hash)."""
    return {
        "max_pixels": int(max_pixels),
        "align": 16,
        "fit": "scale down only to <= max_pixels, sides floored to 16 (geometry.fit_size), LANCZOS",
        "size_from": "edit_image[0] (source); target resized to the same size",
        "references": "each fitted on its own (same rule)",
        "mask": "resized NEAREST to the source size, binarised > 127; bbox rounded outward to 16 px",
        "vl_image_area": VL_IMAGE_AREA,
        "mask_latent": "avg_pool2d(binary mask, 8)",
    }


def prompt_info() -> dict[str, Any]:
    return {"template": PROMPT_TEMPLATE, "image_template": IMAGE_PROMPT_TEMPLATE, "drop_tokens": PROMPT_DROP_TOKENS,
            "negative_prompt": "", "function": "diffsynth_edit.encoding.encode_prompt_pair (= encode_prompt)"}


def _file_sig(p: Path) -> list:
    st = p.stat()
    return [p.name, st.st_size, st.st_mtime_ns]


def encoder_identity(sources) -> dict[str, Any]:
    """Identity of the text encoder, VAE, tokenizer and processor: (name, size, mtime) of each local file, or the hub
    location when they are downloaded. A tiny-model tree adds the digest of its `tiny_models.json`."""
    from ..loading import _component_location, find_tiny_root, resolve_local

    ident: dict[str, Any] = {}
    for name in ("text_encoder", "vae", "tokenizer", "processor"):
        local = resolve_local(sources, name)
        if local is None:
            repo, pattern, _ = _component_location(sources, name)
            ident[name] = f"hub:{repo}/{pattern}"
        elif isinstance(local, str):  # folder
            files = sorted(p for p in Path(local).rglob("*") if p.is_file())
            ident[name] = [_file_sig(p) for p in files]
        else:
            ident[name] = [_file_sig(Path(p)) for p in local]
            tiny = find_tiny_root(Path(local[0]).parent)
            if tiny is not None:
                ident.setdefault("tiny_models", hashlib.sha256((tiny / "tiny_models.json").read_bytes()).hexdigest())
    ident["digest"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return ident


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("diffsynth", "qwen-edit-workspace", "torch", "transformers", "safetensors", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "unknown"
    from .. import __version__

    out["diffsynth_edit"] = __version__
    return out


@dataclass(frozen=True)
class CacheSettings:
    """Settings that change the cached tensors; their fingerprint is part of every sample hash."""

    variant: str
    max_pixels: int
    dtype: str  # bf16 / fp16 / fp32
    encoder: str  # encoder_identity()["digest"]

    def fingerprint(self) -> str:
        blob = json.dumps({"format": FORMAT, "variant": self.variant, "policy": resolution_policy(self.max_pixels),
                           "prompt": prompt_info(), "dtype": self.dtype, "encoder": self.encoder}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def sample_hash(fingerprint: str, prompt: str, files: Iterable[tuple[str, Path]], sample_id: str,
                edit_type: str | None) -> str:
    """sha256 over the settings fingerprint, the prompt, the id, and the bytes of every input file (with its role).

    Raises OSError for a missing/unreadable file (the caller reports it)."""
    h = hashlib.sha256()
    h.update(fingerprint.encode())
    for part in (prompt, sample_id, edit_type or ""):
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    for role, path in files:
        h.update(role.encode())
        with open(path, "rb") as f:
            data = f.read()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:HASH_CHARS]


def manifest_path(cache_dir: Path | str) -> Path:
    return Path(cache_dir) / MANIFEST_NAME


def read_manifest(cache_dir: Path | str) -> dict[str, Any] | None:
    """The manifest dict, or None when there is none. Raises ValueError for an unreadable one."""
    p = manifest_path(cache_dir)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p} is not a JSON object")
    return data


def build_manifest(settings: CacheSettings, identity: dict, entries: dict[str, dict], complete: bool,
                   failed: list[dict] | None = None, dataset: str | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "complete": complete,
        "variant": settings.variant,
        "zero_cond_t": get_variant(settings.variant).zero_cond_t,
        "dtype": settings.dtype,
        "prompt": prompt_info(),
        "resolution_policy": resolution_policy(settings.max_pixels),
        "encoder_identity": identity,
        "settings_fingerprint": settings.fingerprint(),
        "versions": versions(),
        "dataset": dataset,
        "num_entries": len(entries),
        "failed": failed or [],
        "entries": entries,
    }


def write_manifest(cache_dir: Path | str, manifest: dict[str, Any]) -> None:
    atomic_write_json(manifest_path(cache_dir), manifest)
