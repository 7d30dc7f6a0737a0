"""The STE ("Spatial Temporal Encoder"; in effect a per-block RoPE gate for the sub stream).

One small module per DiT block reads the image-stream hidden state entering that block and gives one logit per
token. gate = 1[logit >= 0] forward, sigmoid straight-through backward. The zero-initialised head makes every gate 1
at the start (identity: sub tokens keep their own RoPE). Parameter names follow the original workspace's checkpoints
(`ste_blocks.{i}.proj_down`, `ste_blocks.{i}.encoder.layers.0.self_attn.in_proj_weight`, ..., `heads.{i}`).
No dropout anywhere, so train and eval forwards agree.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffsynth.models.general_modules import RMSNorm

STE_DIM = 64
STE_HEADS = 8
STE_FF = 64


class STESelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, on SDPA."""

    def __init__(self, dim: int = STE_DIM, heads: int = STE_HEADS):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Outputs for the tokens `rows` only (all tokens are keys and values)."""
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q[:, :, rows], k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, -1, d))


class STEEncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer (RMSNorm, ReLU feed-forward)."""

    def __init__(self, dim: int = STE_DIM, heads: int = STE_HEADS, ff: int = STE_FF):
        super().__init__()
        self.self_attn = STESelfAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.norm2 = RMSNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """The layer's output for the tokens `rows` (attention over all tokens; the rest is per token)."""
        x = x[:, rows] + self.self_attn(self.norm1(x), rows)
        return x + self.linear2(F.relu(self.linear1(self.norm2(x))))


class STEEncoder(nn.Module):
    def __init__(self, dim: int = STE_DIM):
        super().__init__()
        self.layers = nn.ModuleList([STEEncoderLayer(dim)])
        self.norm = RMSNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Outputs for the tokens `rows`: every layer but the last needs all tokens; the last one only computes
        queries (and everything after attention) for `rows` — the same numbers for a fraction of the work."""
        for i, layer in enumerate(self.layers):
            x = layer(x, rows if i == len(self.layers) - 1 else slice(None))
        return self.norm(x)


class STEBlock(nn.Module):
    def __init__(self, in_dim: int, dim: int = STE_DIM):
        super().__init__()
        self.proj_down = nn.Linear(in_dim, dim)
        self.encoder = STEEncoder(dim)

    def forward(self, h: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        return self.encoder(self.proj_down(h), rows)


def straight_through_gate(logits: torch.Tensor) -> torch.Tensor:
    """Hard 0/1 forward, sigmoid gradient backward."""
    soft = torch.sigmoid(logits)
    hard = (logits >= 0).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly 0 or 1 forward (hard + soft − soft can round to 0.99999994)


class STE(nn.Module):
    """One gate module per DiT block. `forward(h, i)` -> gate in {0,1} of shape [B, L]."""

    def __init__(self, num_blocks: int, in_dim: int = 3072, dim: int = STE_DIM):
        super().__init__()
        self.num_blocks = num_blocks
        self.in_dim = in_dim
        self.ste_blocks = nn.ModuleList([STEBlock(in_dim, dim) for _ in range(num_blocks)])
        self.heads = nn.ModuleList([nn.Linear(dim, 1) for _ in range(num_blocks)])
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @classmethod
    def for_dit(cls, dit: nn.Module) -> "STE":
        return cls(num_blocks=len(dit.transformer_blocks), in_dim=dit.img_in.out_features)

    def logits(self, h: torch.Tensor, block_index: int, rows: slice = slice(None)) -> torch.Tensor:
        """Logits [B, len(rows)] of the tokens `rows` of `h` [B, L, in_dim] (every token is attended to).

        The DiT only reads the sub tokens' gates, so it asks for those rows: the attention then computes ~1/9 of
        the queries at 1024² (identical numbers). fp32 weights run under bf16 autocast on CUDA: in fp32 the 64-wide
        attention over ~10k tokens falls back to the slow math kernel (measured on an H200: +0.27 s per 1024²
        forward in fp32, +0.03 s in bf16)."""
        dtype = self.heads[block_index].weight.dtype
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=h.is_cuda):
            # under autocast the first linear casts to bf16 anyway: no fp32 copy of the ~10k x 3072 hidden state
            out = self.heads[block_index](self.ste_blocks[block_index](h if h.is_cuda else h.to(dtype), rows))
        return out.squeeze(-1).float()

    def forward(self, h: torch.Tensor, block_index: int, rows: slice = slice(None)) -> torch.Tensor:
        """Hard 0/1 gates [B, len(rows)] (sigmoid gradient)."""
        return straight_through_gate(self.logits(h, block_index, rows).float())
