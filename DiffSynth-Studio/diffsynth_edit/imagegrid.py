"""Image grids for validation and evaluation: rows of images, each cell padded onto white."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw


def make_grid(rows: Sequence[Sequence[Image.Image | None]], labels: Sequence[str] = (), cell: int = 256,
              pad: int = 4, captions: Sequence[Sequence[str | None]] | None = None) -> Image.Image:
    """Each row's images scaled to fit `cell`×`cell`; None cells stay white; optional column labels on top and
    optional `captions` (per row, per cell; None = none) in a text line under each cell."""
    ncols = max(len(r) for r in rows)
    top = 18 if labels else 0
    cap = 14 if captions else 0
    row_h = cell + cap + pad
    grid = Image.new("RGB", (ncols * (cell + pad) + pad, top + len(rows) * row_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.text((pad + c * (cell + pad) + 4, 3), label, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            if im is None:
                continue
            scale = min(cell / im.width, cell / im.height)
            small = im.convert("RGB").resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                                             Image.LANCZOS)
            x = pad + c * (cell + pad) + (cell - small.width) // 2
            y = top + pad + r * row_h + (cell - small.height) // 2
            grid.paste(small, (x, y))
    for r, row in enumerate(captions or []):
        for c, text in enumerate(row):
            if text:
                draw.text((pad + c * (cell + pad) + 4, top + pad + r * row_h + cell + 1), text, fill=(0, 0, 0))
    return grid
