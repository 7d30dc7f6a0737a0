"""Training objectives on the bridge forward.

SFT (flow matching): x_t = (1 − σ) x0 + σ ε, target ε − x0, on main and sub streams with the same σ; per-sample
loss (main + sub) / 2 (plain means, not weighted by mask area — the original workspace's choice, kept so its
checkpoints and ours are comparable), times diffsynth's Qwen training weight w(t); timesteps drawn uniformly from
diffsynth's 1000-step Qwen-Image training schedule.

LBM (s = 1 − t, source at s = 1): x_s = s x_src + (1 − s) x_tgt + σ_b sqrt(s(1 − s)) ε, target v = x_src − x_tgt,
the DiT receives 1000 s; main bridge source latents → target latents, sub bridge white latents (`sub_noise`) →
ref_gt crop latents; s drawn from a discrete grid with given probabilities.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@lru_cache(maxsize=1)
def qwen_training_schedule() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(timesteps [1000], sigmas [1000], weights [1000]) of diffsynth's Qwen-Image training schedule."""
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    sched = FlowMatchScheduler("Qwen-Image")
    sched.set_timesteps(1000, training=True)
    return sched.timesteps.float().clone(), sched.sigmas.float().clone(), sched.linear_timesteps_weights.float().clone()


def bridge_interpolate(x_src: torch.Tensor, x_tgt: torch.Tensor, s: torch.Tensor, sigma_b: float,
                       eps: torch.Tensor) -> torch.Tensor:
    """x_s = s·x_src + (1−s)·x_tgt + σ_b·sqrt(s(1−s))·ε, with s broadcast per sample."""
    s = s.view(-1, *([1] * (x_src.dim() - 1))).to(x_src.dtype)
    return s * x_src + (1 - s) * x_tgt + sigma_b * torch.sqrt((s * (1 - s)).clamp(min=0)) * eps


def lbm_target(x_src: torch.Tensor, x_tgt: torch.Tensor) -> torch.Tensor:
    return x_src - x_tgt


def lbm_predicted_target(x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x̂_tgt = x_s − s·v."""
    return x_s - s.view(-1, *([1] * (x_s.dim() - 1))).to(x_s.dtype) * v


def draw_from_grid(grid: list[float], probs: list[float] | None, generator: torch.Generator) -> float:
    p = torch.tensor(probs if probs is not None else [1.0] * len(grid), dtype=torch.float64)
    return float(grid[int(torch.multinomial(p / p.sum(), 1, generator=generator))])


@dataclass
class NoisedBatch:
    """Per-sample draws for one batch; `timestep` on the DiT's 0..1000 scale."""

    latents: torch.Tensor
    sub_latents: torch.Tensor | None
    target: torch.Tensor
    sub_target: torch.Tensor | None
    timestep: torch.Tensor
    weight: torch.Tensor
    s: torch.Tensor  # σ (SFT) or s (LBM) per sample


def make_sft_inputs(batch: dict, generators: list[torch.Generator], use_sub: bool) -> NoisedBatch:
    timesteps, sigmas, weights = qwen_training_schedule()
    x0, sub0 = batch["input_latents"].float(), batch["sub_input_latents"].float()
    ids = torch.stack([torch.randint(0, len(timesteps), (1,), generator=g) for g in generators]).view(-1)
    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(x0.device)
    sub_eps = torch.stack([torch.randn(sub0.shape[1:], generator=g) for g in generators]).to(x0.device)
    sigma = sigmas[ids].to(x0.device)
    sv = sigma.view(-1, 1, 1, 1)
    return NoisedBatch(
        latents=(1 - sv) * x0 + sv * eps, target=eps - x0,
        sub_latents=((1 - sv) * sub0 + sv * sub_eps) if use_sub else None,
        sub_target=(sub_eps - sub0) if use_sub else None,
        timestep=timesteps[ids].to(x0.device), weight=weights[ids].to(x0.device), s=sigma)


def make_lbm_inputs(batch: dict, generators: list[torch.Generator], use_sub: bool, grid: list[float],
                    probs: list[float] | None, sigma_b: float) -> NoisedBatch:
    x_tgt, x_src = batch["input_latents"].float(), batch["edit_latents"][0].float()
    if x_src.shape != x_tgt.shape:
        raise ValueError(f"LBM needs the source ({tuple(x_src.shape)}) and target ({tuple(x_tgt.shape)}) latents of "
                         f"the same size (sample ids {batch['ids']})")
    sub_tgt, sub_src = batch["sub_input_latents"].float(), batch["sub_noise"].float()
    s = torch.tensor([draw_from_grid(grid, probs, g) for g in generators], device=x_tgt.device)
    eps = torch.stack([torch.randn(x_tgt.shape[1:], generator=g) for g in generators]).to(x_tgt.device)
    sub_eps = torch.stack([torch.randn(sub_tgt.shape[1:], generator=g) for g in generators]).to(x_tgt.device)
    return NoisedBatch(
        latents=bridge_interpolate(x_src, x_tgt, s, sigma_b, eps), target=lbm_target(x_src, x_tgt),
        sub_latents=bridge_interpolate(sub_src, sub_tgt, s, sigma_b, sub_eps) if use_sub else None,
        sub_target=lbm_target(sub_src, sub_tgt) if use_sub else None,
        timestep=1000.0 * s, weight=torch.ones_like(s), s=s)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def combine_losses(main: torch.Tensor, sub: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample (main + sub)/2 (or main alone), times w, averaged over the batch."""
    per = main if sub is None else (main + sub) / 2
    return (per * weight).mean()
