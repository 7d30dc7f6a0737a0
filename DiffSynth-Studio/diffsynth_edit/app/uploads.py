"""Image inputs of the app: files or arrays from gradio to PIL, the upload size limit, the mask from the editor.

- Files are opened with Pillow only (any format it reads); anything else is an AppInputError naming the input.
- An image above `max_pixels` is downscaled (aspect kept) with a notice; its mask follows it.
- The mask painted in `gr.ImageEditor` is the alpha channel of its brush layers (union over layers), never a
  difference of composites: pixels with alpha ≥ MASK_ALPHA_MIN are "edit" (white).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..geometry import binarize_mask
from .errors import AppInputError

MASK_ALPHA_MIN = 16
HARD_PIXEL_LIMIT = 12_000 * 12_000  # refused outright above this (decompression bombs); below PIL's own


def open_image(value: Any, what: str = "image") -> Image.Image:
    """PIL image from a PIL image, an array or a file path (gradio passes all three)."""
    if value is None:
        raise AppInputError(f"no {what} given")
    if isinstance(value, dict):  # gradio FileData-like payloads
        value = value.get("path") or value.get("name") or value.get("image")
        if isinstance(value, dict):
            value = value.get("path")
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        try:
            arr = value
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            return Image.fromarray(arr)
        except (TypeError, ValueError) as e:
            raise AppInputError(f"{what}: array of shape {value.shape} is not an image ({e})") from None
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise AppInputError(f"{what}: file not found")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
                im = Image.open(path)
                w, h = im.size  # header only: nothing decoded yet
                if w * h > HARD_PIXEL_LIMIT:
                    raise AppInputError(f"{what}: {w}x{h} is too large to open (at most {HARD_PIXEL_LIMIT} pixels)")
                im.load()
            return im
        except AppInputError:
            raise
        except Image.DecompressionBombError:
            raise AppInputError(f"{what}: {path.name} is too large to open") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise AppInputError(f"{what}: {path.name} is not a readable image ({type(e).__name__})") from None
    raise AppInputError(f"{what} must be an image file, got {type(value).__name__}")


def limit_pixels(image: Image.Image, max_pixels: int, what: str = "image",
                 resample=Image.LANCZOS) -> tuple[Image.Image, str | None]:
    """Downscale (aspect kept) so that w*h ≤ max_pixels; (image, notice or None)."""
    w, h = image.size
    if w * h <= max_pixels:
        return image, None
    scale = math.sqrt(max_pixels / (w * h))
    nw, nh = max(1, math.floor(w * scale)), max(1, math.floor(h * scale))  # floor: nw * nh ≤ max_pixels
    if image.mode in ("P", "1"):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        resample = Image.NEAREST
    out = image.resize((nw, nh), resample)
    return out, f"{what} of {w}x{h} was downscaled to {nw}x{nh} (upload limit {max_pixels} pixels)"


def _alpha(layer: Any) -> Image.Image | None:
    if layer is None:
        return None
    im = open_image(layer, "mask layer")
    im = ImageOps.exif_transpose(im)
    if im.mode == "RGBA" or im.mode == "LA" or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None  # an opaque layer carries no brush information


def mask_from_editor(value: Any) -> tuple[Image.Image | None, Image.Image | None, list[str]]:
    """(background, mask or None, notices) from a gr.ImageEditor value {background, layers, composite}.

    The mask is the union of the brush layers' alpha at the background's size; no paint means no mask (edit the
    whole image), with a notice.
    """
    notices: list[str] = []
    if value is None:
        return None, None, notices
    if not isinstance(value, dict):
        return open_image(value, "image"), None, notices
    bg = value.get("background")
    composite = value.get("composite")
    image = bg if bg is not None else composite
    if image is None:
        return None, None, notices
    image = open_image(image, "image")
    mask_arr = None
    for layer in value.get("layers") or []:
        a = _alpha(layer)
        if a is None:
            continue
        if a.size != image.size:
            a = a.resize(image.size, Image.NEAREST)
        arr = np.asarray(a)
        mask_arr = arr if mask_arr is None else np.maximum(mask_arr, arr)
    if mask_arr is None or int(mask_arr.max()) < MASK_ALPHA_MIN:
        notices.append("no mask painted: the whole image is edited")
        return image, None, notices
    mask = Image.fromarray(np.where(mask_arr >= MASK_ALPHA_MIN, 255, 0).astype(np.uint8), mode="L")
    return image, mask, notices


def mask_coverage(mask: Image.Image | None) -> float:
    """Fraction of the image edited, by the one mask rule (`geometry.binarize_mask`: > 127); 1 without a mask."""
    if mask is None:
        return 1.0
    return float(binarize_mask(mask).mean())
