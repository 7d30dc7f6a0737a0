"""Noise schedules and step grids: flow matching (the Qwen-Image schedule) and the LBM bridge grid.

The LBM sampler is the workspace's own Euler loop over an unshifted grid; the stock Qwen scheduler is never given
custom sigmas (it warps them and yields NaN for one step).
"""
from __future__ import annotations

import torch


FLOW_SCHEDULES = ("qwen", "lightning")


def flow_sigmas(steps: int, height: int, width: int, schedule: str = "qwen") -> torch.Tensor:
    """Inference sigmas with a final 0 appended: [steps + 1]. "qwen": Qwen-Image's (dynamic shift from the token
    count, terminal shift 0.02); "lightning": the fixed shift 3 (μ = ln 3, no terminal shift) that lightx2v's
    Lightning LoRAs were distilled with (diffsynth's `set_timesteps_qwen_image_lightning`)."""
    from diffsynth.diffusion.flow_match import FlowMatchScheduler

    if steps < 1:
        raise ValueError("steps must be at least 1")
    if schedule not in FLOW_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(FLOW_SCHEDULES)}, got {schedule!r}")
    if schedule == "lightning":
        sigmas, _ = FlowMatchScheduler.set_timesteps_qwen_image_lightning(
            num_inference_steps=steps, dynamic_shift_len=(height // 16) * (width // 16))
        return torch.cat([sigmas.float(), torch.zeros(1)])
    if steps == 1:  # the Qwen schedule's terminal shift divides by 1 − σ = 0 for a single σ = 1
        return torch.tensor([1.0, 0.0])
    sigmas, _ = FlowMatchScheduler.set_timesteps_qwen_image(num_inference_steps=steps,
                                                            dynamic_shift_len=(height // 16) * (width // 16))
    return torch.cat([sigmas.float(), torch.zeros(1)])


def lbm_grid(steps: int) -> torch.Tensor:
    """s values 1, 1 - 1/N, ..., 1/N, 0 (source at s = 1, target at s = 0): [steps + 1]."""
    if not 1 <= steps <= 1000:
        raise ValueError("LBM steps must be between 1 and 1000")
    return torch.cat([torch.linspace(1.0, 1.0 / steps, steps), torch.zeros(1)])


def euler_step(x: torch.Tensor, v: torch.Tensor, s_now: float, s_next: float) -> torch.Tensor:
    """x_{s'} = x_s + (s' - s) v, shared by flow matching (v = ε − x0) and LBM (v = x_src − x_tgt)."""
    return x + v.to(x.dtype) * (s_next - s_now)
