"""A small synthetic raw dataset (the quickstart's and the tests' input), in two families. "objects" (default):
simple shapes on textured backgrounds, each pair differing by one local edit — recolour, add or remove an object.
"fill" (`synthetic_fill.py`, the quickstart's): a white box filled with a named colour, built so that the tiny
model can learn it. Deterministic by seed (each sample has its own generator seeded by (seed, index), so sample i
is the same whatever `count` is).

Layout "paired" (default):
    OUT/source/<stem>.png  OUT/source/<stem>.txt (instruction)  OUT/target/<stem>.png  OUT/mask/<stem>.png
    OUT/edit_types.csv     (columns stem,edit_type)
Layout "samples": OUT/<stem>/{source.png,target.png,mask.png,prompt.txt} plus OUT/edit_types.csv.

The background is pixel-identical outside the edited region; the mask is the object (dilated by ~1.5 % of
the side; "fill": the box) and covers 10–40 % of the image.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..atomic import atomic_write_bytes, atomic_write_text
from ..image_io import atomic_save_image

EDIT_TYPES = {
    "recolor": "Recolor an object",
    "add": "Add a new object",
    "remove": "Remove an existing object",
    "fill": "Fill a box with a colour",  # the "fill" family (synthetic_fill.py)
}
COLORS = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (235, 205, 35),
    "purple": (135, 55, 175), "orange": (240, 135, 25), "cyan": (35, 195, 205), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "ellipse")
MIN_AREA, MAX_AREA = 0.10, 0.40


@dataclass
class SampleDataConfig:
    """`generate_dataset_json_mp.py sample-data`: write a synthetic raw dataset."""

    out: Path = field(default=Path("data/raw_sample"), metadata={"help": "output folder (default data/raw_sample)"})
    count: int = field(default=16, metadata={"help": "number of samples (default 16)"})
    size: int = field(default=64, metadata={"help": "image side in px, a multiple of 16 (default 64)"})
    seed: int = field(default=0, metadata={"help": "random seed (default 0)"})
    layout: Literal["paired", "samples"] = field(
        default="paired", metadata={"help": "paired: source/ target/ mask/ folders; samples: one folder per sample"})
    format: Literal["png", "jpg"] = field(default="png", metadata={"help": "file format of source/target (png)"})
    family: Literal["objects", "fill"] = field(
        default="objects", metadata={"help": "objects: recolour/add/remove a shape on a striped texture; fill: fill a "
                                             "white box with a named colour (learnable by the tiny model, the "
                                             "quickstart's)"})

    def validate(self) -> None:
        from ..config import ConfigError

        if self.count < 1:
            raise ConfigError("`count` must be >= 1")
        if self.size < 32 or self.size % 16:
            raise ConfigError("`size` must be a multiple of 16, at least 32")


@dataclass
class SamplePair:
    source: Image.Image
    target: Image.Image
    mask: Image.Image  # L, 0/255
    instruction: str
    edit_type: str  # key of EDIT_TYPES


@dataclass
class SampleData:
    """What `make_sample_data` wrote."""

    root: Path
    stems: list[str]
    layout: str
    source_dir: Path | None = None
    target_dir: Path | None = None
    mask_dir: Path | None = None
    instructions: Path | None = None  # the edit_type CSV

    def build_args(self) -> list[str]:
        """CLI flags for `generate_dataset_json_mp.py build` that read this data."""
        if self.layout == "samples":
            return ["--samples-dir", str(self.root), "--instructions", str(self.instructions)]
        return ["--source-dir", str(self.source_dir), "--target-dir", str(self.target_dir),
                "--mask-dir", str(self.mask_dir), "--instructions", str(self.instructions)]


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    side = float(max(h, w))
    xx /= side
    yy /= side
    a = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(a) + yy * np.sin(a) + 1.5) / 3.0
    c0 = rng.uniform(70, 200, 3).astype(np.float32)
    c1 = rng.uniform(70, 200, 3).astype(np.float32)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    b = rng.uniform(0, 2 * np.pi)
    freq = rng.uniform(4, 10)
    stripes = np.sin(2 * np.pi * freq * (xx * np.cos(b) + yy * np.sin(b)) + rng.uniform(0, 2 * np.pi))
    img += (rng.uniform(10, 25) * stripes)[..., None] * rng.uniform(0.5, 1.0, 3).astype(np.float32)
    img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _shape_mask(rng: np.random.Generator, shape: str, h: int, w: int, scale: tuple[float, float]) -> np.ndarray:
    side = min(h, w)
    f = rng.uniform(*scale)
    sw = sh = f * side
    if shape == "ellipse":
        sw, sh = f * side, rng.uniform(0.6, 1.0) * f * side
    cx = rng.uniform(sw / 2 + 1, w - sw / 2 - 1)
    cy = rng.uniform(sh / 2 + 1, h - sh / 2 - 1)
    box = (cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2)
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if shape in ("circle", "ellipse"):
        d.ellipse(box, fill=255)
    elif shape == "square":
        d.rectangle(box, fill=255)
    else:
        d.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=255)
    return np.asarray(m) > 127


_SCALES = {"circle": (0.42, 0.66), "square": (0.36, 0.58), "triangle": (0.5, 0.78), "ellipse": (0.45, 0.72)}


def _where(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cy, cx = ys.mean() / h, xs.mean() / w
    vert = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    hor = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    return f"{vert} {hor}".strip() or "centre"


def _paint(img: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """`img` with `mask` filled by `color`, shaded slightly from top to bottom."""
    out = img.copy()
    shade = np.linspace(1.08, 0.88, mask.shape[0], dtype=np.float32)[:, None, None]
    painted = np.clip(np.asarray(color, np.float32) * shade, 0, 255).astype(np.uint8)
    painted = np.broadcast_to(painted, img.shape)
    out[mask] = painted[mask]
    return out


def make_pair(rng: np.random.Generator, height: int, width: int | None = None) -> SamplePair:
    """One synthetic (source, target, mask, instruction) with a local edit covering 10–40 % of the image."""
    width = width or height
    h, w = height, width
    bg = _texture(rng, h, w)
    dil = max(1, round(min(h, w) * 0.015))
    kind = ("recolor", "add", "remove")[int(rng.integers(3))]
    for _ in range(100):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        obj = _shape_mask(rng, shape, h, w, _SCALES[shape])
        mask_img = Image.fromarray((obj * 255).astype(np.uint8), "L").filter(ImageFilter.MaxFilter(2 * dil + 1))
        mask = np.asarray(mask_img) > 127
        if MIN_AREA <= mask.mean() <= MAX_AREA:
            break
    else:  # pragma: no cover - the scales above make this unreachable
        raise RuntimeError("could not place an edit region of 10-40 % of the image")
    # an unrelated object that stays the same in both images, away from the edit region
    for _ in range(30):
        dshape = SHAPES[int(rng.integers(len(SHAPES)))]
        distractor = _shape_mask(rng, dshape, h, w, (0.14, 0.24))
        if not (distractor & mask).any():
            bg = _paint(bg, distractor, list(COLORS.values())[int(rng.integers(len(COLORS)))])
            break
    names = list(COLORS)
    c1 = names[int(rng.integers(len(names)))]
    c2 = names[(names.index(c1) + 1 + int(rng.integers(len(names) - 1))) % len(names)]
    with_obj = _paint(bg, obj, COLORS[c1])
    if kind == "recolor":
        src, tgt = with_obj, _paint(bg, obj, COLORS[c2])
        text = f"Change the color of the {c1} {shape} to {c2}."
    elif kind == "add":
        src, tgt = bg, with_obj
        text = f"Add a {c1} {shape} at the {_where(obj)}."
    else:
        src, tgt = with_obj, bg
        text = f"Remove the {c1} {shape}."
    return SamplePair(Image.fromarray(src, "RGB"), Image.fromarray(tgt, "RGB"),
                      Image.fromarray((mask * 255).astype(np.uint8), "L"), text, kind)


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    if fmt == "jpg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        atomic_write_bytes(path, buf.getvalue(), fsync=False)
    else:
        atomic_save_image(img, path, compress_level=6)


def _write_sample(args: tuple) -> tuple[str, str]:
    root, stem, index, seed, width, height, layout, format, family = args
    ext = ".jpg" if format == "jpg" else ".png"
    if family == "fill":
        from .synthetic_fill import make_fill_pair

        pair = make_fill_pair(np.random.default_rng([seed, index]), height, width)
    else:
        pair = make_pair(np.random.default_rng([seed, index]), height, width)
    if layout == "samples":
        d = root / stem
        _save(pair.source, d / f"source{ext}", format)
        _save(pair.target, d / f"target{ext}", format)
        atomic_save_image(pair.mask, d / "mask.png", compress_level=6)
        atomic_write_text(d / "prompt.txt", pair.instruction + "\n", fsync=False)
    else:
        _save(pair.source, root / "source" / f"{stem}{ext}", format)
        _save(pair.target, root / "target" / f"{stem}{ext}", format)
        atomic_save_image(pair.mask, root / "mask" / f"{stem}.png", compress_level=6)
        atomic_write_text(root / "source" / f"{stem}.txt", pair.instruction + "\n", fsync=False)
    return stem, EDIT_TYPES[pair.edit_type]


def make_sample_data(out: Path | str, count: int = 16, size: int = 64, seed: int = 0,
                     layout: str = "paired", format: str = "png", height: int | None = None,
                     workers: int = 1, family: str = "objects") -> SampleData:
    """Write `count` synthetic pairs of `size` (width) x `height` (default square) px under `out`
    (`workers` > 1 generates in a process pool; the files are the same). `family`: "objects" (this module's
    shapes) or "fill" (`synthetic_fill`)."""
    root = Path(out)
    height = height or size
    stems = [f"sample_{i:04d}" for i in range(count)]
    jobs = [(root, stem, i, seed, size, height, layout, format, family) for i, stem in enumerate(stems)]
    if workers > 1 and count > 1:
        import multiprocessing as mp

        with mp.get_context().Pool(min(workers, count)) as pool:
            rows = pool.map(_write_sample, jobs)
    else:
        rows = [_write_sample(job) for job in jobs]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["stem", "edit_type"])
    writer.writerows(rows)
    csv_path = root / "edit_types.csv"
    atomic_write_text(csv_path, buf.getvalue())
    if layout == "samples":
        return SampleData(root, stems, layout, instructions=csv_path)
    return SampleData(root, stems, layout, root / "source", root / "target", root / "mask", csv_path)
