"""The Generate event's editor payload, bounded before gradio decodes it.

gradio's `ImageEditor.preprocess` decodes the background, every brush layer and the composite in full before the
app sees them, so one small request naming a small, highly compressed upload many times costs gigabytes. The
payload is checked from the image headers first (nothing decoded): at most MAX_LAYERS brush layers, every image at
most HARD_PIXEL_LIMIT pixels and no layer or composite larger than the background.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from .errors import AppInputError
from .uploads import HARD_PIXEL_LIMIT

MAX_LAYERS = 2  # the page has one brush layer (layers=False); one spare for the eraser's history


def header_pixels(source: Any, what: str) -> int:
    """Width x height from the image header of a gradio FileData (path), bytes or path; nothing is decoded."""
    path = getattr(source, "path", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray, memoryview)):
                im = Image.open(io.BytesIO(bytes(source)))
            else:
                im = Image.open(Path(path if path is not None else source))
            with im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise AppInputError(f"{what} is too large to open (at most {HARD_PIXEL_LIMIT} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
        raise AppInputError(f"{what} is not a readable image ({type(e).__name__})") from None
    return w * h


def check_editor_payload(background: Any, layers: list | None, composite: Any,
                         max_layers: int = MAX_LAYERS, max_pixels: int = HARD_PIXEL_LIMIT) -> None:
    """AppInputError when the editor payload exceeds the limits above (read from headers only)."""
    layers = list(layers or [])
    if len(layers) > max_layers:
        raise AppInputError(f"the editor sent {len(layers)} brush layers; at most {max_layers} are accepted")
    bg = header_pixels(background, "the image") if background is not None else None
    if bg is not None and bg > max_pixels:
        raise AppInputError(f"the image has {bg} pixels; at most {max_pixels} are accepted")
    limit = bg if bg is not None else max_pixels
    for i, layer in enumerate([*layers, composite]):
        if layer is None:
            continue
        what = "the composite" if i == len(layers) else f"brush layer {i + 1}"
        n = header_pixels(layer, what)
        if n > limit:
            raise AppInputError(f"{what} has {n} pixels, more than the image ({limit}); refused")


def bounded_editor(editor: gr.ImageEditor) -> gr.ImageEditor:
    """`editor` with its payload passing `check_editor_payload` before anything is decoded. The instance's
    `preprocess` is wrapped (gradio calls it on the instance); a subclass would make gradio write a .pyi stub
    into the package at import."""
    inner = editor.preprocess

    def preprocess(payload):
        if payload is not None:
            data = payload
            if getattr(payload, "id", None) is not None:
                data = editor.blob_storage.get(payload.id)
            if data is not None:
                try:
                    check_editor_payload(data.background, data.layers, data.composite)
                except AppInputError as e:
                    raise gr.Error(str(e)) from None
        return inner(payload)

    editor.preprocess = preprocess
    return editor
