"""Batch edits: the jobs of a dataset JSON (or one image), the editor built from the flags, one job edited and its
outputs written atomically, and the re-run rule (outputs made with the same settings and inputs are reused)."""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import config_to_dict
from .options import EditConfig, ModelOptions, parse_lora_spec, resolve_device, settings_from, sources_from


def checkpoint_has_ste(path: Path | None) -> bool:
    """Whether a checkpoint file holds STE keys (header only; unreadable files answer False and fail later)."""
    if path is None or Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith("pipe.ste.") for k in f.keys())
    except Exception:  # noqa: BLE001 - read_checkpoint reports it properly
        return False


def expects_sub_image(cfg: ModelOptions) -> bool:
    if cfg.mode == "plain":
        return False
    if cfg.mode == "bridge":
        return True
    return checkpoint_has_ste(cfg.checkpoint)


def build_editor(cfg: ModelOptions):
    from .editor import Editor
    from ..loading import load_pipeline
    from ..low_memory import apply_low_memory, low_memory_enabled

    device, dtype = resolve_device(cfg.device, cfg.dtype)
    if (cfg.compile or cfg.fp8) and not str(device).startswith("cuda"):
        raise SystemExit(f"--compile and --fp8 need a CUDA device (--device); this run is on {device}")
    lowmem = low_memory_enabled(cfg)  # load on the host, then place block by block; LoRAs hot-load beside fp8
    pipe = load_pipeline(sources_from(cfg), device="cpu" if lowmem else device, torch_dtype=dtype)
    editor = Editor(pipe, variant=cfg.variant, mode=cfg.mode, activation=cfg.dit_activation, hot_swap=lowmem)
    if lowmem:
        apply_low_memory(pipe.dit, cfg, device, pipe=pipe)
    if cfg.checkpoint is not None:
        editor.load_checkpoint(cfg.checkpoint, cfg.strength)
    if cfg.lora:
        from ..lora_formats import lora_layer

        editor.set_extra_loras([lora_layer(path, pipe.dit, strength, name=str(path))
                                for path, strength in map(parse_lora_spec, cfg.lora)])
    if cfg.compile or cfg.fp8:
        editor.speed_up(compile_blocks=cfg.compile, fp8=cfg.fp8, fp8_fast_accum=cfg.fp8_fast_accum,
                        fp8_keep_bf16=cfg.fp8_keep_bf16)
    return editor


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(ident: str) -> str:
    name = _SAFE.sub("_", str(ident)).strip("._")
    return name or "sample"


@dataclass
class Job:
    """One edit: inputs and where its outputs go."""

    name: str
    prompt: str
    source: Path
    references: list[Path]
    mask: Path | None
    target: Path | None = None
    index: int = 0
    ident: str = ""

    def outputs(self, out_dir: Path) -> tuple[Path, Path, Path]:
        return out_dir / f"{self.name}.png", out_dir / f"{self.name}_sub.png", out_dir / f"{self.name}.json"

    def done(self, out_dir: Path, with_sub: bool, fingerprint: str | None = None) -> bool:
        """Outputs exist (and, given a fingerprint, were made with the same settings: see `reuse`)."""
        from .reuse import recorded_fingerprint

        image, sub, info = self.outputs(out_dir)
        exists = image.is_file() and (sub.is_file() or not with_sub)
        return exists and (fingerprint is None or recorded_fingerprint(info) == fingerprint)

    def fingerprint(self, settings: dict[str, Any]) -> str:
        from .reuse import sample_fingerprint

        return sample_fingerprint(settings, self.prompt, [("source", self.source), ("mask", self.mask)]
                                  + [(f"reference {i + 1}", p) for i, p in enumerate(self.references)])


def jobs_from_dataset(path: Path, base_path: Path | None = None, limit: int | None = None) -> list[Job]:
    from ..dataset.schema import load_dataset

    entries = load_dataset(path, base_path)
    if limit is not None:
        entries = entries[:limit]
    jobs, seen = [], set()
    for e in entries:
        name = safe_name(e.id or e.image.stem)
        if name in seen:  # ids are free text: keep output names unique
            name = f"{name}_{e.index}"
        seen.add(name)
        jobs.append(Job(name=name, prompt=e.prompt, source=e.edit_image[0], references=list(e.edit_image[1:]),
                        mask=e.back_mask, target=e.image, index=e.index, ident=str(e.id)))
    return jobs


