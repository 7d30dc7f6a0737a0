"""fp8 storage of the frozen DiT's linear weights, for training (and editing) on small cards.

Each frozen `nn.Linear` in the transformer blocks keeps its weight as float8 e4m3 with one fp32 scale per output
channel (`speedups.rowwise_fp8`, the quantisation of the inference fp8 mode) and computes in the activations' dtype:
the weight is dequantised right before its matmul and dropped after it. Half the bytes of bf16 for the 20 B frozen
parameters; the activations are never quantised, so the only approximation is the weight rounding (e4m3: relative
error ≤ 2^-4 per weight).

Training needs gradients through the frozen layers: `Fp8LinearFunction`'s backward returns
grad_input = grad_out @ W_dequantised and no weight gradient, and saves only the fp8 weight (not the input). The
module stays an `nn.Linear` (peft's `base_layer` under a LoRA wrapper, or a plain layer), so peft's LoRA branch, the
checkpoint keys of the LoRA and the LoRA's own dtype (bf16/fp32 trainables) are unchanged.

`fp8_matmuls` (a speed lever, not a memory one) goes further for the blocks' token linears: both GEMMs of a frozen
layer run on the fp8 tensor cores (`Fp8MatmulFunction`). The forward quantises the input per token and multiplies by
W quantised per output channel; the backward quantises grad_out per token and multiplies by W quantised per input
channel (a second fp8 copy: the two copies take the bytes of one bf16 weight). Each product is then exact up to the
e4m3 rounding of its two operands (3 mantissa bits each) and fp32 accumulation.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .speedups import fp8_matmul, rowwise_fp8


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


def _require_frozen(linear: torch.nn.Linear, what: str) -> None:
    if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
        raise ValueError(f"{what} for frozen linears only; this one has trainable weights")


def to_fp8_linear(linear: torch.nn.Linear, device: torch.device | str | None = None) -> None:
    """In place: store `linear`'s weight as fp8 + per-row scale on `device` (default: where it is). The quantisation
    runs on that device, one layer at a time, so a model loaded on the host never has a whole bf16 copy there."""
    _require_frozen(linear, "fp8 storage is")
    w = linear.weight.detach().to(device or linear.weight.device)
    wq, scale = rowwise_fp8(w)
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
                and not hasattr(module, "fp8_fwd_operand")
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


# ---- fp8 matmuls (training speed) -------------------------------------------------------------------------------
class Fp8MatmulFunction(torch.autograd.Function):
    """y = x @ W^T + b, forward and input gradient on fp8 tensor cores; no weight or bias gradient (frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd_operand: torch.Tensor, fwd_scale: torch.Tensor, bwd_operand: torch.Tensor,
                bwd_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(bwd_operand, bwd_scale)  # not x: there is no weight gradient
        return fp8_matmul(x, fwd_operand, fwd_scale, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        bwd_operand, bwd_scale = ctx.saved_tensors
        grad_x = fp8_matmul(grad_out, bwd_operand, bwd_scale) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def _fp8_matmul_linear_forward(self: torch.nn.Linear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return Fp8MatmulFunction.apply(x, self.fp8_fwd_operand, self.fp8_fwd_scale, self.fp8_bwd_operand,
                                   self.fp8_bwd_scale, self.bias)


def to_fp8_matmul_linear(linear: torch.nn.Linear) -> None:
    """In place: `linear` (frozen, W [out, in]) computes both its GEMMs in fp8. Buffers, each a column-major view
    (`_scaled_mm`'s layout, stored so: a `.t()` taken inside a compiled graph may be materialised row-major in the
    backward):
    `fp8_fwd_operand` = W^T [in, out] quantised per output channel (`fp8_fwd_scale` [1, out]) for the forward,
    `fp8_bwd_operand` = W [out, in] quantised per input channel (`fp8_bwd_scale` [1, in]) for the input gradient.
    The original weight is released (an empty placeholder of its dtype stays)."""
    _require_frozen(linear, "fp8 matmuls are")
    w = linear.weight.detach()
    wq, scale = rowwise_fp8(w)  # rows = output channels
    wtq, scale_t = rowwise_fp8(w.t().contiguous())  # rows = input channels (contiguous: elementwise ops keep strides)
    linear.register_buffer("fp8_fwd_operand", wq.t(), persistent=False)
    linear.register_buffer("fp8_fwd_scale", scale.t().contiguous(), persistent=False)
    linear.register_buffer("fp8_bwd_operand", wtq.t(), persistent=False)
    linear.register_buffer("fp8_bwd_scale", scale_t.t().contiguous(), persistent=False)
    linear.weight = torch.nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)
    linear.forward = types.MethodType(_fp8_matmul_linear_forward, linear)


def fp8_matmul_blocks(dit: torch.nn.Module) -> int:
    """fp8 matmuls for the transformer blocks' frozen token linears (attention projections and MLPs, peft's base
    layers included); the modulation linears (one row per sample: nothing to gain), the LoRA and the in/out layers
    stay as they are. Returns how many layers."""
    layers = [(n, m) for n, m in frozen_linears(dit.transformer_blocks) if "_mod" not in n]
    for _, layer in layers:
        to_fp8_matmul_linear(layer)
    return len(layers)
