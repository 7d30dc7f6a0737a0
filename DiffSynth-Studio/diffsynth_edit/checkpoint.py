"""Checkpoint files: LoRA (PEFT keys, no prefix) + STE (`pipe.ste.` keys) + metadata, in one .safetensors.

Accepted on load: this format; the original workspace's (same keys, no metadata); LoRA-only files with
`diffusion_model.`/`transformer.`/`base_model.model.` prefixes, `lora_A.weight` or `lora_down/lora_up` (+ `.alpha`).
Everything is checked against the model: missing or unexpected keys and wrong shapes are named in the error.
Only safetensors are ever read (no pickle).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .atomic import atomic_save_safetensors

STE_PREFIX = "pipe.ste."
LORA_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "pipe.dit.", "model.diffusion_model.")
_LORA_RE = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_ALPHA_RE = re.compile(r"^(?P<module>.+?)\.alpha$")


class CheckpointError(ValueError):
    """A checkpoint file does not fit the model; the message names the file and the keys."""


@dataclass
class LoRAWeights:
    """Per module: A [r, in], B [out, r], scale (alpha / r, 1.0 when unknown)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        return next((a.shape[0] for a, _ in self.modules.values()), None)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """`X.lora_A.default.weight` keys, scale folded into A (DESIGN format keys)."""
        out = {}
        for name, (a, b) in self.modules.items():
            out[f"{name}.lora_A.default.weight"] = a * self.scale.get(name, 1.0)
            out[f"{name}.lora_B.default.weight"] = b
        return out

    def fused_form(self, strength: float = 1.0) -> dict[str, torch.Tensor]:
        """diffsynth's loader form: `X.lora_A.weight` (scale and strength folded into A)."""
        out = {}
        for name, (a, b) in self.modules.items():
            out[f"{name}.lora_A.weight"] = a * (self.scale.get(name, 1.0) * strength)
            out[f"{name}.lora_B.weight"] = b
        return out


@dataclass
class Checkpoint:
    path: Path | None
    lora: LoRAWeights
    ste: dict[str, torch.Tensor]
    metadata: dict[str, Any]

    @property
    def has_ste(self) -> bool:
        return bool(self.ste)

    @property
    def variant(self) -> str | None:
        return self.metadata.get("variant")


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in LORA_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def parse_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None,
                     path: Path | None = None) -> Checkpoint:
    where = f"{path}: " if path else ""
    metadata = dict(metadata or {})
    ste, a_w, b_w, alphas, unknown = {}, {}, {}, {}, []
    for key, value in sd.items():
        if key.startswith(STE_PREFIX):
            ste[key[len(STE_PREFIX):]] = value
            continue
        k = _strip_prefix(key)
        m = _LORA_RE.match(k)
        if m:
            (a_w if m["kind"] in ("lora_A", "lora_down") else b_w)[m["module"]] = value
            continue
        m = _ALPHA_RE.match(k)
        if m:
            alphas[m["module"]] = float(value.float().reshape(-1)[0])
            continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"{where}unrecognised keys (neither LoRA nor STE): {_names(unknown)}")
    lonely = sorted(set(a_w) ^ set(b_w))
    if lonely:
        raise CheckpointError(f"{where}LoRA modules with only one of A/B: {_names(lonely)}")
    lora = LoRAWeights()
    meta_alpha = metadata.get("lora_alpha")
    for name in sorted(a_w):
        a, b = a_w[name], b_w[name]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{where}LoRA {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not form a "
                                  f"low-rank pair")
        lora.modules[name] = (a, b)
        rank = a.shape[0]
        if name in alphas:
            lora.scale[name] = alphas[name] / rank
        elif meta_alpha is not None and not metadata.get("alpha_folded", False):
            lora.scale[name] = float(meta_alpha) / rank
    return Checkpoint(path=path, lora=lora, ste=ste, metadata=metadata)