def open_image(path: Path, what: str):
    """Fully decoded PIL image; conversions (alpha, greyscale, 16 bit, EXIF) are the editor's."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{what} {path} cannot be decoded: {e}") from None
    except Image.DecompressionBombError as e:  # one oversized entry is that entry's error, not the batch's
        raise ValueError(f"{what} {path} is too large to decode ({e})") from None


def run_job(editor, job: Job, settings, out_dir: Path, negative_prompt: str = "",
            fingerprint: str | None = None) -> dict[str, Any]:
    """Edit one job and write its outputs atomically (sub image and sidecar first, the main image last, so an
    existing main image means a complete sample)."""
    from ..atomic import atomic_write_json
    from .editor import EditRequest
    from .evaluate import save_png

    request = EditRequest(image=open_image(job.source, "source image"), prompt=job.prompt,
                          mask=None if job.mask is None else open_image(job.mask, "mask"),
                          references=[open_image(p, f"reference {i + 1}") for i, p in enumerate(job.references)],
                          negative_prompt=negative_prompt)
    t0 = time.perf_counter()
    result = editor.edit(request, settings)
    image_path, sub_path, info_path = job.outputs(out_dir)
    if result.sub_image is not None:
        save_png(result.sub_image, sub_path)
    info = {"id": job.ident or job.name, "index": job.index, "prompt": job.prompt, "source": str(job.source),
            "mask": None if job.mask is None else str(job.mask), "notices": result.notices,
            "seconds": round(time.perf_counter() - t0, 3), "settings": result.settings, "fingerprint": fingerprint}
    atomic_write_json(info_path, info)
    save_png(result.image, image_path)
    return info


def edit_jobs(cfg, jobs: list[Job], out_dir: Path, editor=None, log=print) -> tuple[int, int, list[tuple[Job, str]]]:
    """(edited, skipped, failures). Loads the model only when some job is pending."""
    from .editor import EditInputError
    from .reuse import changed_settings, run_settings, write_settings

    settings = settings_from(cfg)
    with_sub = expects_sub_image(cfg)
    run = run_settings(cfg)
    fingerprints = {j.name: j.fingerprint(run) for j in jobs}
    pending = [j for j in jobs if cfg.overwrite or not j.done(out_dir, with_sub, fingerprints[j.name])]
    skipped = len(jobs) - len(pending)
    if skipped:
        log(f"skipping {skipped} sample(s) whose outputs exist in {out_dir} with the same settings "
            f"(--overwrite to redo)")
    stale = [j for j in pending if not cfg.overwrite and j.done(out_dir, with_sub)]
    if stale:
        changed = changed_settings(out_dir, run)
        log(f"redoing {len(stale)} sample(s) in {out_dir} made with other settings or inputs"
            + (f" (changed: {', '.join(changed)})" if changed else ""))
    failures: list[tuple[Job, str]] = []
    if not pending:
        return 0, skipped, failures
    if editor is None:
        editor = build_editor(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_settings(out_dir, run)
    bar = _progress(pending, cfg.progress, desc="edit")
    edited = 0
    for job in bar:
        try:
            info = run_job(editor, job, settings, out_dir, cfg.negative_prompt, fingerprints[job.name])
        except (EditInputError, ValueError) as e:
            failures.append((job, str(e)))
            log(f"error: sample {job.ident or job.name}: {e}")
            continue
        edited += 1
        for notice in info["notices"]:
            log(f"note: sample {job.ident or job.name}: {notice}")
    return edited, skipped, failures


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", file=sys.stderr)


def write_run_info(out_dir: Path, cfg, command: str) -> None:
    import diffsynth_edit
    from ..atomic import atomic_write_json

    try:
        from importlib.metadata import version

        ds_version = version("diffsynth")
    except Exception:  # noqa: BLE001
        ds_version = None
    atomic_write_json(out_dir / "run.json", {"command": command, "config": config_to_dict(cfg),
                                             "diffsynth": ds_version, "diffsynth_edit": diffsynth_edit.__version__})



def run_edit(cfg: EditConfig, log=print) -> int:
    out_dir = Path(cfg.out)
    if cfg.dataset is not None:
        jobs = jobs_from_dataset(cfg.dataset, cfg.base_path, cfg.limit)
    else:
        jobs = [Job(name=safe_name(cfg.id or Path(cfg.image).stem), prompt=cfg.prompt, source=Path(cfg.image),
                    references=list(cfg.references), mask=cfg.mask, ident=cfg.id or Path(cfg.image).stem)]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_run_info(out_dir, cfg, "edit")
    edited, skipped, failures = edit_jobs(cfg, jobs, out_dir, log=log)
    log(f"edited {edited}, skipped {skipped}, failed {len(failures)} of {len(jobs)}; outputs in {out_dir}")
    return 1 if failures else 0
