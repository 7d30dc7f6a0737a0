"""One sample of the build, in a worker process: decode, resize, mask, filters, derived files, sidecar.

Steps of `process_sample`: reuse when the sidecar is up to date (`sidecar`) -> read the source/target pair -> the mask
(given or derived) and its measures -> filters -> references -> outputs (an input that already is exactly the right
pixels is copied byte for byte) -> sidecar.
"""
from __future__ import annotations

import io
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops

from ..atomic import atomic_write_bytes
from ..output_errors import OutputWriteError
from ..geometry import Box, EmptyMaskError, binarize_mask, fit_size, mask_bbox
from ..limits import aspect_problem
from ..prompts import edit_prompt
from ..image_io import (FORMAT_EXTENSION, WHITE, DecodedImage, ImageDecodeError, atomic_save_image, decode_image,
                        to_mask, to_rgb)
from .build_config import BuildSettings
from .masks import _as_l, aspect_mismatch, background_change, check_filters, derive_mask
from .records import SampleError, SampleResult, SampleSpec, _err
from .schema import relative_path
from .sidecar import _hash_inputs, _outputs_ok, _read_sidecar, _write_sidecar

ASPECT_TOLERANCE = 0.01  # relative aspect-ratio difference above which two images are a size mismatch
# zlib strategy for derived PNGs: run-length matching is faster than the default at level 1 and compresses the
# flat white areas of ref_gt and the 0/255 masks as well (measured: bench/RESULTS_dataset.md).
PNG_STRATEGY = zlib.Z_RLE


def process_sample(spec: SampleSpec, st: BuildSettings) -> SampleResult:
    """Build (or reuse) one sample. Bad input becomes an error result, never an exception (Ctrl-C excepted); a
    failed output write raises `OutputWriteError` (the run's error, not the sample's)."""
    try:
        return _process(spec, st)
    except OutputWriteError:
        raise
    except SampleError as e:
        return SampleResult(spec.id, "error", problems=[e.problem])
    except Exception as e:  # a bug or an unexpected I/O failure: report it, keep the run going
        return SampleResult(spec.id, "error", problems=[_err("internal_error", spec.source, spec.id,
                                                             f"{type(e).__name__}: {e}")])


def _process(spec: SampleSpec, st: BuildSettings) -> SampleResult:
    key, raw = _hash_inputs(spec, st)
    if not st.force:
        reused = _reuse(spec, st, key)
        if reused is not None:
            return reused
    pair = _read_pair(spec, st, raw)
    binary = _read_mask(spec, st, raw, pair)
    stats = {"mask_area": round(float(np.count_nonzero(binary)) / binary.size, 6),
             "bg_change": round(background_change(pair.source, pair.target, binary, pair.diff), 6),
             "size": list(pair.size), "mask_derived": spec.mask is None}
    verdict = check_filters(stats, st)
    if verdict is not None:
        verdict.id, verdict.file = spec.id, str(spec.target)
        _write_sidecar(st, spec.id, key, stats, None, {})
        return SampleResult(spec.id, "filtered", problems=[verdict], stats=stats)
    try:
        box: Box = mask_bbox(binary, (pair.size[1], pair.size[0]))
    except EmptyMaskError:  # pragma: no cover - the mask was checked non-empty
        raise SampleError(_err("empty_mask", spec.mask or spec.target, spec.id, "mask is empty")) from None
    refs = _read_refs(spec, st, raw)  # decoded before anything is written: a bad reference leaves no outputs behind
    record, outputs = _write_outputs(spec, st, raw, pair, binary, box, refs)
    _write_sidecar(st, spec.id, key, stats, record, outputs)
    return SampleResult(spec.id, "built", record, stats=stats)


def _reuse(spec: SampleSpec, st: BuildSettings, key: str) -> SampleResult | None:
    """The result of an up-to-date sidecar (filters re-applied), or None when the sample must be built."""
    meta = _read_sidecar(st.meta_dir / f"{spec.id}.json", key)
    if meta is None:
        return None
    verdict = check_filters(meta["stats"], st)
    if verdict is not None:
        verdict.id, verdict.file = spec.id, str(spec.target)
        return SampleResult(spec.id, "filtered", problems=[verdict], stats=meta["stats"])
    if meta.get("record") and _outputs_ok(meta.get("outputs") or {}, st.base_dir):
        return SampleResult(spec.id, "reused", meta["record"], stats=meta["stats"])
    return None


