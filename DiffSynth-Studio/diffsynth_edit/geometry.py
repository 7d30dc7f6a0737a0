"""Mask geometry shared by the dataset builder, the cache and the editor.

One rule everywhere: a mask is binarised at > 127 (white = region to edit), its bounding box is rounded
outward to multiples of 16 px and clipped to the image. `subyx` is that box in DiT token units (16 px).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

ALIGN = 16
MASK_THRESHOLD = 127


class EmptyMaskError(ValueError):
    """The mask has no pixel above the threshold."""


@dataclass(frozen=True)
class Box:
    """Pixel box [y1, y2) x [x1, x2)."""

    y1: int
    y2: int
    x1: int
    x2: int

    @property
    def height(self) -> int:
        return self.y2 - self.y1

    @property
    def width(self) -> int:
        return self.x2 - self.x1

    def to_subyx(self) -> tuple[int, int, int, int]:
        """Token units (16 px per token)."""
        return (self.y1 // ALIGN, self.y2 // ALIGN, self.x1 // ALIGN, self.x2 // ALIGN)

    @staticmethod
    def from_subyx(subyx) -> "Box":
        y1, y2, x1, x2 = (int(v) * ALIGN for v in subyx)
        return Box(y1, y2, x1, x2)

    def pil_box(self) -> tuple[int, int, int, int]:
        """(left, upper, right, lower) for PIL.Image.crop."""
        return (self.x1, self.y1, self.x2, self.y2)


def binarize_mask(mask: Image.Image | np.ndarray) -> np.ndarray:
    """Bool array HxW: True where the mask is > 127 (any channel layout; RGB masks use their mean)."""
    if isinstance(mask, Image.Image):
        if mask.mode not in ("L", "1"):
            mask = mask.convert("L")
        arr = np.asarray(mask)
    else:
        arr = np.asarray(mask)
        if arr.ndim == 3:
            arr = arr.mean(axis=-1)
    if arr.dtype == bool:
        return arr
    if arr.dtype != np.uint8 and arr.max() <= 1.0:
        arr = arr * 255.0
    return arr > MASK_THRESHOLD


def align_down(v: int, align: int = ALIGN) -> int:
    return (v // align) * align


def align_up(v: int, align: int = ALIGN) -> int:
    return -(-v // align) * align


def mask_bbox(mask: Image.Image | np.ndarray | None, size_hw: tuple[int, int]) -> Box:
    """16-aligned outward bbox of the binarised mask, clipped to the (16-aligned) image size.

    `mask=None` means the whole image. Raises EmptyMaskError for a mask with nothing above the threshold.
    """
    h, w = size_hw
    if h % ALIGN or w % ALIGN:
        raise ValueError(f"image size {w}x{h} is not a multiple of {ALIGN}")
    if mask is None:
        return Box(0, h, 0, w)
    binary = binarize_mask(mask)
    if binary.shape != (h, w):
        raise ValueError(f"mask size {binary.shape[1]}x{binary.shape[0]} does not match image size {w}x{h}")
    ys, xs = np.nonzero(binary)
    if len(ys) == 0:
        raise EmptyMaskError("mask is empty (no pixel above 127)")
    y1, y2 = align_down(int(ys.min())), min(h, align_up(int(ys.max()) + 1))
    x1, x2 = align_down(int(xs.min())), min(w, align_up(int(xs.max()) + 1))
    return Box(y1, y2, x1, x2)


def fit_size(width: int, height: int, max_pixels: int = 1024 * 1024, align: int = ALIGN) -> tuple[int, int]:
    """(width, height) scaled down to at most `max_pixels` (never up), each side floored to `align`, min one unit."""
    scale = min(1.0, (max_pixels / float(width * height)) ** 0.5)
    w = max(align, int(width * scale) // align * align)
    h = max(align, int(height * scale) // align * align)
    return w, h
