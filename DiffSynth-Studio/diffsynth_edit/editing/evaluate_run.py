"""`edit_images.py evaluate`: edit every entry of a dataset JSON (reusing outputs made with the same settings), score
the outputs against the targets, and write metrics.csv, metrics.json and grid.png."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from ..config import config_to_dict
from .batch import Job, edit_jobs, jobs_from_dataset, open_image, write_run_info
from .eval_reference import REFERENCE_METRICS, format_table, psnr_table, reference_metrics, tile_caption, vae_roundtrip
from .evaluate import (PIXEL_METRICS, PSNR_CAP_DB, LPIPSScorer, SampleEvaluation, align_to_output, comparison_grid,
                       lpips_status, mean_metrics, region_metrics, save_png, write_metrics)
from .options import EvaluateConfig, resolve_device, sources_from


def _scorers(cfg: EvaluateConfig) -> tuple[list[str], LPIPSScorer | None, str, Any]:
    """(the metric columns, the LPIPS scorer or None, the LPIPS status line, the VAE pipeline for the reference rows
    or None)."""
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
    status = lpips_reason if lpips_ok else f"unavailable ({lpips_reason})"
    return keys, scorer, status, vae_pipe


def _score(cfg: EvaluateConfig, job: Job, ev: SampleEvaluation, image_dir: Path, scorer: LPIPSScorer | None,
           vae_pipe, grid_row: bool) -> tuple[list, list] | None:
    """Fills `ev` with one sample's metrics and notes; returns its grid row and captions when `grid_row`. Raises
    ValueError for a missing or undecodable file (what `ev` got before stays)."""
    from .editor import to_rgb  # torch: only once there is something to score

    image_path, sub_path, _ = job.outputs(image_dir)
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
    if not grid_row:
        return None
    sub = open_image(sub_path, "sub image").convert("RGB") if sub_path.is_file() else None
    source = to_rgb(open_image(job.source, "source image"), "source image")
    return [source, target_full, output, sub], [None, None, tile_caption(ev.metrics), None]


def evaluate_outputs(cfg: EvaluateConfig, jobs: list[Job], out_dir: Path, image_dir: Path, log=print
                     ) -> dict[str, Any]:
    """Score existing outputs against the targets; writes metrics.csv, metrics.json and grid.png."""
    keys, scorer, lpips_line, vae_pipe = _scorers(cfg)
    results: list[SampleEvaluation] = []
    grid_rows, grid_captions = [], []
    for job in jobs:
        ev = SampleEvaluation(id=job.ident or job.name, index=job.index)
        try:
            tile = _score(cfg, job, ev, image_dir, scorer, vae_pipe, len(grid_rows) < cfg.grid_rows)
        except ValueError as e:
            ev.error = str(e)
            log(f"error: evaluating {ev.id}: {e}")
        else:
            if tile is not None:
                grid_rows.append(tile[0])
                grid_captions.append(tile[1])
        results.append(ev)
    rows = [r.row() for r in results]
    ok = [r for r in results if r.error is None]
    summary = {
        "dataset": str(cfg.dataset), "count": len(results), "evaluated": len(ok),
        "failed": [r.id for r in results if r.error is not None],
        "lpips": lpips_line,
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
    write_run_info(out_dir, cfg, "evaluate")
    edited, skipped, failures = edit_jobs(cfg, jobs, image_dir, log=log)
    summary = evaluate_outputs(cfg, jobs, out_dir, image_dir, log=log)
    mean = summary["mean"]

    def fmt(k):
        v = mean.get(k)
        return "n/a" if v is None else f"{v:.4f}"

    log(f"evaluated {summary['evaluated']} of {summary['count']} (edited {edited}, reused {skipped}); "
        f"PSNR {fmt('psnr')} dB, MSE {fmt('mse')}, MAE in/out {fmt('mae_in')}/{fmt('mae_out')}; "
        f"lpips: {summary['lpips']}; wrote {out_dir / 'metrics.csv'}, {out_dir / 'metrics.json'}")
    log(format_table(summary["psnr"]) if cfg.references else
        f"PSNR in/out of the mask (dB): edit {fmt('psnr_in')}/{fmt('psnr_out')} (no references: --references false)")
    return 1 if failures or summary["failed"] else 0