def _decode(path: Path, raw: bytes, ident: str, max_input_pixels: int) -> DecodedImage:
    _check_input_pixels(path, raw, ident, max_input_pixels)
    try:
        return decode_image(path, raw)
    except ImageDecodeError as e:
        raise SampleError(_err("decode_error", path, ident, e.reason)) from None


def _check_input_pixels(path: Path, raw: bytes, ident: str, limit: int) -> None:
    """Refuse an image above `limit` pixels by its header, before decoding it (a 144-megapixel PNG decodes to
    over 400 MB per copy); 0 = no limit. A header Pillow cannot read is left to `decode_image` to report."""
    if not limit:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw)) as img:
                w, h = img.size
    except Exception:
        return
    if w * h > limit:
        raise SampleError(_err("too_large", path, ident, f"image of {w}x{h} = {w * h:,} pixels is above "
                                                         f"--max-input-pixels {limit:,}; not decoded"))


def _rgb(dec: DecodedImage, path: Path, ident: str) -> Image.Image:
    try:
        return to_rgb(dec)
    except ImageDecodeError as e:
        raise SampleError(_err("decode_error", path, ident, e.reason)) from None


def _check_size(path: Path, size: tuple[int, int], ref_size: tuple[int, int], ident: str, what: str) -> None:
    if size != ref_size and aspect_mismatch(size, ref_size) > ASPECT_TOLERANCE:
        raise SampleError(_err("size_mismatch", path, ident,
                               f"{what} is {size[0]}x{size[1]} but the target is {ref_size[0]}x{ref_size[1]} "
                               f"(aspect ratios differ by {aspect_mismatch(size, ref_size):.1%} > 1%)"))


@dataclass
class _Pair:
    """The decoded source and target, both resized to the output `size`, and their difference image."""

    target_dec: DecodedImage
    source_dec: DecodedImage
    target: Image.Image
    source: Image.Image
    size: tuple[int, int]
    diff: Image.Image


def _read_pair(spec: SampleSpec, st: BuildSettings, raw: dict[str, bytes]) -> _Pair:
    tgt_dec = _decode(spec.target, raw["target"], spec.id, st.max_input_pixels)
    src_dec = _decode(spec.source, raw["source"], spec.id, st.max_input_pixels)
    tgt_img, src_img = _rgb(tgt_dec, spec.target, spec.id), _rgb(src_dec, spec.source, spec.id)
    if aspect_problem(*tgt_img.size):  # the cache and the editor refuse it: refuse it here, where it enters
        raise SampleError(_err("bad_aspect", spec.target, spec.id, aspect_problem(*tgt_img.size)))
    size = fit_size(tgt_img.width, tgt_img.height, st.max_pixels)
    _check_size(spec.source, src_img.size, tgt_img.size, spec.id, "the source")
    if tgt_img.size != size:
        tgt_img = tgt_img.resize(size, Image.LANCZOS)
    if src_img.size != size:
        src_img = src_img.resize(size, Image.LANCZOS)
    return _Pair(tgt_dec, src_dec, tgt_img, src_img, size, ImageChops.difference(src_img, tgt_img))


def _read_mask(spec: SampleSpec, st: BuildSettings, raw: dict[str, bytes], pair: _Pair) -> np.ndarray:
    """The binary mask (bool HxW at the output size): the given one, else derived from the difference; never empty."""
    if spec.mask is not None:
        mask_dec = _decode(spec.mask, raw["mask"], spec.id, st.max_input_pixels)
        try:
            mask_img = to_mask(mask_dec)
        except ImageDecodeError as e:
            raise SampleError(_err("decode_error", spec.mask, spec.id, e.reason)) from None
        _check_size(spec.mask, mask_img.size, pair.target_dec.size, spec.id, "the mask")
        if mask_img.size != pair.size:
            mask_img = mask_img.resize(pair.size, Image.NEAREST)
        binary = binarize_mask(mask_img)
    else:
        binary = derive_mask(pair.source, pair.target, st.diff_threshold, st.mask_dilation, diff=pair.diff)
    if not binary.any():
        if spec.mask is not None:
            raise SampleError(_err("empty_mask", spec.mask, spec.id, "mask is empty (no pixel above 127)"))
        raise SampleError(_err("empty_mask", spec.target, spec.id,
                               f"derived mask is empty: source and target differ nowhere by more than "
                               f"{st.diff_threshold}/255"))
    return binary


