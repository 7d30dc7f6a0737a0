"""The app's logic without gradio: model set-up, checkpoint selection (hot-swap) and one edit.

    service = EditService.from_config(cfg)                  # or EditService(editor, roots=[...])
    out = service.generate(image="in.png", mask="mask.png", prompt="make it red", checkpoint="run/step-100.safetensors")
    out.image, out.sub_image, out.settings, out.notices

Everything a request carries is validated here (types, ranges, the checkpoint root check); a bad request raises
AppInputError with a message for the user and leaves the service ready for the next one. Requests are serialised
by a lock: one edit runs on the device at a time, whatever the caller.
"""
from __future__ import annotations

import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..editing.editor import EditInputError, EditRequest, EditSettings, Editor, to_rgb
from ..loading import MissingWeightsError, ModelSources, load_pipeline
from ..low_memory import apply_low_memory, low_memory_enabled
from ..lora_formats import LoRAFile, read_lora_file
from ..lora_stack import LoRALayer
from ..editing.sampling import FLOW_SCHEDULES
from .checkpoints import (CheckpointAccessError, CheckpointEntry, list_checkpoints, resolve_checkpoint,
                          resolve_roots)
from .errors import AppInputError
from .uploads import limit_pixels, mask_coverage, open_image

SAMPLERS = {"flow": "flow", "flow_matching": "flow", "flow-matching": "flow", "fm": "flow", "lbm": "lbm"}
from ..limits import LBM_MAX_STEPS  # noqa: E402  (re-exported for the UI)
MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**32 - 1
NO_CHECKPOINT_LABEL = "(none: base model)"

__all__ = ["AppInputError", "CheckpointAccessError", "EditService", "GenerateOutput", "build_editor",
           "resolve_device", "resolve_dtype"]


# ---- model set-up -----------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> str:
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available here")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def tiny_sources(tiny_root: Path | str, variant: str = "2511") -> ModelSources:
    """The tiny random model, written once to `tiny_root` (a cache) and then read through the normal loader."""
    from ..tiny import write_tiny_model

    return ModelSources(variant=variant, model_root=write_tiny_model(tiny_root))


