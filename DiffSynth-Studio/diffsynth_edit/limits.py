"""Limits on input shared by every entry point (builder, cache, editor, app): one number each, checked where the
data enters so that nothing accepted upstream is refused downstream."""
from __future__ import annotations

MAX_ASPECT = 16.0  # longest side / shortest side of an image (sample target, edit input)
LBM_MAX_STEPS = 4  # LBM sampling steps: 1..4 (the training grid has four sigma levels)


def aspect_problem(width: int, height: int) -> str | None:
    """Why a `width`x`height` image is refused, or None."""
    if width < 1 or height < 1:
        return f"image of {width}x{height} is empty"
    if max(width, height) / min(width, height) > MAX_ASPECT:
        return f"image of {width}x{height} has an aspect ratio above {MAX_ASPECT:g}:1"
    return None
