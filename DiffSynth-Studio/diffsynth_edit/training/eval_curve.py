"""The evaluation curve of a run: PSNR of the validation edits inside / outside the mask at each validation step
(`eval_metrics.csv` and `eval_curve.png` in the run folder), so learning shows over time, beside the identity edit.

Validation works from the cache, so PSNR here is measured against the target's VAE round trip (the decoded cached
target latents), i.e. in what the latent model can reach; `edit_images.py evaluate` measures against the real
target files and reports the round trip's own PSNR beside it.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_path
from ..editing.evaluate import mean_metrics, region_metrics
from .logger import save_figure

COLUMNS = ["step", "psnr", "psnr_in", "psnr_out", "identity_psnr_in", "identity_psnr_out", "samples"]


def latent_mask(mask_latent, size: tuple[int, int]) -> np.ndarray | None:
    """The cached mask ([1, h, w] at latent resolution, area fractions) as an H×W bool at pixel size `size`
    (w, h): latent cells at least half covered, nearest-upsampled. None when it covers everything (no mask)."""
    m = np.asarray(mask_latent, dtype=np.float32).reshape(mask_latent.shape[-2:]) >= 0.5
    if m.all():
        return None
    w, h = size
    return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def sample_metrics(source: Image.Image, target: Image.Image, output: Image.Image, mask: np.ndarray | None) -> dict:
    row = region_metrics(output, target, mask)
    ident = region_metrics(source, target, mask)
    return {"psnr": row["psnr"], "psnr_in": row["psnr_in"], "psnr_out": row["psnr_out"],
            "identity_psnr_in": ident["psnr_in"], "identity_psnr_out": ident["psnr_out"]}


def mean_row(rows: list[dict]) -> dict:
    return mean_metrics(rows, COLUMNS[1:-1]) | {"samples": len(rows)}


def record(run_dir: Path, step: int, values: dict) -> Path:
    """Add the row of `step` to eval_metrics.csv (rows at or after `step`, left by a resumed run, are replaced),
    then redraw eval_curve.png. Returns the PNG's path."""
    csv_path = Path(run_dir) / "eval_metrics.csv"
    rows = []
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) < step]
    rows.append({"step": step, **{k: values.get(k) for k in COLUMNS[1:]}})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buf.getvalue())
    return plot_eval_curve(csv_path, csv_path.with_name("eval_curve.png"))


def plot_eval_curve(csv_path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"psnr_in": ("edit, inside the mask", "tab:red", "-"), "psnr_out": ("edit, outside", "tab:blue", "-"),
              "identity_psnr_in": ("identity edit, inside", "tab:red", ":")}
    for key, (label, colour, ls) in styles.items():
        pts = [(s, float(r[key])) for s, r in zip(steps, rows) if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), ls, color=colour, marker="o", ms=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("PSNR vs the target's VAE round trip (dB)")
    ax.set_title("validation edits")
    return save_figure(fig, ax, out)
