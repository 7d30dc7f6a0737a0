"""fp8 storage of the frozen DiT's linear weights, for training (and editing) on small cards.

Each frozen `nn.Linear` in the transformer blocks keeps its weight as float8 e4m3 with one fp32 scale per output
channel (`speedups._rowwise_fp8`, the quantisation of the inference fp8 mode) and computes in the activations' dtype:
the weight is dequantised right before its matmul and dropped after it. Half the bytes of bf16 for the 20 B frozen
parameters; the activations are never quantised, so the only approximation is the weight rounding (e4m3: relative
error ≤ 2^-4 per weight).

Training needs gradients through the frozen layers: `Fp8LinearFunction`'s backward returns
grad_input = grad_out @ W_dequantised and no weight gradient, and saves only the fp8 weight (not the input). The
module stays an `nn.Linear` (peft's `base_layer` under a LoRA wrapper, or a plain layer), so peft's LoRA branch, the
checkpoint keys of the LoRA and the LoRA's own dtype (bf16/fp32 trainables) are unchanged.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .speedups import _rowwise_fp8


def dequantise(weight_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W ≈ weight_fp8 * scale (scale [out, 1]) in `dtype`."""
    return weight_fp8.to(dtype) * scale.to(dtype)


class Fp8LinearFunction(torch.autograd.Function):
    """y = x @ deq(W)^T + b with gradients for x only (the base weights and bias are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_fp8: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight_fp8, scale)
        return F.linear(x, dequantise(weight_fp8, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight_fp8, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantise(weight_fp8, scale, grad_out.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _fp8_linear_forward(self: torch.nn.Linear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    out = Fp8LinearFunction.apply(x, self.fp8_weight, self.fp8_scale, self.bias)
    if getattr(self, "lora_A_weights", None):  # diffsynth's hot-loaded LoRAs (the editor's hot-swap mode)
        out = self.lora_forward(x, out)
    return out


def to_fp8_linear(linear: torch.nn.Linear, device: torch.device | str | None = None) -> None:
    """In place: store `linear`'s weight as fp8 + per-row scale on `device` (default: where it is). The quantisation
    runs on that device, one layer at a time, so a model loaded on the host never has a whole bf16 copy there."""
    if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
        raise ValueError("fp8 storage is for frozen linears only; this one has trainable weights")
    w = linear.weight.detach().to(device or linear.weight.device)
    wq, scale = _rowwise_fp8(w)
    linear.register_buffer("fp8_weight", wq, persistent=False)
    linear.register_buffer("fp8_scale", scale, persistent=False)
    # An empty weight of the original dtype: dtype queries (the trainer's `frozen_dtype`) keep working and any code
    # that would use the full weight fails loudly instead of reading stale numbers.
    linear.weight = torch.nn.Parameter(torch.empty(0, dtype=w.dtype, device=wq.device), requires_grad=False)
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.to(wq.device)
    linear.forward = types.MethodType(_fp8_linear_forward, linear)


def frozen_linears(root: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(name, layer) of every frozen `nn.Linear` inside `root`: peft's base layers and diffsynth's hot-load wrappers
    (`AutoWrappedLinear`, an `nn.Linear`) included; LoRA A/B and layers already converted left out."""
    out = []
    for name, module in root.named_modules():
        if (isinstance(module, torch.nn.Linear) and not hasattr(module, "fp8_weight")
                and not module.weight.requires_grad and ".lora_" not in f".{name}"):
            out.append((name, module))
    return out


def quantise_frozen_blocks(dit: torch.nn.Module, device: torch.device | str | None = None) -> int:
    """fp8 storage for all frozen linears of the transformer blocks (attention, MLPs and the modulation linears, a
    third of the parameters); the in/out layers, norms and embeddings stay in their dtype. Returns how many."""
    layers = frozen_linears(dit.transformer_blocks)
    for _, layer in layers:
        to_fp8_linear(layer, device)
    return len(layers)
