"""Third-party LoRA files: detect the key layout, convert to per-module (A, B, scale), check against the DiT.

Layouts read (each key is `<prefix><module><pair key>`; `<module>` is a DiT module path such as
`transformer_blocks.0.attn.to_q`, spelled with `_` instead of `.` in the kohya layout):

| layout | prefix | pair keys | `.alpha` |
| --- | --- | --- | --- |
| diffusers | `transformer.` | `.lora_A.weight` / `.lora_B.weight` | optional |
| comfyui | `diffusion_model.` | `.lora_A.weight` / `.lora_B.weight` (or `lora_down`/`lora_up`) | optional |
| kohya | `lora_unet_` (module path with `_`) | `.lora_down.weight` / `.lora_up.weight` | usually |
| diffsynth | none | `.lora_A.weight` / `.lora_B.weight`, or PEFT's `.lora_A.default.weight` | none |
| lightning | none | `.lora_down.weight` / `.lora_up.weight` | always |

"lightning" is how lightx2v publishes its distilled Qwen-Image(-Edit) Lightning LoRAs (e.g.
`Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors`): `transformer_blocks.N.<module>.lora_down.weight`,
`.lora_up.weight` and a scalar `.alpha` per module, no prefix, rank 64 with alpha ≠ rank in the published files (so
the alpha must be applied; lightx2v's own converter and diffusers' Qwen conversion both fold alpha/rank in).

The delta of a module is `strength · scale · B @ A` with `scale = alpha / rank` when the file has an `.alpha` for it,
else 1 (alpha = rank, what DiffSynth and PEFT's default save). An `.alpha` beside `lora_A`/`lora_B` is applied too
(ComfyUI and kohya do; the layout carries no other meaning for it). Every key must be a LoRA tensor of a module the
model has, with fitting shapes; anything else is refused with the key named (nothing is skipped silently).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from .checkpoint import STE_PREFIX, CheckpointError, LoRAWeights
from .lora_stack import LoRALayer

LAYOUTS = ("diffusers", "comfyui", "kohya", "diffsynth", "lightning")
_PREFIXES = {"transformer.": "diffusers", "diffusion_model.": "comfyui", "lora_unet_": "kohya"}
_PAIR_RE = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
_ALPHA_RE = re.compile(r"^(?P<module>.+?)\.alpha$")


class LoRAFormatError(CheckpointError):
    """A LoRA file cannot be used with this model; the message names the file and the key."""


@dataclass
class LoRAFile:
    """One third-party LoRA, converted: modules in the DiT's names, the layout it was read as, where it came from."""

    path: Path | None
    layout: str
    lora: LoRAWeights
    keys: dict[str, str]  # module -> one key of the file that names it (for error messages)

    @property
    def rank(self) -> int | None:
        return self.lora.rank


