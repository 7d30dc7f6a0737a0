"""Measures of a source/target pair: the derived mask, the background change, the aspect mismatch, and the filters
applied to them."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageStat

from .build_config import BuildSettings
from .records import Problem


def _as_image(x: Image.Image | np.ndarray) -> Image.Image:
    return x if isinstance(x, Image.Image) else Image.fromarray(np.ascontiguousarray(x))


def _as_l(mask: np.ndarray) -> Image.Image:
    """bool HxW -> L image 0/255."""
    return Image.fromarray(np.ascontiguousarray(mask).view(np.uint8) * np.uint8(255), "L")


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation of a bool mask by `radius` px (separable running max)."""
    if radius <= 0:
        return mask
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for s in range(1, min(radius, n - 1) + 1):
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - s), slice(s, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def derive_mask(source: Image.Image | np.ndarray, target: Image.Image | np.ndarray, threshold: int = 24,
                radius: int = 2, diff: Image.Image | None = None) -> np.ndarray:
    """Edited region (bool HxW) of two same-size RGB images: max over channels of |source - target| > threshold
    (0-255 units), then a square dilation by `radius` px."""
    if diff is None:
        diff = ImageChops.difference(_as_image(source), _as_image(target))
    r, g, b = diff.split()
    peak = ImageChops.lighter(ImageChops.lighter(r, g), b)
    return dilate(np.asarray(peak) > threshold, radius)


def background_change(source: Image.Image | np.ndarray, target: Image.Image | np.ndarray, mask: np.ndarray,
                      diff: Image.Image | None = None) -> float:
    """Mean |source - target| outside the mask in 0..1 (over pixels and channels); 0 when nothing is outside."""
    outside = ~mask
    n = int(np.count_nonzero(outside))
    if n == 0:
        return 0.0
    if diff is None:
        diff = ImageChops.difference(_as_image(source), _as_image(target))
    total = sum(ImageStat.Stat(diff, _as_l(outside)).sum)
    return float(total) / (n * 3 * 255.0)


def aspect_mismatch(size_a: tuple[int, int], size_b: tuple[int, int]) -> float:
    """Relative difference of the aspect ratios (w/h) of two sizes."""
    ra, rb = size_a[0] / size_a[1], size_b[0] / size_b[1]
    return abs(ra / rb - 1.0)


def check_filters(stats: dict[str, Any], st: BuildSettings) -> Problem | None:
    area, bg = stats["mask_area"], stats["bg_change"]
    if area < st.min_mask_area:
        return Problem("filtered", "mask_too_small", None, None,
                       f"mask covers {area:.4%} of the image (< --min-mask-area {st.min_mask_area})")
    if area > st.max_mask_area:
        return Problem("filtered", "mask_too_large", None, None,
                       f"mask covers {area:.2%} of the image (> --max-mask-area {st.max_mask_area})")
    if bg > st.max_bg_change:
        return Problem("filtered", "background_changed", None, None,
                       f"mean abs difference outside the mask is {bg:.4f} (> --max-bg-change {st.max_bg_change})")
    return None
