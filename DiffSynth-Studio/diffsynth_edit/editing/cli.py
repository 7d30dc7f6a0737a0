"""Command line of `edit_images.py`: batch editing, evaluation and the tiny test model.

    edit_images.py edit --dataset data/test.json --model-root models --checkpoint run/step-1000.safetensors --out out/
    edit_images.py edit --image in.png --mask mask.png --prompt "..." --model-root models --out out/
    edit_images.py evaluate --dataset data/test.json --model-root models --checkpoint ... --out eval/
    edit_images.py tiny-model --out models_tiny

Each command is one dataclass (`--preset FILE.toml` plus one `--kebab-case` flag per field, the CLI wins).
Outputs are `<out>/<id>.png` (the edited image), `<out>/<id>_sub.png` (the sub stream, bridge mode only) and
`<out>/<id>.json` (settings, input notices and a settings fingerprint), each written atomically; a re-run reuses a
sample only when its outputs exist and were made with the same settings, checkpoint and inputs (see `reuse`), and
redoes the others (`--overwrite` redoes all). docs/editing.md has the details.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from ..config import ConfigError, ModelPathOptions, config_to_dict, parse_config
from ..low_memory import LowMemoryOptions, apply_low_memory, low_memory_enabled

USAGE = """usage:
  edit_images.py edit (--dataset FILE.json | --image IMG --prompt TEXT [--mask MASK]) --out DIR [model/sampler flags]
  edit_images.py evaluate --dataset FILE.json --out DIR [model/sampler flags]
  edit_images.py tiny-model --out DIR
