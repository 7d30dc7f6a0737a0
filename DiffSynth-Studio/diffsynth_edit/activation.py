"""The DiT MLP's activation: the released models' tanh-GELU (default) or diffsynth 2.1.12's sigmoid approximation.

The released Qwen-Image(-Edit) transformers run `gelu(x, approximate="tanh")` in every block's `img_mlp`/`txt_mlp`
(diffusers' `QwenImageTransformer2DModel`, `activation_fn="gelu-approximate"`; ComfyUI computes the same), while
diffsynth 2.1.12's `ApproximateGELU` computes `x * sigmoid(1.702 x)`. A LoRA trained under one runs under the other
elsewhere, so the workspace computes the reference by default and keeps diffsynth's approximation as an option for
reproducing checkpoints trained with it. The choice is recorded in every checkpoint's metadata (`dit_activation`).

The switch changes the class of the loaded model's `ApproximateGELU` modules (same `proj` child, same state-dict keys,
LoRA layers injected into `proj` keep working); diffsynth's installed files are not touched.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffsynth.models.qwen_image_dit import ApproximateGELU

Activation = Literal["gelu-tanh", "sigmoid-1.702"]
ActivationChoice = Literal["auto", "gelu-tanh", "sigmoid-1.702"]
REFERENCE: Activation = "gelu-tanh"
DIFFSYNTH: Activation = "sigmoid-1.702"
ACTIVATIONS: tuple[str, ...] = (REFERENCE, DIFFSYNTH)
METADATA_KEY = "dit_activation"
# Workspace checkpoints written before the field existed were all trained under diffsynth's approximation.
LEGACY_ACTIVATION: Activation = DIFFSYNTH


class TanhGELU(ApproximateGELU):
    """`ApproximateGELU` computing the released models' tanh-GELU (diffusers' "gelu-approximate")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


_CLASSES = {REFERENCE: TanhGELU, DIFFSYNTH: ApproximateGELU}


def check_activation(name: str, what: str = "dit_activation") -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"{what} must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return name  # type: ignore[return-value]


def set_dit_activation(dit: torch.nn.Module, name: str) -> int:
    """Make every MLP activation of `dit` compute `name`; returns how many modules were switched (idempotent)."""
    cls = _CLASSES[check_activation(name)]
    n = 0
    for module in dit.modules():
        if isinstance(module, ApproximateGELU):
            module.__class__ = cls
            n += 1
    return n


def dit_activation(dit: torch.nn.Module) -> Activation | None:
    """The activation `dit` computes now (None: no MLP activation found, or a mixture)."""
    found = {REFERENCE if isinstance(m, TanhGELU) else DIFFSYNTH for m in dit.modules() if isinstance(m, ApproximateGELU)}
    return found.pop() if len(found) == 1 else None


def checkpoint_activation(metadata: dict[str, Any], where: str = "checkpoint",
                          has_ste: bool = False) -> tuple[Activation, str | None]:
    """(activation a checkpoint was trained with, a notice when it had to be assumed).

    Without the field: a file of this workspace's trainer (metadata `format` "qwen-edit-workspace/…", or STE weights,
    which only this workspace and the original one write) predates the field and was trained under diffsynth's
    approximation, so that is assumed; any other LoRA (ComfyUI/diffusers exports, other trainers) is assumed to be
    made for the released model's activation. Both are said in the notice."""
    value = metadata.get(METADATA_KEY)
    if value is not None:
        return check_activation(str(value), f"{where}: {METADATA_KEY}"), None
    if has_ste or str(metadata.get("format", "")).startswith("qwen-edit-workspace"):
        return LEGACY_ACTIVATION, (f"{where} records no {METADATA_KEY} (written before the field existed): assuming "
                                   f"diffsynth's {LEGACY_ACTIVATION} it was trained with")
    return REFERENCE, (f"{where} records no {METADATA_KEY} and is not a workspace checkpoint: assuming the released "
                       f"model's {REFERENCE}")
