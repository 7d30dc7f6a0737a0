"""The "fill" synthetic family (the quickstart's): a white box on a smooth background is filled with a named colour.

It is built so that the embedded tiny model can show learning within minutes on a CPU:
- the edit is local and readable from the source (the white box) and the prompt (the colour word), so a small DiT
  can learn it from a few hundred samples;
- every edge lies on the 8-px grid of the tiny VAE (the box on the 16-px grid, so the mask's 16-aligned box is the
  box itself) and the background is a smooth gradient, so the analytic tiny VAE (`diffsynth_edit.tiny_vae`, one
  colour per 8×8 patch) reconstructs it; a shared pixel grain (σ = `GRAIN`) sets its round trip at ≈ 36 dB, a
  finite ceiling the edits are measured against;
- outside the box, source and target are pixel-identical (grain included).
"""
from __future__ import annotations

import numpy as np

from .synthetic import COLORS, SamplePair

WHITE = (240, 240, 240)
GRAIN = 4.0  # std of the pixel grain shared by source and target (what the 8×8-patch VAE cannot reconstruct)
MIN_AREA, MAX_AREA = 0.10, 0.40


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    side = float(max(h, w))
    a = rng.uniform(0, 2 * np.pi)
    t = ((xx / side) * np.cos(a) + (yy / side) * np.sin(a) + 1.5) / 3.0
    c0, c1 = rng.uniform(70, 200, 3), rng.uniform(70, 200, 3)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _box(rng: np.random.Generator, h: int, w: int, grid: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) on `grid`, covering MIN_AREA..MAX_AREA of the image."""
    sizes = [(bh, bw) for bh in range(grid, h + 1, grid) for bw in range(grid, w + 1, grid)
             if MIN_AREA <= bh * bw / (h * w) <= MAX_AREA]
    if not sizes:
        raise ValueError(f"no {grid}-px box covers {MIN_AREA:.0%}-{MAX_AREA:.0%} of a {w}x{h} image")
    bh, bw = sizes[int(rng.integers(len(sizes)))]
    y0 = grid * int(rng.integers((h - bh) // grid + 1))
    x0 = grid * int(rng.integers((w - bw) // grid + 1))
    return y0, x0, y0 + bh, x0 + bw


def make_fill_pair(rng: np.random.Generator, height: int, width: int | None = None) -> SamplePair:
    """One (source, target, mask, instruction): the white box of the source is the named colour in the target;
    one or two unrelated 8-px-aligned blocks of other colours stay the same."""
    from PIL import Image

    w, h = width or height, height
    if h % 16 or w % 16:
        raise ValueError(f"the fill family needs sides that are multiples of 16, got {w}x{h}")
    base = _gradient(rng, h, w)
    y0, x0, y1, x1 = _box(rng, h, w, 16)
    names = list(COLORS)
    colour = names[int(rng.integers(len(names)))]
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    # distractors: 8-px-aligned blocks, one block away from the box, never of the fill colour
    near = np.zeros_like(mask)
    near[max(0, y0 - 8):y1 + 8, max(0, x0 - 8):x1 + 8] = True
    for _ in range(int(rng.integers(1, 3))):
        for _attempt in range(20):
            bh, bw = 8 * int(rng.integers(1, max(2, h // 32) + 1)), 8 * int(rng.integers(1, max(2, w // 32) + 1))
            dy, dx = 8 * int(rng.integers((h - bh) // 8 + 1)), 8 * int(rng.integers((w - bw) // 8 + 1))
            if not near[dy:dy + bh, dx:dx + bw].any():
                other = [n for n in names if n != colour]
                base[dy:dy + bh, dx:dx + bw] = COLORS[other[int(rng.integers(len(other)))]]
                near[max(0, dy - 8):dy + bh + 8, max(0, dx - 8):dx + bw + 8] = True
                break
    grain = rng.normal(0.0, GRAIN, (h, w, 3))
    src, tgt = base.copy(), base.copy()
    src[mask] = WHITE
    tgt[mask] = COLORS[colour]

    def to_image(a: np.ndarray) -> Image.Image:
        return Image.fromarray(np.clip(a + grain, 0, 255).round().astype(np.uint8), "RGB")

    return SamplePair(to_image(src), to_image(tgt), Image.fromarray((mask * 255).astype(np.uint8), "L"),
                      f"Fill the white box with {colour}.", "fill")