Run `edit_images.py <command> --help` for every flag; docs/editing.md describes inputs and outputs."""


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class ModelOptions(ModelPathOptions, LowMemoryOptions):
    """Where the model comes from and how it runs."""

    variant: str = field(default="2511", metadata=_h("Qwen-Image-Edit variant: 2511 or 2509"))
    checkpoint: Path | None = field(default=None, metadata=_h("trained .safetensors (LoRA and/or STE)"))
    strength: float = field(default=1.0, metadata=_h("LoRA strength"))
    lora: list[str] = field(default_factory=list, metadata=_h(
        "third-party LoRA FILE[:STRENGTH] stacked on the checkpoint (diffusers, ComfyUI, kohya, DiffSynth or "
        "Lightning layout; strength 1 when omitted)"))
    mode: Literal["auto", "bridge", "plain"] = field(
        default="auto", metadata=_h("auto = bridge when the checkpoint has an STE, else plain"))
    device: str = field(default="auto", metadata=_h("auto (cuda when available), cuda, cuda:1, cpu"))
    compile: bool = field(default=False, metadata=_h("torch.compile each DiT block (CUDA; the first edit compiles)"))
    fp8: bool = field(default=False, metadata=_h("fp8 matmuls in the DiT blocks (CUDA, Ada/Hopper; approximate)"))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto", metadata=_h("auto = bfloat16 on GPU, float32 on CPU"))
    dit_activation: Literal["auto", "gelu-tanh", "sigmoid-1.702"] = field(default="auto", metadata=_h(
        "DiT MLP activation: auto = the checkpoint's (its metadata; older workspace checkpoints: sigmoid-1.702, "
        "other LoRAs: gelu-tanh), without a checkpoint gelu-tanh (the released model's); or force one"))


@dataclass
class SamplerOptions:
    sampler: Literal["flow", "lbm"] = field(default="flow", metadata=_h("flow matching or latent bridge matching"))
    steps: int = field(default=40, metadata=_h("sampling steps (LBM: 1-4)"))
    cfg: float = field(default=4.0, metadata=_h("classifier-free guidance scale (1 = off)"))
    seed: int = field(default=0, metadata=_h("noise seed (the same for every sample)"))
    blend_alpha: float = field(default=0.0, metadata=_h("background blending outside the mask, 0 = off"))
    max_pixels: int = field(default=1024 * 1024, metadata=_h("inputs are scaled down to at most this many pixels"))
    batch_cfg: bool = field(default=True, metadata=_h("positive and negative prompt in one batched DiT call"))
    schedule: Literal["qwen", "lightning"] = field(default="qwen", metadata=_h(
        "flow sigmas: qwen (dynamic shift) or lightning (shift 3, for Lightning LoRAs)"))
    negative_prompt: str = field(default="", metadata=_h("negative prompt for CFG"))


@dataclass
class RunOptions:
    out: Path | None = field(default=None, metadata=_h("output folder"))
    overwrite: bool = field(default=False, metadata=_h("redo samples whose outputs already exist"))
    limit: int | None = field(default=None, metadata=_h("only the first N dataset entries"))
    progress: bool = field(default=True, metadata=_h("tqdm progress bar"))


@dataclass
class EditInputs:
    dataset: Path | None = field(default=None, metadata=_h("dataset JSON/JSONL (see DESIGN.md)"))
    base_path: Path | None = field(default=None, metadata=_h("folder relative dataset paths start from"))
    image: Path | None = field(default=None, metadata=_h("single mode: the image to edit"))
    mask: Path | None = field(default=None, metadata=_h("single mode: mask, white = region to edit"))
    prompt: str | None = field(default=None, metadata=_h("single mode: the edit instruction"))
    references: list[Path] = field(default_factory=list, metadata=_h("single mode: extra reference images (a,b)"))
    id: str | None = field(default=None, metadata=_h("single mode: output name (default: the image's stem)"))


@dataclass
class EditConfig(RunOptions, SamplerOptions, ModelOptions, EditInputs):
    """Edit a dataset JSON (every entry's edit_image[0] with its prompt and back_mask) or a single image."""

    def validate(self) -> None:
        _validate_common(self)
        if self.dataset is not None and self.image is not None:
            raise ConfigError("give either --dataset or --image, not both")
        if self.dataset is None and self.image is None:
            raise ConfigError("give --dataset FILE.json or --image IMG --prompt TEXT")
        if self.image is not None and self.prompt is None:
            raise ConfigError("--image needs --prompt")
        if self.dataset is None and (self.base_path is not None or self.limit is not None):
            raise ConfigError("--base-path and --limit apply to --dataset only")
        if self.image is None and (self.mask is not None or self.references or self.id is not None
                                   or self.prompt is not None):
            raise ConfigError("--mask, --prompt, --references and --id apply to --image only")


@dataclass
class EvaluateInputs:
    dataset: Path | None = field(default=None, metadata=_h("dataset JSON/JSONL with targets (`image`)"))
    base_path: Path | None = field(default=None, metadata=_h("folder relative dataset paths start from"))
    grid_rows: int = field(default=16, metadata=_h("samples shown in grid.png (0 = no grid)"))
    grid_cell: int = field(default=256, metadata=_h("grid cell size in pixels"))
    lpips: bool = field(default=True, metadata=_h("LPIPS when the lpips package and its weights are local"))
    references: bool = field(default=True, metadata=_h(
        "reference rows: the identity edit (source unchanged) and the VAE round trip of the target (loads the VAE)"))


@dataclass
class EvaluateConfig(RunOptions, SamplerOptions, ModelOptions, EvaluateInputs):
    """Edit every entry of a dataset JSON and score the outputs against the targets (metrics.csv/json, grid.png)."""

    def validate(self) -> None:
        _validate_common(self)
        if self.dataset is None:
            raise ConfigError("evaluate needs --dataset FILE.json")
        if self.grid_rows < 0 or self.grid_cell < 16:
            raise ConfigError("--grid-rows must be >= 0 and --grid-cell >= 16")


@dataclass
class TinyModelConfig:
    """Write the tiny random Qwen-Image-Edit model tree (for tests, the quickstart and the demo)."""

    out: Path | None = field(default=None, metadata=_h("output folder (use it as --model-root)"))
    seed: int = field(default=0, metadata=_h("initialisation seed"))

    def validate(self) -> None:
        if self.out is None:
            raise ConfigError("tiny-model needs --out DIR")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a folder")


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`FILE[:STRENGTH]` -> (path, strength); a suffix that is not a number is part of the file name."""
    text = str(spec).strip()
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def _validate_loras(specs) -> None:
    import math

    for spec in specs:
        path, strength = parse_lora_spec(spec)
        if not math.isfinite(strength):
            raise ConfigError(f"--lora {spec}: the strength must be a finite number")
        if path.suffix != ".safetensors":
            raise ConfigError(f"--lora {spec}: only .safetensors LoRA files are read")
        if not path.is_file():
            raise ConfigError(f"--lora {spec}: no such file {path}")


def _validate_common(cfg) -> None:
    from ..variants import get_variant

    try:
        cfg.variant = get_variant(cfg.variant).name
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.out is None:
        raise ConfigError("--out DIR is required")
    from .editor import EditInputError

    try:
        settings_from(cfg).validate()
    except EditInputError as e:
        raise ConfigError(str(e)) from None
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError("--limit must be at least 1")
    _validate_loras(cfg.lora)


# ---- building blocks -----------------------------------------------------------------------------------------------
def settings_from(cfg: SamplerOptions):
    from .editor import EditSettings

    return EditSettings(sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg, seed=cfg.seed,
                        blend_alpha=cfg.blend_alpha, max_pixels=cfg.max_pixels, batch_cfg=cfg.batch_cfg,
                        schedule=cfg.schedule)


def sources_from(cfg: ModelOptions):
    return cfg.model_sources(cfg.variant)


def resolve_device(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but no CUDA device is available (use --device cpu)")
    if dtype == "auto":
        dtype = "float32" if device.startswith("cpu") else "bfloat16"
    return device, getattr(torch, dtype)


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
        editor.speed_up(compile_blocks=cfg.compile, fp8=cfg.fp8)
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


def _write_run_info(out_dir: Path, cfg, command: str) -> None:
    import diffsynth_edit
    from ..atomic import atomic_write_json

    try:
        from importlib.metadata import version

        ds_version = version("diffsynth")
    except Exception:  # noqa: BLE001
        ds_version = None
    atomic_write_json(out_dir / "run.json", {"command": command, "config": config_to_dict(cfg),
                                             "diffsynth": ds_version, "diffsynth_edit": diffsynth_edit.__version__})


# ---- commands ------------------------------------------------------------------------------------------------------
def run_edit(cfg: EditConfig, log=print) -> int:
    out_dir = Path(cfg.out)
    if cfg.dataset is not None:
        jobs = jobs_from_dataset(cfg.dataset, cfg.base_path, cfg.limit)
    else:
        jobs = [Job(name=safe_name(cfg.id or Path(cfg.image).stem), prompt=cfg.prompt, source=Path(cfg.image),
                    references=list(cfg.references), mask=cfg.mask, ident=cfg.id or Path(cfg.image).stem)]
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_run_info(out_dir, cfg, "edit")
    edited, skipped, failures = edit_jobs(cfg, jobs, out_dir, log=log)
    log(f"edited {edited}, skipped {skipped}, failed {len(failures)} of {len(jobs)}; outputs in {out_dir}")
    return 1 if failures else 0


def evaluate_outputs(cfg: EvaluateConfig, jobs: list[Job], out_dir: Path, image_dir: Path, log=print
                     ) -> dict[str, Any]:
    """Score existing outputs against the targets; writes metrics.csv, metrics.json and grid.png."""
    from PIL import Image

    from .editor import to_rgb
    from .eval_reference import REFERENCE_METRICS, psnr_table, reference_metrics, tile_caption, vae_roundtrip
    from .evaluate import (PIXEL_METRICS, PSNR_CAP_DB, LPIPSScorer, SampleEvaluation, align_to_output,
                           comparison_grid, lpips_status, mean_metrics, region_metrics, save_png, write_metrics)

    lpips_ok, lpips_reason = lpips_status() if cfg.lpips else (False, "disabled with --lpips false")
    scorer = None
    if lpips_ok:
        device, _ = resolve_device(cfg.device, "float32")
        try:
            scorer = LPIPSScorer(device=device)
        except Exception as e:  # noqa: BLE001 - a broken optional metric must not stop the evaluation
            lpips_ok, lpips_reason = False, f"lpips failed to load: {e}"
    keys = list(PIXEL_METRICS) + (["lpips", "lpips_in"] if lpips_ok else [])
    vae_pipe = None
    if cfg.references:
        from ..loading import load_pipeline

        keys += REFERENCE_METRICS
        device, dtype = resolve_device(cfg.device, cfg.dtype)
        vae_pipe = load_pipeline(sources_from(cfg), components=("vae",), device=device, torch_dtype=dtype)
    results: list[SampleEvaluation] = []
    grid_rows, grid_captions = [], []
    for job in jobs:
        ev = SampleEvaluation(id=job.ident or job.name, index=job.index)
        image_path, sub_path, _ = job.outputs(image_dir)
        try:
            if not image_path.is_file():
                raise ValueError(f"no output image {image_path}")
            if job.target is None:
                raise ValueError("no target image")
            output = open_image(image_path, "output").convert("RGB")
            target_full = to_rgb(open_image(job.target, "target image"), "target image")
            mask = None if job.mask is None else open_image(job.mask, "mask")
            target, binary, notes = align_to_output(output, target_full, mask)
            ev.notes += notes
            ev.metrics = region_metrics(output, target, binary)
            if cfg.references:
                source = to_rgb(open_image(job.source, "source image"), "source image")
                ev.metrics.update(reference_metrics(source, target, binary, vae_roundtrip(vae_pipe, target)))
            if scorer is not None:
                ev.metrics["lpips"] = scorer(output, target)
                ev.metrics["lpips_in"] = None
                if binary is not None and binary.any():
                    import numpy as np

                    m = binary[..., None]
                    ev.metrics["lpips_in"] = scorer(Image.fromarray(np.asarray(output) * m),
                                                    Image.fromarray(np.asarray(target) * m))
            if len(grid_rows) < cfg.grid_rows:
                sub = open_image(sub_path, "sub image").convert("RGB") if sub_path.is_file() else None
                source = to_rgb(open_image(job.source, "source image"), "source image")
                grid_rows.append([source, target_full, output, sub])
                grid_captions.append([None, None, tile_caption(ev.metrics), None])
        except ValueError as e:
            ev.error = str(e)
            log(f"error: evaluating {ev.id}: {e}")
        results.append(ev)
    rows = [r.row() for r in results]
    ok = [r for r in results if r.error is None]
    summary = {
        "dataset": str(cfg.dataset), "count": len(results), "evaluated": len(ok),
        "failed": [r.id for r in results if r.error is not None],
        "lpips": lpips_reason if lpips_ok else f"unavailable ({lpips_reason})",
        "psnr_cap_db": PSNR_CAP_DB,
        "mean": mean_metrics([r.metrics for r in ok], keys + ["mask_fraction"]),
        "settings": config_to_dict(cfg),
    }
    summary["psnr"] = psnr_table(summary["mean"])  # edit / identity / vae rows, each {all, in, out}
    columns = ["id", "index", *keys, "mask_fraction", "error", "notes"]
    write_metrics(out_dir, rows, columns, summary)
    if grid_rows:
        save_png(comparison_grid(grid_rows, cell=cfg.grid_cell, captions=grid_captions), out_dir / "grid.png")
    return summary


def run_evaluate(cfg: EvaluateConfig, log=print) -> int:
    out_dir = Path(cfg.out)
    image_dir = out_dir / "images"
    jobs = jobs_from_dataset(cfg.dataset, cfg.base_path, cfg.limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_run_info(out_dir, cfg, "evaluate")
    edited, skipped, failures = edit_jobs(cfg, jobs, image_dir, log=log)
    summary = evaluate_outputs(cfg, jobs, out_dir, image_dir, log=log)
    mean = summary["mean"]

    def fmt(k):
        v = mean.get(k)
        return "n/a" if v is None else f"{v:.4f}"

    from .eval_reference import format_table

    log(f"evaluated {summary['evaluated']} of {summary['count']} (edited {edited}, reused {skipped}); "
        f"PSNR {fmt('psnr')} dB, MSE {fmt('mse')}, MAE in/out {fmt('mae_in')}/{fmt('mae_out')}; "
        f"lpips: {summary['lpips']}; wrote {out_dir / 'metrics.csv'}, {out_dir / 'metrics.json'}")
    log(format_table(summary["psnr"]) if cfg.references else
        f"PSNR in/out of the mask (dB): edit {fmt('psnr_in')}/{fmt('psnr_out')} (no references: --references false)")
    return 1 if failures or summary["failed"] else 0


def run_tiny_model(cfg: TinyModelConfig, log=print) -> int:
    from ..tiny import write_tiny_model

    root = write_tiny_model(cfg.out, seed=cfg.seed)
    log(f"tiny model in {root}; use it with --model-root {root}")
    return 0


COMMANDS = {
    "edit": (EditConfig, run_edit),
    "evaluate": (EvaluateConfig, run_evaluate),
    "tiny-model": (TinyModelConfig, run_tiny_model),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    cls, run = COMMANDS[command]
    cfg = parse_config(cls, rest, prog=f"edit_images.py {command}", section=command.replace("-", "_"),
                       description=(cls.__doc__ or "").strip())
    from ..checkpoint import CheckpointError
    from ..loading import MissingWeightsError

    try:
        return run(cfg)
    except (ConfigError, CheckpointError, MissingWeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # dataset format errors name the file, entry and key
        print(f"error: {e}", file=sys.stderr)
        return 2
