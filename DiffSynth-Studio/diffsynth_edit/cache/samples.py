"""The samples of a cache run: dataset entries (`load_items`) and their CPU preparation (`prepare_sample`).

Images are resized and masked exactly as `Editor.prepare` does (`editor.to_rgb`, `editor.fit_image`,
`editor.prepare_mask`, `geometry.mask_bbox`); the ref_gt crop is derived when the dataset has none of the box's size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..geometry import Box, mask_bbox
from ..prompts import edit_prompt
from .config import CacheConfig, CacheRunError
from .manifest import SAMPLE_SUFFIX, SAMPLES_DIR
from .store import EDIT_PREFIX

SUB_KEY = "sub_input_latents"


@dataclass
class _Item:
    index: int
    id: str
    prompt: str
    edit_type: str | None
    image: Path
    edit_image: list[Path]
    back_mask: Path | None
    ref_gt_crop: Path | None
    hash: str | None = None

    @property
    def file(self) -> str:
        return f"{SAMPLES_DIR}/{self.hash}{SAMPLE_SUFFIX}"

    def input_files(self) -> list[tuple[str, Path]]:
        files = [("image", self.image)] + [(f"edit_image.{i}", p) for i, p in enumerate(self.edit_image)]
        if self.back_mask is not None:
            files.append(("back_mask", self.back_mask))
        if self.ref_gt_crop is not None:
            files.append(("ref_gt_crop", self.ref_gt_crop))
        return files


def load_items(cfg: CacheConfig) -> list[_Item]:
    from ..dataset.schema import load_dataset

    try:
        entries = load_dataset(cfg.dataset, base_path=cfg.base_path)
    except (OSError, ValueError) as e:
        raise CacheRunError(f"cannot read dataset {cfg.dataset}: {e}") from None
    if cfg.limit is not None:
        entries = entries[:cfg.limit]
    items, seen = [], set()
    for pos, e in enumerate(entries):
        index = int(getattr(e, "index", pos))
        sid = getattr(e, "id", None)
        sid = f"{index:06d}" if sid is None or str(sid) == "" else str(sid)
        if sid in seen:
            sid = f"{sid}#{index}"
        seen.add(sid)
        if not e.edit_image:
            raise CacheRunError(f"dataset {cfg.dataset}: sample {sid} has no edit_image (the source image)")
        items.append(_Item(index=index, id=sid, prompt=edit_prompt(str(e.prompt)), edit_type=getattr(e, "edit_type", None),
                           image=Path(e.image), edit_image=[Path(p) for p in e.edit_image],
                           back_mask=None if getattr(e, "back_mask", None) is None else Path(e.back_mask),
                           ref_gt_crop=None if getattr(e, "ref_gt_crop", None) is None else Path(e.ref_gt_crop)))
    return items


@dataclass
class _Prepared:
    item: _Item
    target: Image.Image
    source: Image.Image
    refs: list[Image.Image]
    mask: Image.Image | None
    box: Box
    crop: Image.Image
    # filled in the reader thread when a pipeline is given (else computed by the encoder):
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # VAE inputs, key -> [3, H, W] uint8
    prompt_inputs: Any = None  # encoding.prompt_inputs(pipe, [prompt, ""], images)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per preparation stage

    def vae_jobs(self) -> list[tuple[str, Image.Image]]:
        """(cache key, image) of every VAE input of this sample."""
        return [("input_latents", self.target), (EDIT_PREFIX + "0", self.source),
                *((f"{EDIT_PREFIX}{i}", r) for i, r in enumerate(self.refs, start=1)), (SUB_KEY, self.crop)]

    def vae_inputs(self, sub: bool) -> list[tuple[str, torch.Tensor]]:
        """(cache key, uint8 [3, H, W]) of the sub crop (`sub`) or of every other VAE input: the reader's tensor,
        else converted here."""
        from ..encoding import image_to_uint8

        return [(key, image_to_uint8(im) if self.pixels.get(key) is None else self.pixels[key])
                for key, im in self.vae_jobs() if (key == SUB_KEY) == sub]


class SampleError(Exception):
    """One sample cannot be cached; the message names the file and the reason."""


def _open(path: Path, role: str) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise SampleError(f"{role} {path}: file not found") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise SampleError(f"{role} {path}: cannot read image ({type(e).__name__}: {e})") from None


def prepare_sample(item: _Item, max_pixels: int, pipe=None, pin: bool = False) -> _Prepared:
    """Resize and mask exactly as `Editor.prepare` does; derive the ref_gt crop. With `pipe`, also the CPU side of
    the encoding (uint8 pixel tensors, page-locked with `pin`; the processor's token ids and pixel values), so the
    reader threads do it while the device encodes the previous batch."""
    t0 = time.perf_counter()
    prepared = _prepare_images(item, max_pixels)
    t1 = time.perf_counter()
    prepared.timings["prep.images"] = t1 - t0
    if pipe is not None:
        from ..encoding import image_to_uint8, prompt_inputs

        prepared.pixels = {k: image_to_uint8(im, pin) for k, im in prepared.vae_jobs()}
        t2 = time.perf_counter()
        prepared.prompt_inputs = prompt_inputs(pipe, [item.prompt, ""], [prepared.source, *prepared.refs])
        prepared.timings["prep.uint8"] = t2 - t1
        prepared.timings["prep.processor"] = time.perf_counter() - t2
    return prepared


def _prepare_images(item: _Item, max_pixels: int) -> _Prepared:
    from ..editing.editor import EditInputError, fit_image, prepare_mask, to_rgb

    try:
        src_raw = to_rgb(_open(item.edit_image[0], "edit_image[0]"), "source")
        source, _ = fit_image(src_raw, max_pixels)
        refs = [fit_image(to_rgb(_open(p, f"edit_image[{i}]"), f"reference {i}"), max_pixels)[0]
                for i, p in enumerate(item.edit_image[1:], start=1)]
        size = source.size  # (w, h)
        target = to_rgb(_open(item.image, "image"), "target")
        if target.size != size:
            (tw, th), (sw, sh) = target.size, src_raw.size
            if abs(tw / th - sw / sh) > 0.01 * (sw / sh):
                raise SampleError(f"image {item.image}: target of {tw}x{th} does not match the source of {sw}x{sh} "
                                  f"(different aspect ratio)")
            target = target.resize(size, Image.LANCZOS)
        mask = None
        if item.back_mask is not None:
            try:
                mask, _ = prepare_mask(_open(item.back_mask, "back_mask"), size, src_raw.size)  # the editor's rule
            except EditInputError as e:
                raise SampleError(f"back_mask {item.back_mask}: {e}") from None
        w, h = size
        box = mask_bbox(mask, (h, w))
        crop = None
        if item.ref_gt_crop is not None:
            c = to_rgb(_open(item.ref_gt_crop, "ref_gt_crop"), "ref_gt_crop")
            if c.size == (box.width, box.height):
                crop = c
        if crop is None:
            pasted = target if mask is None else Image.composite(target, Image.new("RGB", size, (255, 255, 255)), mask)
            crop = pasted.crop(box.pil_box())
        return _Prepared(item, target, source, refs, mask, box, crop)
    except SampleError:
        raise
    except EditInputError as e:
        raise SampleError(str(e)) from None