def _read_refs(spec: SampleSpec, st: BuildSettings, raw: dict[str, bytes]) -> list[tuple[Image.Image, DecodedImage]]:
    """The extra references, each at its own size (fitted, 16-aligned), with their decoded originals."""
    refs = []
    for i, ref_path in enumerate(spec.refs, 1):
        ref_dec = _decode(ref_path, raw[f"ref_{i}"], spec.id, st.max_input_pixels)
        ref_img = _rgb(ref_dec, ref_path, spec.id)
        ref_size = fit_size(ref_img.width, ref_img.height, st.max_pixels)
        refs.append((ref_img.resize(ref_size, Image.LANCZOS) if ref_img.size != ref_size else ref_img, ref_dec))
    return refs


class _Outputs:
    """Writes one sample's files under `<files_dir>/<kind>/` and records each one's size (for the sidecar)."""

    def __init__(self, st: BuildSettings, size: tuple[int, int]):
        self.st, self.size = st, size
        self.sizes: dict[str, int] = {}

    def put(self, kind: str, name: str, img: Image.Image | np.ndarray, dec: DecodedImage | None = None,
            data: bytes | None = None, expect: tuple[int, int] | None = None) -> str:
        """Write one output; an input that already is exactly these pixels (8-bit RGB PNG/JPEG/WebP, upright, of
        the right size) is copied byte for byte instead of re-encoded."""
        expect = self.size if expect is None else expect
        files = self.st.files_dir
        copy = dec is not None and data is not None and dec.format in FORMAT_EXTENSION and dec.is_plain_rgb() \
            and dec.size == expect
        path = files / kind / (f"{name}{FORMAT_EXTENSION[dec.format]}" if copy else f"{name}.png")
        try:
            if copy:
                atomic_write_bytes(path, data, fsync=False)
            else:
                atomic_save_image(img, path, compress_level=self.st.compress_level, compress_type=PNG_STRATEGY)
        except OSError as e:
            raise OutputWriteError.from_os_error(e, path) from None
        rel = relative_path(path, self.st.base_dir)
        self.sizes[rel] = path.stat().st_size
        return rel


REFS_FOLDER = "refs"  # the extra reference images, `<id>_<n>.<ext>`; every other output folder holds `<id>.<ext>`


def is_output_of(sample_id: str, folder: str, name: str) -> bool:
    """Whether a file named `name` in the output folder `folder` (`target`, `refs`, `meta` ...) is sample
    `sample_id`'s, and of no other sample's."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not ext.isalnum():
        return False
    if folder == REFS_FOLDER:
        base, _, n = stem.rpartition("_")
        return base == sample_id and n.isdigit()
    return stem == sample_id


def _write_outputs(spec: SampleSpec, st: BuildSettings, raw: dict[str, bytes], pair: _Pair, binary: np.ndarray,
                   box: Box, refs: list[tuple[Image.Image, DecodedImage]]) -> tuple[dict[str, Any], dict[str, int]]:
    """(dataset record, output sizes) after writing the target, edit images, mask, ref_gt and its crop."""
    out = _Outputs(st, pair.size)
    image_rel = out.put("target", spec.id, pair.target, pair.target_dec, raw["target"])
    mask_l = _as_l(binary)
    if st.fixed_source:  # source inside the mask, target outside: the background is the target's, pixel for pixel
        edit0 = out.put("fixed", spec.id, Image.composite(pair.source, pair.target, mask_l))
    else:
        edit0 = out.put("source", spec.id, pair.source, pair.source_dec, raw["source"])
    edit_rest = [out.put(REFS_FOLDER, f"{spec.id}_{i}", img, dec, raw[f"ref_{i}"], expect=img.size)
                 for i, (img, dec) in enumerate(refs, 1)]
    mask_rel = out.put("mask", spec.id, mask_l)
    ref_gt = Image.composite(pair.target, Image.new("RGB", pair.size, WHITE), mask_l)  # the target on white
    ref_gt_rel = out.put("ref_gt", spec.id, ref_gt)
    crop_rel = out.put("ref_gt_crop", spec.id, ref_gt.crop(box.pil_box()))

    record: dict[str, Any] = {
        "prompt": edit_prompt(st.prompt_template.replace("{instruction}", spec.instruction)),
        "image": image_rel,
        "edit_image": [edit0] + edit_rest,
        "back_mask": mask_rel,
        "ref_gt": ref_gt_rel,
        "ref_gt_crop": crop_rel,
    }
    if spec.edit_type:
        record["edit_type"] = spec.edit_type
    record["id"] = spec.id
    return record, out.sizes