def build_editor(cfg, log: Callable[[str], None] = print) -> tuple[Editor, list[str]]:
    """Editor (hot-swap on) for an AppConfig; notices tell the user what was chosen (e.g. the tiny fallback)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if (cfg.compile or cfg.fp8) and not str(device).startswith("cuda"):
        raise ConfigError(f"`compile` and `fp8` need a CUDA device; this app runs on {device}")
    notices: list[str] = []
    load_device = "cpu" if low_memory_enabled(cfg) else device  # low memory: placed by apply_low_memory below
    if cfg.tiny:
        sources = tiny_sources(cfg.tiny_root, cfg.variant)
        notices.append("Running on the tiny random model (--tiny): it shows the app working; its edits are noise.")
        pipe = load_pipeline(sources, device=load_device, torch_dtype=dtype)
    else:
        sources = cfg.model_sources(cfg.variant)
        try:
            pipe = load_pipeline(sources, device=load_device, torch_dtype=dtype)
        except MissingWeightsError as e:
            if not cfg.tiny_fallback:
                raise
            sources = tiny_sources(cfg.tiny_root, cfg.variant)
            notices.append(f"No Qwen-Image-Edit-{cfg.variant} weights found, so the app runs on the tiny random "
                           f"model: its edits are noise. To use the real model: {e}")
            pipe = load_pipeline(sources, device=load_device, torch_dtype=dtype)
    for n in notices:
        log(f"[app] {n}")
    log(f"[app] model: Qwen-Image-Edit-{sources.variant} on {device} ({str(dtype).replace('torch.', '')})")
    editor = Editor(pipe, variant=sources.variant, hot_swap=True, activation=cfg.dit_activation,
                    log=lambda m: log(m.replace("[editor]", "[app]", 1)))
    if low_memory_enabled(cfg):
        apply_low_memory(pipe.dit, cfg, device, pipe=pipe)
    if cfg.compile or cfg.fp8:
        editor.speed_up(compile_blocks=cfg.compile, fp8=cfg.fp8)
        log(f"[app] speed-ups: {', '.join(n for n, on in (('compiled blocks', cfg.compile), ('fp8', cfg.fp8)) if on)}")
    return editor, notices


# ---- request validation -----------------------------------------------------------------------------------------
def _number(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> float | int:
    if value is None or isinstance(value, bool):
        raise AppInputError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise AppInputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise AppInputError(f"{name} must be finite, got {value!r}")
    if integer:
        if not x.is_integer():
            raise AppInputError(f"{name} must be a whole number, got {value!r}")
        x = int(x)
    if not lo <= x <= hi:
        raise AppInputError(f"{name}={value!r} is out of range ({lo:g} to {hi:g})")
    return x


def parse_sampler(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in SAMPLERS:
        raise AppInputError(f"unknown sampler {value!r}: use 'flow' (flow matching) or 'lbm'")
    return SAMPLERS[value.strip().lower()]


@dataclass
class GenerateOutput:
    image: Image.Image
    sub_image: Image.Image | None
    source: Image.Image          # the input at the output's size (the "before" of a comparison)
    settings: dict
    notices: list[str] = field(default_factory=list)


class EditService:
    """One Editor, the checkpoint roots and the request limits; thread-safe (one edit at a time)."""

    def __init__(self, editor: Editor, checkpoint_roots: Sequence[Path | str] = ("train",), *,
                 max_upload_pixels: int = 4096 * 4096, max_pixels: int = 1024 * 1024, max_steps: int = 100,
                 max_references: int = 3, max_extra_loras: int = 3, notices: Sequence[str] = ()):
        self.editor = editor
        self.roots = resolve_roots(checkpoint_roots)
        self.max_upload_pixels = int(max_upload_pixels)
        self.max_pixels = int(max_pixels)
        self.max_steps = int(max_steps)
        self.max_references = int(max_references)
        self.max_extra_loras = int(max_extra_loras)
        self.startup_notices = list(notices)
        self.checkpoint_loads = 0            # how many times a checkpoint was (re)loaded: for tests and logs
        self._loaded: tuple[Path, float, int] | None = None   # (path, strength, mtime_ns) now applied
        self._extra: tuple = ()                                # ((path, strength, mtime_ns), ...) of the extra LoRAs
        self._lora_files: dict[Path, tuple[int, LoRAFile]] = {}  # parsed extra LoRAs in use, by path (+ mtime_ns)
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, cfg, log: Callable[[str], None] = print) -> "EditService":
        editor, notices = build_editor(cfg, log)
        service = cls(editor, cfg.checkpoint_root, max_upload_pixels=cfg.max_upload_pixels,
                      max_pixels=cfg.max_pixels, max_steps=cfg.max_steps, max_references=cfg.max_references,
                      max_extra_loras=cfg.max_extra_loras, notices=notices)
        if cfg.checkpoint:
            try:
                service.select_checkpoint(cfg.checkpoint, 1.0)
            except AppInputError as e:
                service.startup_notices.append(f"start-up checkpoint not loaded: {e}")
                log(f"[app] start-up checkpoint not loaded: {e}")
        return service

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointEntry]:
        return list_checkpoints(self.roots)

    def checkpoint_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a dropdown; value '' is the base model."""
        return [(NO_CHECKPOINT_LABEL, "")] + [(e.label, e.id) for e in self.checkpoints()]

    def lora_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for an extra-LoRA slot: every file under the roots; value '' is an empty slot."""
        return [("(none)", "")] + [(e.label, e.id) for e in self.checkpoints()]

    def checkpoint_id(self, path: Path) -> str:
        for root in self.roots:
            try:
                return path.relative_to(root).as_posix()
            except ValueError:
                continue
        return path.name

    @property
    def loaded(self) -> tuple[str, float] | None:
        """(checkpoint id, strength) now applied, or None."""
        if self._loaded is None:
            return None
        return self.checkpoint_id(self._loaded[0]), self._loaded[1]

    def select_checkpoint(self, name: str | None, strength: Any = 1.0) -> list[str]:
        """Apply a checkpoint (LoRA hot-load + STE swap, the base model stays); reload only when it changed."""
        path = resolve_checkpoint(name, self.roots)  # CheckpointAccessError is an AppInputError-like ValueError
        with self._lock:
            if path is None:
                if self.editor.checkpoint is not None:
                    self.editor.unload_checkpoint()
                    self._loaded = None
                    return ["checkpoint unloaded: base model"]
                self._loaded = None
                return []
            strength = float(_number("strength", strength, -4.0, 4.0))
            key = (path, strength, path.stat().st_mtime_ns)
            if self._loaded == key and self.editor.checkpoint is not None:
                return []
            cid = self.checkpoint_id(path)
            try:
                self.editor.load_checkpoint(path, strength)
            except CheckpointError as e:
                if self.editor.checkpoint is None:
                    self._loaded = None
                raise AppInputError(str(e).replace(str(path), cid)) from None
            self._loaded = key
            self.checkpoint_loads += 1
            return [f"loaded checkpoint {cid} at strength {strength:g}"]

    # ---- extra LoRAs -------------------------------------------------------------------------------------------
    def parse_loras(self, value: Any) -> list[tuple[str, float]]:
        """(name, strength) pairs from the request: None/'' (none); text `NAME[:STRENGTH]` separated by commas or
        new lines; or a list of `[name, strength]` pairs, `{"name": ..., "strength": ...}` objects or names. Entries
        with an empty name are skipped (empty UI slots)."""
        if value is None:
            return []
        if isinstance(value, str):
            items: list[Any] = [p for line in value.splitlines() for p in line.split(",")]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise AppInputError(f"loras must be text or a list, got {type(value).__name__}")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                name, sep, tail = item.strip().rpartition(":")
                if not sep or not name or not _is_number(tail):
                    name, tail = item.strip(), 1.0
                strength = tail
            elif isinstance(item, dict):
                name, strength = item.get("name", item.get("file", "")), item.get("strength", 1.0)
            elif isinstance(item, (list, tuple)) and len(item) in (1, 2):
                name, strength = item[0], item[1] if len(item) == 2 else 1.0
            else:
                raise AppInputError(f"loras entry {i + 1} must be a name, [name, strength] or "
                                    f"{{'name', 'strength'}}, got {item!r}")
            if name is None or (isinstance(name, str) and not name.strip()):
                continue
            if not isinstance(name, str):
                raise AppInputError(f"loras entry {i + 1}: the name must be text, got {type(name).__name__}")
            out.append((name.strip(), float(_number(f"strength of LoRA {name.strip()!r}", strength, -4.0, 4.0))))
        if len(out) > self.max_extra_loras:
            raise AppInputError(f"{len(out)} extra LoRAs given (at most {self.max_extra_loras})")
        return out

    def select_loras(self, value: Any) -> list[str]:
        """Stack the requested extra LoRAs (files under the checkpoint roots) on the checkpoint; hot-swapped, and
        only re-applied when the list, a strength or a file changed."""
        specs = self.parse_loras(value)
        resolved = []
        for name, strength in specs:
            try:
                path = resolve_checkpoint(name, self.roots)
            except CheckpointAccessError as e:
                raise AppInputError(f"extra LoRA: {e}") from None
            if path is None:
                continue
            resolved.append((path, strength, path.stat().st_mtime_ns))
        paths = [p for p, _, _ in resolved]
        if len(set(paths)) != len(paths):
            raise AppInputError("the same LoRA is listed twice")
        key = tuple(resolved)
        with self._lock:
            if key == self._extra:
                return []
            previous = {(x.path, x.strength, m): x for x, (_, _, m) in zip(self.editor.extra_loras, self._extra)}
            layers = []
            for path, strength, mtime in resolved:
                if (path, strength, mtime) in previous:  # unchanged: keep its tensors already on the device
                    layers.append(previous[(path, strength, mtime)])
                    continue
                cid = self.checkpoint_id(path)
                cached = self._lora_files.get(path)
                if cached is None or cached[0] != mtime:
                    try:
                        cached = (mtime, read_lora_file(path, self.editor.pipe.dit))
                    except CheckpointError as e:
                        raise AppInputError(f"LoRA {cid}: " + str(e).replace(f"{path}: ", "")) from None
                    self._lora_files[path] = cached
                lora_file = cached[1]
                layers.append(LoRALayer(cid, lora_file.lora, strength, lora_file.layout, path))
            try:
                self.editor.set_extra_loras(layers)
            except CheckpointError as e:
                raise AppInputError(str(e)) from None
            self._extra = key
            for path in set(self._lora_files) - set(paths):  # keep only the files in use
                del self._lora_files[path]
            if not layers:
                return ["extra LoRAs removed"]
            return ["extra LoRAs: " + ", ".join(f"{x.name} @ {x.strength:g}" for x in layers)]

    # ---- one edit -----------------------------------------------------------------------------------------------
    def generate(self, image: Any, mask: Any = None, prompt: Any = "", references: Any = None,
                 checkpoint: Any = "", strength: Any = 1.0, sampler: Any = "flow", steps: Any = 40,
                 cfg: Any = 4.0, seed: Any = 0, blend_alpha: Any = 0.0,
                 progress: Callable[[int, int], None] | None = None, mask_source: str | None = None,
                 notices: Sequence[str] = (), loras: Any = None, schedule: Any = "qwen") -> GenerateOutput:
        t0 = time.perf_counter()
        notices = list(notices)
        # -- settings
        sampler = parse_sampler(sampler)
        max_steps = LBM_MAX_STEPS if sampler == "lbm" else self.max_steps
        steps = int(_number("steps", steps, 1, max_steps, integer=True))
        cfg_scale = float(_number("cfg", cfg, 1.0, 30.0))
        seed = int(_number("seed", -1 if seed is None else seed, -1, MAX_SEED, integer=True))
        if seed == -1:
            seed = secrets.randbelow(MAX_SEED + 1)
            notices.append(f"random seed {seed}")
        blend_alpha = float(_number("blend_alpha", blend_alpha, 0.0, 1.0))
        schedule = "qwen" if schedule in (None, "") else schedule
        if schedule not in FLOW_SCHEDULES:
            raise AppInputError(f"unknown schedule {schedule!r}: use {' or '.join(map(repr, FLOW_SCHEDULES))}")
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str):
            raise AppInputError(f"prompt must be text, got {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise AppInputError(f"prompt is {len(prompt)} characters long (at most {MAX_PROMPT_CHARS})")
        if not prompt.strip():
            notices.append("empty prompt")
        # -- images
        src = open_image(image, "image")
        input_size = list(src.size)
        src, note = limit_pixels(src, self.max_upload_pixels, "image")
        notices += [note] if note else []
        mask_img = None
        if mask is not None:
            mask_img = open_image(mask, "mask")
            mask_img, note = limit_pixels(mask_img, self.max_upload_pixels, "mask", resample=Image.NEAREST)
            notices += [note] if note else []
        refs = []
        if references is not None:
            if isinstance(references, (str, bytes, Image.Image, dict)):
                references = [references]
            if not isinstance(references, (list, tuple)):
                raise AppInputError(f"references must be a list of images, got {type(references).__name__}")
            if len(references) > self.max_references:
                raise AppInputError(f"{len(references)} reference images given (at most {self.max_references})")
            for i, r in enumerate(references):
                if isinstance(r, (list, tuple)) and r:  # gallery items are (image, caption)
                    r = r[0]
                ref = open_image(r, f"reference {i + 1}")
                ref, note = limit_pixels(ref, self.max_upload_pixels, f"reference {i + 1}")
                notices += [note] if note else []
                refs.append(ref)
        settings = EditSettings(sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                                blend_alpha=blend_alpha, max_pixels=self.max_pixels, schedule=schedule)
        with self._lock:
            notices += self.select_checkpoint(checkpoint, strength)
            notices += self.select_loras(loras)
            try:
                result = self.editor.edit(EditRequest(image=src, prompt=prompt, mask=mask_img, references=refs),
                                          settings, progress=progress)
            except (EditInputError, CheckpointError) as e:
                raise AppInputError(str(e)) from None
            loaded = self.loaded
        notices += result.notices
        info = dict(result.settings)
        info.pop("batch_cfg", None)
        info.update(
            prompt=prompt,
            checkpoint=loaded[0] if loaded else None,
            strength=loaded[1] if loaded else None,
            run=None, step=None,
            references=len(refs),
            mask=mask_source or ("given" if mask_img is not None else "none (whole image)"),
            mask_coverage=round(mask_coverage(result_mask_for(mask_img, result.image.size)), 4),
            input_size=input_size,
            seconds=round(time.perf_counter() - t0, 3),
            notices=notices,
        )
        if loaded and self.editor.checkpoint is not None:
            meta = self.editor.checkpoint.metadata
            info["run"] = str(Path(loaded[0]).parent.as_posix())
            info["step"] = meta.get("step")
        source = to_rgb(src)
        if source.size != result.image.size:
            source = source.resize(result.image.size, Image.LANCZOS)
        return GenerateOutput(result.image, result.sub_image, source, info, notices)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def result_mask_for(mask: Image.Image | None, size: tuple[int, int]) -> Image.Image | None:
    if mask is None:
        return None
    m = mask
    if m.mode in ("RGBA", "LA") and m.getextrema()[-1] != (255, 255):
        m = m.getchannel("A")
    m = m.convert("L")
    return m if m.size == size else m.resize(size, Image.NEAREST)
