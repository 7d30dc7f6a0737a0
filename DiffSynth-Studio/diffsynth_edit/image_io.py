"""Robust image reading and atomic image writing, shared by the dataset builder, the cache, the editor and the app.

Reading: any format Pillow decodes (PNG, JPEG, WebP, BMP, TIFF), fully decoded up front so that corrupt or
truncated files fail here with `ImageDecodeError` (naming the file and the reason), EXIF orientation applied.

Colour images (`to_rgb`): RGBA / LA / palette-with-transparency are composited onto white; greyscale, 1-bit,
CMYK and YCbCr are converted; 16-bit greyscale (I;16*, I) is scaled to 8 bit (÷257); float (F) images are
taken as 0..1 when their maximum is <= 1, else 0..255. (Pillow itself reads 16-bit RGB(A) PNGs as 8-bit.)

Masks (`to_mask`, also the editor's and the app's rule): mode L, white = region to edit. An image whose alpha is
not fully opaque is a matte or a painted layer: its alpha channel is the mask (strokes of any colour count); with
opaque or no alpha the luminance is. 16-bit and float masks are scaled like colour images.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .atomic import atomic_path, atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)

ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_ORIENTATION = 0x0112
WHITE = (255, 255, 255)
FORMAT_EXTENSION = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


class ImageDecodeError(ValueError):
    """A file cannot be read or decoded as an image."""

    def __init__(self, path: Path | str | None, reason: str):
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


@dataclass
class DecodedImage:
    """A fully decoded image with its orientation applied, in the file's own mode."""

    image: Image.Image
    format: str | None  # "PNG", "JPEG", "WEBP", ...
    mode: str  # mode as stored in the file
    transposed: bool  # EXIF orientation changed the pixels
    has_transparency_key: bool  # a tRNS colour key / palette transparency

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def is_plain_rgb(self) -> bool:
        """True when the stored file already is what `to_rgb` returns (8-bit RGB, no transparency, upright)."""
        return self.mode == "RGB" and not self.transposed and not self.has_transparency_key


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def decode_image(path: Path | str | None, data: bytes | None = None) -> DecodedImage:
    """Open and fully decode `path` (or the bytes `data`, `path` then only names it in errors)."""
    try:
        if data is None:
            if path is None:
                raise ValueError("decode_image needs a path or bytes")
            data = Path(path).read_bytes()
    except OSError as e:
        raise ImageDecodeError(path, f"cannot read file: {e.strerror or e}") from None
    if not data:
        raise ImageDecodeError(path, "file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            img.load()
            fmt, mode = img.format, img.mode
            has_key = "transparency" in img.info
            transposed = False
            try:
                orientation = img.getexif().get(_ORIENTATION, 1)
            except Exception:  # malformed EXIF: keep the pixels as stored
                orientation = 1
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                img = ImageOps.exif_transpose(img)
                transposed = True
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"image too large: {e}") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for broken files
        reason = str(e) or type(e).__name__
        if isinstance(e, Image.UnidentifiedImageError):
            reason = "not a recognised image format"
        raise ImageDecodeError(path, f"cannot decode image: {reason}") from None
    return DecodedImage(img, fmt, mode, transposed, has_key)


def _to_uint8(arr: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    out = arr.astype(np.float32)
    if sixteen_bit:
        out = out / 257.0
    elif arr.dtype.kind == "f" and out.size and float(np.nanmax(out)) <= 1.0:
        out = out * 255.0
    return np.clip(np.nan_to_num(out), 0, 255).round().astype(np.uint8)


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """I;16*, I and F modes to 8-bit L."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(arr, True), "L")
    if img.mode == "I":
        sixteen = arr.size > 0 and int(arr.max()) > 255
        return Image.fromarray(_to_uint8(arr, sixteen) if sixteen else np.clip(arr, 0, 255).astype(np.uint8), "L")
    return Image.fromarray(_to_uint8(arr.astype(np.float32), False), "L")  # F


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def to_rgb(img: Image.Image | DecodedImage, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """8-bit RGB; transparency composited onto `background` (white by default)."""
    if isinstance(img, DecodedImage):
        img = img.image
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(img).convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
        return out
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(getattr(img, "filename", None) or None, f"unsupported image mode {mode}: {e}") from None


def to_mask(img: Image.Image | DecodedImage) -> Image.Image:
    """8-bit L mask, white = edit. See the module docstring for alpha handling."""
    if isinstance(img, DecodedImage):
        img = img.image
    mode = img.mode
    if mode == "L" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(img)
    if _has_alpha(img):
        la = img.convert("LA")
        alpha = la.getchannel("A")
        return alpha if alpha.getextrema() != (255, 255) else la.getchannel("L")
    try:
        return img.convert("L")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(None, f"unsupported mask mode {mode}: {e}") from None


def open_rgb(path: Path | str) -> Image.Image:
    """Decode `path` as 8-bit RGB (EXIF orientation applied, alpha onto white). Raises ImageDecodeError."""
    try:
        return to_rgb(decode_image(path))
    except ImageDecodeError as e:
        raise ImageDecodeError(path, e.reason) from None


def open_mask(path: Path | str) -> Image.Image:
    """Decode `path` as an L-mode mask (white = edit). Raises ImageDecodeError."""
    try:
        return to_mask(decode_image(path))
    except ImageDecodeError as e:
        raise ImageDecodeError(path, e.reason) from None


def atomic_save_image(img: Image.Image | np.ndarray, path: Path | str, compress_level: int = 1,
                      format: str | None = None, **save_kwargs) -> Path:
    """Save atomically (temp file beside `path`, then rename). PNG uses `compress_level` (1 = fast)."""
    path = Path(path)
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    fmt = format or Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {path}")
    if fmt == "PNG":
        save_kwargs.setdefault("compress_level", compress_level)
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **save_kwargs)
    return path
