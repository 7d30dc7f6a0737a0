"""Several LoRAs on one DiT, each with its own strength: applied together, changed or removed one at a time.

The effective weight of a linear layer is `W0 + Σ_i strength_i · scale_i · B_i @ A_i` over the stacked layers that
touch it, in stack order. Two ways to apply it:

- "hot": nothing is merged. Each layer's pair goes into the module's diffsynth hot-load lists (`lora_A_weights`,
  `lora_B_weights`; the model must have been made hot-loadable with `pipe.enable_lora_hot_loading`), which the
  forward adds as `x A_iᵀ B_iᵀ`. Removing a layer rebuilds the lists from the remaining layers' same tensors, so
  the state afterwards is exactly the one before it was added. Costs one low-rank matmul pair per layer per call.
- "merge": the deltas are summed in float32 (float64 for a float64 model) and added to the weights once. With
  `keep_originals` a copy of every touched weight is kept (on its device) and each change recomputes
  `W0 + Σ` from it: removing a layer restores the previous weights exactly, nothing is ever subtracted. Without
  it (the CLI: no copy of a 20 B model) layers can only be appended; any other change is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from .checkpoint import CheckpointError, LoRAWeights


class LoRAStackError(CheckpointError):
    """The stack cannot be changed this way; the message says why and what to do."""


@dataclass(frozen=True, eq=False)
class LoRALayer:
    """One stacked LoRA: its weights, strength, and a name for messages and settings (file id, 'checkpoint')."""

    name: str
    lora: LoRAWeights
    strength: float = 1.0
    layout: str = ""
    path: Path | None = None
    _prepared: dict = field(default_factory=dict, repr=False, compare=False)

    def info(self) -> dict:
        return {"name": self.name, "strength": self.strength, "layout": self.layout or None,
                "rank": self.lora.rank, "modules": len(self.lora.modules)}

    def factor(self, module: str) -> float:
        return self.lora.scale.get(module, 1.0) * self.strength


def module_delta(layers: Sequence[LoRALayer], module: str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor | None:
    """Σ strength · scale · B @ A over the layers that touch `module`, in `dtype` (None when none does)."""
    total = None
    for layer in layers:
        pair = layer.lora.modules.get(module)
        if pair is None:
            continue
        a, b = (t.to(device=device, dtype=dtype) for t in pair)
        delta = (b @ a) * layer.factor(module)
        total = delta if total is None else total + delta
    return total


class LoRAStack:
    """The LoRA layers applied to `get_dit()` (looked up on every change, as speed-ups may replace modules)."""

    def __init__(self, get_dit: Callable[[], torch.nn.Module], mode: Literal["hot", "merge"] = "hot",
                 keep_originals: bool = False):
        if mode not in ("hot", "merge"):
            raise ValueError(f"mode must be 'hot' or 'merge', got {mode!r}")
        self.get_dit = get_dit
        self.mode = mode
        self.keep_originals = keep_originals
        self.layers: list[LoRALayer] = []
        self.originals: dict[str, torch.Tensor] = {}

    # ---- public -----------------------------------------------------------------------------------------------
    def set_layers(self, layers: Sequence[LoRALayer]) -> None:
        """Make `layers` (in this order) the stack. Raises LoRAStackError before touching anything when the change
        is impossible (a merged stack without originals can only grow at its end; a module is not hot-loadable)."""
        layers = list(layers)
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise LoRAStackError(f"LoRA {dup!r} is stacked twice")
        old = self.layers
        if layers == old and all(a is b for a, b in zip(layers, old)):
            return
        modules = dict(self.get_dit().named_modules())
        touched = sorted({m for layer in [*old, *layers] for m in layer.lora.modules})
        missing = [m for m in touched if m not in modules]
        if missing:
            raise LoRAStackError(f"the model has no module {missing[0]} (LoRA targets it)")
        if self.mode == "hot":
            plain = [m for m in touched if not hasattr(modules[m], "lora_A_weights")]
            if plain:
                raise LoRAStackError(f"module {plain[0]} is not hot-loadable (enable_lora_hot_loading first)")
            self._apply_hot(layers, touched, modules)
        elif self.keep_originals:
            self._apply_merged(layers, touched, modules)
        else:
            appended = len(layers) >= len(old) and all(a is b for a, b in zip(layers, old))
            if not appended:
                raise LoRAStackError("a LoRA is already fused into this editor's model and its original weights "
                                     "were not kept, so it cannot be removed or changed; create the editor with "
                                     "hot_swap=True to switch checkpoints or extra LoRAs")
            self._fuse(layers[len(old):], modules)
        self.layers = layers

    def add(self, layer: LoRALayer) -> None:
        self.set_layers([*[x for x in self.layers if x.name != layer.name], layer])

    def remove(self, name: str) -> None:
        self.set_layers([x for x in self.layers if x.name != name])

    def clear(self) -> None:
        self.set_layers([])

    def info(self) -> list[dict]:
        return [layer.info() for layer in self.layers]

    # ---- hot --------------------------------------------------------------------------------------------------
    def _hot_pair(self, layer: LoRALayer, module: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A · strength · scale, B) in the module's dtype and device, made once per layer and module."""
        key = (module, like.dtype, like.device)
        if key not in layer._prepared:
            a, b = layer.lora.modules[module]
            a = (a.to(torch.float64 if like.dtype == torch.float64 else torch.float32) * layer.factor(module))
            layer._prepared[key] = (a.to(device=like.device, dtype=like.dtype),
                                    b.to(device=like.device, dtype=like.dtype))
        return layer._prepared[key]

    def _apply_hot(self, layers, touched, modules) -> None:
        for name in touched:
            mod = modules[name]
            like = _reference_tensor(mod)
            pairs = [self._hot_pair(layer, name, like) for layer in layers if name in layer.lora.modules]
            mod.lora_A_weights.clear()
            mod.lora_B_weights.clear()
            for a, b in pairs:
                mod.lora_A_weights.append(a)
                mod.lora_B_weights.append(b)

    # ---- merge ------------------------------------------------------------------------------------------------
    def _apply_merged(self, layers, touched, modules) -> None:
        for name in touched:
            weight = _weight_of(modules[name], name)
            if name not in self.originals:
                self.originals[name] = weight.detach().clone()
            original = self.originals[name]
            delta = module_delta(layers, name, _compute_dtype(original), original.device)
            with torch.no_grad():
                if delta is None:
                    weight.copy_(original)
                    del self.originals[name]
                else:
                    weight.copy_((original.to(delta.dtype) + delta).to(original.dtype))

    def _fuse(self, new_layers, modules) -> None:
        for name in sorted({m for layer in new_layers for m in layer.lora.modules}):
            weight = _weight_of(modules[name], name)
            delta = module_delta(new_layers, name, _compute_dtype(weight), weight.device)
            with torch.no_grad():
                weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _weight_of(module: torch.nn.Module, name: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.numel() == 0:
        raise LoRAStackError(f"module {name} has no mergeable weight (fp8 weights cannot absorb a LoRA: use "
                             f"hot_swap=True)")
    return weight


def _reference_tensor(module: torch.nn.Module) -> torch.Tensor:
    """An empty tensor with the module's weight dtype and device (the fp8 path keeps an empty weight of the original
    dtype), which the hot-loaded pair is stored in."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise LoRAStackError(f"module {module} has no weight")
    return torch.empty(0, dtype=weight.dtype, device=weight.device)
