"""Tolerances scaled to the values compared, so a comparison holds on any x86-64/arm64 CPU (kernels differ in
summation order and vector width between machines).

Two float32 computations of the same quantity in a different order differ by about eps32 · (sum of the magnitudes
that were added up), which is bounded by the largest magnitude in the tensor times a small factor, not by each
element's own size: an element near zero in a tensor of values up to 80 can be off by 1e-5 in absolute terms. So the
tolerance is `rel · max|expected|` for the whole tensor. Exactness claims are tested in float64 or with torch.equal.
"""
from __future__ import annotations

import torch

FP32_REL = 1e-5  # float32, different reduction order (about 100 eps32)
FP64_REL = 1e-10


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = FP32_REL, msg: str = "") -> None:
    """max |actual - expected| <= rel · max |expected| (shapes must match)."""
    assert actual.shape == expected.shape, f"{msg}: shapes {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert bool(torch.isfinite(a).all()) and bool(torch.isfinite(e).all()), f"{msg}: non-finite values"
    scale = float(e.abs().max()) if e.numel() else 0.0
    diff = float((a - e).abs().max()) if e.numel() else 0.0
    assert diff <= rel * scale or diff == 0.0, (
        f"{msg}: max abs difference {diff:.3g} exceeds {rel:g} x max |expected| ({scale:.3g})")
