"""Fast lossless PNG encoding of the app's outputs, and the store of those files that the page and the API hand out.

Pillow's PNG writer needs ≈ 17 ms to filter a 1024×1024 RGB image even at compress_level 0, and 32–105 ms at
compress_level 1 (smooth … noise-like content, bench/RESULTS_app.md), on the critical path of every edit (the client
waits for the file). Here the rows get the "Up" filter (one numpy subtraction), and the deflate stream is written
with zlib's run-length strategy at level 1 (matches at distance 1 only): 3–7× faster than Pillow at level 1, files of
about the same size on photographs (bigger on flat synthetic images, where both are small anyway). Large
images are compressed in row bands on a few threads (zlib releases the GIL) and the bands are joined into one
valid zlib stream (each band ends on a sync flush; the same technique as pigz). The result is a standard 8-bit
PNG that any decoder reads back bit for bit.
"""
from __future__ import annotations

import atexit
import os
import shutil
import struct
import threading
import uuid
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..lifetime import owned_temp_dir

_COLOR_TYPES = {"L": (0, 1), "LA": (4, 2), "RGB": (2, 3), "RGBA": (6, 4)}
BAND_BYTES = 1 << 19          # ≥ this many filtered bytes per band before a second thread is used
MAX_THREADS = max(1, min(4, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="png")
        return _pool


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))


def _deflate(band: memoryview, last: bool, level: int, strategy: int) -> bytes:
    c = zlib.compressobj(level, zlib.DEFLATED, -15, 9, strategy)
    return c.compress(band) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def encode_png(image: Image.Image, level: int = 1, strategy: int = zlib.Z_RLE, threads: int | None = None) -> bytes:
    """PNG bytes of `image` (L, LA, RGB, RGBA at 8 bits; other modes through Pillow at compress_level 1)."""
    if image.mode not in _COLOR_TYPES:
        import io

        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    color_type, channels = _COLOR_TYPES[image.mode]
    w, h = image.size
    rows = np.asarray(image, dtype=np.uint8).reshape(h, w * channels)
    filtered = np.empty((h, w * channels + 1), dtype=np.uint8)
    filtered[0, 0] = 0                      # first row: filter None
    filtered[0, 1:] = rows[0]
    filtered[1:, 0] = 2                     # other rows: filter Up (byte minus the byte above, mod 256)
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:], casting="unsafe")
    raw = memoryview(filtered).cast("B")
    threads = MAX_THREADS if threads is None else max(1, threads)
    bands = max(1, min(threads, h, filtered.nbytes // BAND_BYTES))
    if bands == 1:
        body = _deflate(raw, True, level, strategy)
    else:
        cuts = [round(i * h / bands) * filtered.shape[1] for i in range(bands + 1)]
        parts = [raw[cuts[i]:cuts[i + 1]] for i in range(bands)]
        futures = [_executor().submit(_deflate, p, i == bands - 1, level, strategy) for i, p in enumerate(parts[1:], 1)]
        first = _deflate(parts[0], False, level, strategy)   # this thread does the first band
        body = first + b"".join(f.result() for f in futures)
    idat = b"\x78\x01" + body + struct.pack(">I", zlib.adler32(raw))
    return b"".join((b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)),
                     _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


def save_png(image: Image.Image, path: Path | str) -> None:
    Path(path).write_bytes(encode_png(image))


class PngStore:
    """Output images are written once, as fast PNG (`png.encode_png`: Up filter + run-length deflate, 3-7x faster
    than PIL at compress_level 1), and handed to gradio as paths, which it copies into its cache without
    re-encoding. The same file serves the output, the comparison slider and the API. Only the newest `keep` files
    are kept here. The folder (`<tmp>/qwen_edit_app-<pid>-…`) goes at exit; one left by a killed app goes when the
    next app starts (`lifetime.owned_temp_dir`)."""

    def __init__(self, keep: int = 64):
        self.dir = owned_temp_dir("qwen_edit_app")
        self.keep = keep
        self._files: deque[Path] = deque()
        self._lock = threading.Lock()
        self._background = ThreadPoolExecutor(1, thread_name_prefix="png-store")
        atexit.register(shutil.rmtree, self.dir, True)

    def save_later(self, make_image: Callable, name: str) -> Future:
        """`save(make_image(), name)` on a background thread (the "before" image is written while the edit runs)."""
        return self._background.submit(lambda: self.save(make_image(), name))

    def save(self, image, name: str) -> str | None:
        if image is None:
            return None
        path = self.dir / f"{uuid.uuid4().hex[:16]}-{name}.png"
        save_png(image, path)
        with self._lock:
            self._files.append(path)
            while len(self._files) > self.keep:
                self._files.popleft().unlink(missing_ok=True)
        return str(path)