def _decode_metadata(raw: dict[str, str]) -> dict[str, Any]:
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def read_metadata(path: Path | str) -> dict[str, Any]:
    """The checkpoint's metadata from the safetensors header alone (no tensor is read); {} when unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return _decode_metadata(f.metadata() or {})
    except Exception:  # damaged or not a safetensors file
        return {}


def looks_loadable(path: Path | str) -> bool:
    """Whether the file's safetensors header names only LoRA/STE keys (what `read_checkpoint` accepts); nothing but
    the header is read. A run's resume state (`state/trainable.safetensors`, `state/optimizer.safetensors`) is not."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # damaged or not a safetensors file
        return False
    return bool(keys) and all(k.startswith(STE_PREFIX) or _LORA_RE.match(_strip_prefix(k)) or
                              _ALPHA_RE.match(_strip_prefix(k)) for k in keys)


def read_checkpoint(path: Path | str) -> Checkpoint:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: only .safetensors checkpoints are read (no pickles)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        sd = {}
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return parse_state_dict(sd, _decode_metadata(raw_meta), path)


def write_checkpoint(path: Path | str, lora_state: dict[str, torch.Tensor], ste_state: dict[str, torch.Tensor] | None,
                     metadata: dict[str, Any]) -> Path:
    """Atomic write. `lora_state` has PEFT keys (`….lora_A.default.weight`), `ste_state` the STE's own keys."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state.items()}
    for k, v in (ste_state or {}).items():
        tensors[STE_PREFIX + k] = v.detach().to("cpu").contiguous()
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    atomic_save_safetensors(path, tensors, metadata=meta)
    return path


def _names(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_against_model(ckpt: Checkpoint, dit: torch.nn.Module, ste_template: torch.nn.Module | None,
                        variant: str | None = None) -> None:
    """Raise CheckpointError unless every LoRA module exists with matching shapes and the STE (if any) is complete."""
    where = f"{ckpt.path}: " if ckpt.path else ""
    if variant is not None and ckpt.variant is not None and str(ckpt.variant) != str(variant):
        raise CheckpointError(f"{where}made for Qwen-Image-Edit-{ckpt.variant}, but the loaded model is "
                              f"Qwen-Image-Edit-{variant}")
    linears = {}
    for name, mod in dit.named_modules():
        weight = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear):  # its declared shape: fp8 or host-resident weights hold placeholders
            linears[name.replace(".base_layer", "")] = (mod.out_features, mod.in_features)
        elif isinstance(weight, torch.Tensor) and weight.ndim == 2:
            linears[name.replace(".base_layer", "")] = tuple(weight.shape)
    missing = [n for n in ckpt.lora.modules if n not in linears]
    if missing:
        raise CheckpointError(f"{where}LoRA targets modules the model does not have: {_names(missing)}")
    bad = []
    for name, (a, b) in ckpt.lora.modules.items():
        out_f, in_f = linears[name]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            bad.append(f"{name} (LoRA {b.shape[0]}x{a.shape[1]}, model {out_f}x{in_f})")
    if bad:
        raise CheckpointError(f"{where}LoRA shapes do not fit the model: {_names(bad)}")
    if ckpt.ste:
        if ste_template is None:
            raise CheckpointError(f"{where}has STE weights but no STE is available for this model")
        expected = {k: tuple(v.shape) for k, v in ste_template.state_dict().items()}
        missing = set(expected) - set(ckpt.ste)
        extra = set(ckpt.ste) - set(expected)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing STE keys: {_names(missing)}")
            if extra:
                parts.append(f"unexpected STE keys: {_names(extra)}")
            raise CheckpointError(f"{where}STE does not fit this model ({len(expected)} tensors expected, "
                                  f"{len(ckpt.ste)} found); " + "; ".join(parts))
        wrong = [f"{k} {tuple(v.shape)} != {expected[k]}" for k, v in ckpt.ste.items() if tuple(v.shape) != expected[k]]
        if wrong:
            raise CheckpointError(f"{where}STE shapes do not fit the model: {_names(wrong)}")
    if not ckpt.lora.modules and not ckpt.ste:
        raise CheckpointError(f"{where}contains neither LoRA nor STE weights")