def _linear_shapes(dit: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of the DiT, by module path (hot-load and fp8 wrappers included)."""
    shapes = {}
    for name, mod in dit.named_modules():
        name = name.replace(".base_layer", "")
        if isinstance(mod, torch.nn.Linear):
            shapes[name] = (mod.out_features, mod.in_features)
        else:
            weight = getattr(mod, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim == 2:
                shapes.setdefault(name, tuple(weight.shape))
    return shapes


def _split_prefix(key: str) -> tuple[str, str]:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix):]
    return "", key


def detect_layout(keys: list[str]) -> str:
    """The layout name of a file's keys (see the module docstring); LoRAFormatError for mixed prefixes."""
    prefixes = {}
    for key in keys:
        prefixes.setdefault(_split_prefix(key)[0], key)
    if len(prefixes) > 1:
        shown = ", ".join(f"{k!r}" for k in prefixes.values())
        raise LoRAFormatError(f"keys with different prefixes in one file ({shown})")
    prefix = next(iter(prefixes), "")
    if prefix:
        return _PREFIXES[prefix]
    down_up = any(".lora_down." in k or ".lora_up." in k for k in keys)
    return "lightning" if down_up and any(k.endswith(".alpha") for k in keys) else "diffsynth"


def parse_lora_state_dict(sd: Mapping[str, torch.Tensor], dit: torch.nn.Module,
                          path: Path | str | None = None) -> LoRAFile:
    """Convert a LoRA state dict in any layout of LAYOUTS to the DiT's module names and check it against `dit`.

    Raises LoRAFormatError naming the first offending keys: unknown keys, STE keys, modules the model does not have,
    a down/up without its partner, shapes that do not fit, an alpha without weights."""
    where = f"{path}: " if path is not None else ""
    keys = list(sd)
    if not keys:
        raise LoRAFormatError(f"{where}the file holds no tensors")
    ste = [k for k in keys if k.startswith(STE_PREFIX)]
    if ste:
        raise LoRAFormatError(f"{where}key {ste[0]!r} is an STE weight: STE weights are read from a workspace "
                              f"checkpoint (--checkpoint / the checkpoint picker), not from an extra LoRA")
    try:
        layout = detect_layout(keys)
    except LoRAFormatError as e:
        raise LoRAFormatError(f"{where}{e}") from None
    shapes = _linear_shapes(dit)
    kohya_names = {}
    if layout == "kohya":
        for name in shapes:
            kohya_names.setdefault(name.replace(".", "_"), []).append(name)

    def module_of(key: str, raw: str) -> str:
        if layout != "kohya":
            return raw
        names = kohya_names.get(raw, [])
        if len(names) != 1:
            what = "no module of the model" if not names else f"several modules ({', '.join(names)})"
            raise LoRAFormatError(f"{where}key {key!r} names {what}")
        return names[0]

    down, up, alpha, source = {}, {}, {}, {}
    for key in keys:
        _, rest = _split_prefix(key)
        m = _PAIR_RE.match(rest)
        if m is not None:
            module = module_of(key, m["module"])
            (down if m["kind"] in ("lora_A", "lora_down") else up)[module] = (key, sd[key])
            source.setdefault(module, key)
            continue
        m = _ALPHA_RE.match(rest)
        if m is not None:
            module = module_of(key, m["module"])
            value = sd[key]
            if value.numel() != 1:
                raise LoRAFormatError(f"{where}key {key!r}: an alpha must be one number, got shape "
                                      f"{tuple(value.shape)}")
            alpha[module] = (key, float(value.double().reshape(-1)[0]))
            continue
        raise LoRAFormatError(f"{where}key {key!r} is not a LoRA tensor (expected "
                              f"<module>.lora_A/lora_B/lora_down/lora_up.weight or <module>.alpha; layout {layout})")
    for module in sorted(set(down) ^ set(up)):
        key = (down.get(module) or up.get(module))[0]
        other = "up/B" if module in down else "down/A"
        raise LoRAFormatError(f"{where}key {key!r} has no {other} partner for module {module}")
    for module, (key, _) in sorted(alpha.items()):
        if module not in down:
            raise LoRAFormatError(f"{where}key {key!r} is an alpha without LoRA weights for module {module}")
    lora = LoRAWeights()
    for module in sorted(down):
        (down_key, a), (up_key, b) = down[module], up[module]
        if module not in shapes:
            raise LoRAFormatError(f"{where}key {down_key!r} targets {module}, which the model does not have "
                                  f"(or which is not a linear layer)")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoRAFormatError(f"{where}keys {down_key!r} {tuple(a.shape)} and {up_key!r} {tuple(b.shape)} do "
                                  f"not form a low-rank pair")
        out_f, in_f = shapes[module]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise LoRAFormatError(f"{where}key {down_key!r}: the LoRA maps {a.shape[1]} -> {b.shape[0]} features, "
                                  f"module {module} of the model maps {in_f} -> {out_f}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise LoRAFormatError(f"{where}key {down_key!r}: LoRA weights must be floating point, got {a.dtype}")
        lora.modules[module] = (a, b)
        if module in alpha:
            lora.scale[module] = alpha[module][1] / a.shape[0]
    return LoRAFile(path=None if path is None else Path(path), layout=layout, lora=lora, keys=source)


def read_lora_file(path: Path | str, dit: torch.nn.Module) -> LoRAFile:
    """Read a `.safetensors` LoRA (never a pickle) and convert it with `parse_lora_state_dict`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAFormatError(f"{path}: only .safetensors LoRA files are read (no pickles)")
    if not path.is_file():
        raise LoRAFormatError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for damaged files
        raise LoRAFormatError(f"{path}: not a readable safetensors file ({e})") from None
    return parse_lora_state_dict(sd, dit, path)


def lora_layer(path: Path | str, dit: torch.nn.Module, strength: float = 1.0, name: str | None = None) -> LoRALayer:
    """A stack layer (`lora_stack.LoRALayer`) of a LoRA file, named by `name` or the path."""
    lora_file = read_lora_file(path, dit)
    return LoRALayer(name or str(path), lora_file.lora, float(strength), lora_file.layout, lora_file.path)


def to_layout(lora: LoRAWeights, layout: str, alpha: bool = True) -> dict[str, torch.Tensor]:
    """A state dict in `layout` whose conversion gives back `lora` (tests build files in every layout with it).

    With `alpha`, every module with a scale gets an `.alpha` = scale · rank; without, the scale is folded into A.
    "diffsynth" has no alpha key (scales folded), "lightning" always has one."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    prefix = {"diffusers": "transformer.", "comfyui": "diffusion_model.", "kohya": "lora_unet_"}.get(layout, "")
    down_up = layout in ("kohya", "lightning")
    with_alpha = layout == "lightning" or (alpha and layout != "diffsynth")
    out = {}
    for module, (a, b) in lora.modules.items():
        scale = lora.scale.get(module, 1.0)
        name = prefix + (module.replace(".", "_") if layout == "kohya" else module)
        if not with_alpha:
            a = a * scale
        out[f"{name}.{'lora_down' if down_up else 'lora_A'}.weight"] = a.contiguous()
        out[f"{name}.{'lora_up' if down_up else 'lora_B'}.weight"] = b.contiguous()
        if with_alpha:
            out[f"{name}.alpha"] = torch.tensor(scale * a.shape[0], dtype=torch.float32)
    return out
