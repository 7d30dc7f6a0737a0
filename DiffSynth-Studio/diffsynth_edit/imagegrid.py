"""Image grids for validation and evaluation: rows of images, each cell padded onto white."""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw


def make_grid(rows: Sequence[Sequence[Image.Image | None]], labels: Sequence[str] = (), cell: int = 256,
              pad: int = 4) -> Image.Image:
    """Each row's images scaled to fit `cell`×`cell`; None cells stay white; optional column labels on top."""
    ncols = max(len(r) for r in rows)
    top = 18 if labels else 0
    grid = Image.new("RGB", (ncols * (cell + pad) + pad, top + len(rows) * (cell + pad) + pad), "white")
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
            y = top + pad + r * (cell + pad) + (cell - small.height) // 2
            grid.paste(small, (x, y))
    return grid
