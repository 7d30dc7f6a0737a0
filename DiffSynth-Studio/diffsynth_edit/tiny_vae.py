"""An analytic tiny VAE: the real `QwenImageVAE` module tree (base_dim 8, z_dim 16) with weights set by hand so that
it reconstructs low-frequency images, deterministically and without any fitting.

What it computes (pixels p in [-1, 1], f = the mean RGB colour of each 8×8 patch):
    encode:  z = LATENT_SCALE · Q f                (16 channels; Q = 3 columns of a 16×16 Hadamard matrix / 4,
                                                     orthonormal, so every latent channel carries the colour)
    decode:  image = f̂ repeated over its 8×8 patch, f̂ = Qᵀ z / LATENT_SCALE (the 13 directions off Q are ignored)
so images made of flat 8-px blocks come back exactly, and smooth content to within its variation inside a patch
(the synthetic "fill" family: ≈ 36 dB, set by its pixel grain). This replaces the random tiny VAE, whose decoder
turned every latent into the same texture (≈ 14 dB), so a tiny DiT's learning could not show in pixels.

How the real layers realise it: every residual branch and attention output projection is zero (the blocks pass
their input through), the down-sampling convs average 2×2 pixels, the up-sampling convs copy the nearest pixel, and
the only non-linear stage (RMS norm then SiLU before each `conv_out`) is made linear with two tricks: the colour is
carried as the pair (f, −f) so that `conv_out` takes SiLU(f) − SiLU(−f) = f exactly, and one channel holds a large
constant `CARRIER` so that the per-pixel RMS norm divides by (nearly) the same number everywhere (relative error
≤ 3/CARRIER² ≈ 3e-6). The latent normalisation (the VAE's fixed `mean`/`std`) is folded into `quant_conv` and
`post_quant_conv`.
"""
from __future__ import annotations

import torch
from torch import nn

from diffsynth.models.qwen_image_vae import QwenImageResample, QwenImageResidualBlock, QwenImageVAE

LATENT_SCALE = 4.0  # latents = LATENT_SCALE · (orthonormal embedding of the patch colour), ≈ unit std per channel
CARRIER = 1000.0  # the constant channel that makes the RMS norms a fixed scale
_F, _NEG, _CONST = slice(0, 3), slice(3, 6), 6  # carried channels: colour, minus colour, constant


def hadamard_embedding(z_dim: int = 16, colours: int = 3) -> torch.Tensor:
    """Q [z_dim, colours]: columns 1..colours of the Sylvester Hadamard matrix / sqrt(z_dim) (orthonormal, exact)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < z_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if h.shape[0] != z_dim:
        raise ValueError(f"z_dim {z_dim} is not a power of 2")
    return h[:, 1:1 + colours] / z_dim ** 0.5


def _center(conv: nn.Module) -> tuple[int, ...]:
    """Index of the tap that reads the current pixel (CausalConv3d: last time slice, spatial centre)."""
    k = conv.weight.shape[2:]
    if len(k) == 3:
        return (k[0] - 1, k[1] // 2, k[2] // 2)
    return (k[0] // 2, k[1] // 2)


def _carry(conv: nn.Module, taps: list[tuple[int, ...]] | None = None) -> None:
    """Pass the 7 carried channels through `conv` (averaged over `taps`, default the centre tap)."""
    taps = taps or [_center(conv)]
    for c in range(_CONST + 1):
        for t in taps:
            conv.weight[(c, c) + t] = 1.0 / len(taps)


def _split(conv: nn.Module, src: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """`conv` writes (f, −f, CARRIER) from input channels 0..2 (or from `src` [3, in] + `bias` [3], 1×1)."""
    t = _center(conv)
    if src is None:
        src = torch.eye(3, conv.weight.shape[1], dtype=torch.float64)
        bias = torch.zeros(3, dtype=torch.float64)
    for c in range(3):
        conv.weight[(slice(None), slice(None)) + t][c] = src[c].to(conv.weight.dtype)
        conv.weight[(slice(None), slice(None)) + t][3 + c] = -src[c].to(conv.weight.dtype)
        conv.bias[c] = float(bias[c])
        conv.bias[3 + c] = -float(bias[c])
    conv.bias[_CONST] = CARRIER


def _linear_head(norm: nn.Module, conv_out: nn.Module, out: torch.Tensor, bias: torch.Tensor) -> None:
    """norm → SiLU → conv_out computes `out` [n, 3] · f + bias, with f read from the carried (f, −f) pair."""
    channels = norm.gamma.shape[0]
    norm.gamma[_F] = CARRIER / channels ** 0.5
    norm.gamma[_NEG] = CARRIER / channels ** 0.5
    t = _center(conv_out)
    w = conv_out.weight[(slice(None), slice(None)) + t]
    w[:, _F] = out.to(w.dtype)
    w[:, _NEG] = -out.to(w.dtype)
    conv_out.bias.copy_(bias.to(conv_out.bias.dtype))


@torch.no_grad()
def set_analytic_vae(vae: QwenImageVAE) -> QwenImageVAE:
    """Overwrite every weight of a base_dim-8 `QwenImageVAE` (z_dim 16) with the analytic patch-colour codec."""
    if vae.z_dim != 16:
        raise ValueError(f"the analytic tiny VAE needs z_dim 16, got {vae.z_dim}")
    for p in vae.parameters():
        p.zero_()
    for m in vae.modules():  # norms: unit gain (their branches are zero anyway, except the two heads set below)
        if hasattr(m, "gamma"):
            m.gamma.fill_(1.0)
    enc, dec = vae.encoder, vae.decoder
    _split(enc.conv_in)
    for m in list(enc.modules()) + list(dec.modules()):
        if isinstance(m, QwenImageResidualBlock) and isinstance(m.conv_shortcut, nn.Conv3d):
            _carry(m.conv_shortcut)
        elif isinstance(m, QwenImageResample) and m.mode.startswith("downsample"):
            _carry(m.resample[1], [(0, 0), (0, 1), (1, 0), (1, 1)])  # 2×2 mean (the zero pad is never read)
        elif isinstance(m, QwenImageResample) and m.mode.startswith("upsample"):
            _carry(m.resample[1])  # nearest-exact ×2, then the centre tap: a copy
    # encoder head: the patch colour f in channels 0..2, then quant_conv folds in scale, Q and the VAE's mean/std
    mean = vae.mean.flatten().double()
    std = (1.0 / vae.std.flatten()).double()  # QwenImageVAE stores 1/std
    q = hadamard_embedding()
    _linear_head(enc.norm_out, enc.conv_out, torch.eye(enc.conv_out.weight.shape[0], 3, dtype=torch.float64),
                 torch.zeros(enc.conv_out.weight.shape[0], dtype=torch.float64))
    a = std[:, None] * LATENT_SCALE * q  # raw latent = a · f + mean, so (raw − mean) / std = LATENT_SCALE · Q f
    vae.quant_conv.weight[:16, :3, 0, 0, 0] = a.to(vae.quant_conv.weight.dtype)
    vae.quant_conv.bias[:16] = mean.to(vae.quant_conv.bias.dtype)
    # decoder: post_quant_conv recovers f = Qᵀ (raw − mean) / (std · LATENT_SCALE) as (f, −f, CARRIER)
    inv = q.T / (std[None, :] * LATENT_SCALE)
    _split(vae.post_quant_conv, inv, -(inv @ mean))
    _carry(dec.conv_in)
    _linear_head(dec.norm_out, dec.conv_out, torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    return vae
