"""Evaluation metrics and the comparison grid for edited images.

Pixel metrics are computed on RGB values scaled to [0, 1], averaged over pixels and channels:
    MSE = mean((out − tgt)²),  MAE = mean(|out − tgt|),  PSNR = 10·log10(1 / MSE) dB.
Identical images (MSE = 0) have an infinite PSNR; it is reported as the cap `PSNR_CAP_DB` (100 dB) so that every
value and every mean stays a finite JSON number.

Regions: "in" is the binarised `back_mask` (> 127, white = edited region), "out" its complement, no suffix the whole
image. Without a mask the whole image counts as "in" and the "out" metrics are empty (None / blank CSV cell). The
target (and the mask) are compared at the output's resolution: the editor's output is the source scaled to at most
`max_pixels` with 16-aligned sides, so the target is resized to it (LANCZOS; the mask NEAREST), never padded.

LPIPS (AlexNet) is computed only when the `lpips` package and both weight files (lpips' own linear layers and
torchvision's AlexNet checkpoint in the torch hub cache) are present locally; nothing is ever downloaded. Otherwise
the summary records `"lpips": "unavailable (<reason>)"` and the run goes on.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..atomic import atomic_path, atomic_write_json
from ..geometry import binarize_mask

PSNR_CAP_DB = 100.0
REGIONS = ("", "_in", "_out")
PIXEL_METRICS = tuple(f"{m}{r}" for r in REGIONS for m in ("mse", "mae", "psnr"))
ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"


# ---- pixel metrics -------------------------------------------------------------------------------------------------
def to_unit_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """H×W×3 float64 in [0, 1] (uint8 arrays are divided by 255; float arrays are taken as already in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return arr


def _region(diff: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    if mask is None:
        return diff
    if not mask.any():
        return None
    return diff[mask]


def mse(a, b, mask: np.ndarray | None = None) -> float | None:
    """Mean squared error in [0, 1] units over the pixels where `mask` (H×W bool) is True; None for an empty region."""
    d = _region(to_unit_array(a) - to_unit_array(b), mask)
    return None if d is None else float(np.mean(d ** 2))


def mae(a, b, mask: np.ndarray | None = None) -> float | None:
    d = _region(to_unit_array(a) - to_unit_array(b), mask)
    return None if d is None else float(np.mean(np.abs(d)))


def psnr_from_mse(value: float | None, cap: float = PSNR_CAP_DB) -> float | None:
    """10·log10(1/MSE) for a peak of 1.0, capped at `cap` dB (MSE 0 → cap)."""
    if value is None:
        return None
    if value <= 0:
        return cap
    return min(cap, 10.0 * math.log10(1.0 / value))


def psnr(a, b, mask: np.ndarray | None = None, cap: float = PSNR_CAP_DB) -> float | None:
    return psnr_from_mse(mse(a, b, mask), cap)


def region_metrics(output, target, mask: np.ndarray | None) -> dict[str, float | None]:
    """mse/mae/psnr on the whole image, inside the mask (`_in`) and outside (`_out`), plus `mask_fraction`.

    `mask` is H×W bool (True = edited region) or None (whole image = inside; outside metrics None).
    """
    out_a, tgt_a = to_unit_array(output), to_unit_array(target)
    if out_a.shape != tgt_a.shape:
        raise ValueError(f"output {out_a.shape[1]}x{out_a.shape[0]} and target {tgt_a.shape[1]}x{tgt_a.shape[0]} "
                         f"differ in size; align them first (align_to_output)")
    diff = out_a - tgt_a
    regions = {"": np.ones(diff.shape[:2], dtype=bool), "_in": None, "_out": None}
    if mask is None:
        regions["_in"] = regions[""]
    else:
        if mask.shape != diff.shape[:2]:
            raise ValueError(f"mask {mask.shape[1]}x{mask.shape[0]} does not match the image "
                             f"{diff.shape[1]}x{diff.shape[0]}")
        regions["_in"], regions["_out"] = mask, ~mask
    row: dict[str, float | None] = {}
    for suffix, m in regions.items():
        d = None if m is None or not m.any() else diff[m]
        row[f"mse{suffix}"] = None if d is None else float(np.mean(d ** 2))
        row[f"mae{suffix}"] = None if d is None else float(np.mean(np.abs(d)))
        row[f"psnr{suffix}"] = psnr_from_mse(row[f"mse{suffix}"])
    row["mask_fraction"] = 1.0 if mask is None else float(mask.mean())
    return row


def align_to_output(output: Image.Image, target: Image.Image, mask: Image.Image | None
                    ) -> tuple[Image.Image, np.ndarray | None, list[str]]:
    """Target resized to the output's size (LANCZOS), mask binarised (> 127) at that size (NEAREST)."""
    notes = []
    target = target.convert("RGB")
    if target.size != output.size:
        notes.append(f"target resized from {target.width}x{target.height} to {output.width}x{output.height}")
        target = target.resize(output.size, Image.LANCZOS)
    binary = None
    if mask is not None:
        if mask.mode not in ("L", "1"):
            mask = mask.convert("L")
        if mask.size != output.size:
            mask = mask.resize(output.size, Image.NEAREST)
        binary = binarize_mask(mask)
    return target, binary, notes


# ---- LPIPS ---------------------------------------------------------------------------------------------------------
def lpips_status(net: str = "alex") -> tuple[bool, str]:
    """(available, reason). Never downloads: the package and both weight files must already be on disk."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or spec.origin is None:
        return False, "the lpips package is not installed"
    lin = Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth"
    if not lin.is_file():
        return False, f"lpips linear weights not found at {lin}"
    if net == "alex":
        import torch

        backbone = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT
        if not backbone.is_file():
            return False, f"torchvision AlexNet weights not found at {backbone}"
    else:
        return False, f"only the alex backbone is supported offline (got {net!r})"
    return True, f"lpips {net}"


class LPIPSScorer:
    """LPIPS distance between two RGB images (optionally inside a mask: pixels outside are set to black in both)."""

    def __init__(self, device: str = "cpu", net: str = "alex"):
        import lpips  # noqa: PLC0415
        import torch

        self.torch = torch
        self.device = device
        self.model = lpips.LPIPS(net=net, verbose=False).to(device).eval()

    def __call__(self, a: Image.Image, b: Image.Image) -> float:
        torch = self.torch

        def tensor(im):
            x = torch.from_numpy(to_unit_array(im)).float().permute(2, 0, 1)[None]
            return (x * 2 - 1).to(self.device)

        with torch.no_grad():
            return float(self.model(tensor(a), tensor(b)).mean())


# ---- aggregation and files -----------------------------------------------------------------------------------------
def mean_metrics(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, float | None]:
    """Mean of each key over the rows where it is a finite number (None when no row has it)."""
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.8g}"
    return v


def write_metrics(out_dir: Path | str, rows: Sequence[dict[str, Any]], columns: Sequence[str],
                  summary: dict[str, Any]) -> tuple[Path, Path]:
    """`metrics.csv` (one row per sample, then a `mean` row) and `metrics.json` (summary + samples), atomically."""
    out_dir = Path(out_dir)
    csv_path, json_path = out_dir / "metrics.csv", out_dir / "metrics.json"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_cell(r.get(k)) for k in columns})
    mean_row = {"id": "mean", **summary.get("mean", {})}
    writer.writerow({k: _csv_cell(mean_row.get(k)) for k in columns})
    with atomic_path(csv_path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    atomic_write_json(json_path, {**summary, "samples": list(rows)})
    return csv_path, json_path


def comparison_grid(rows: Sequence[Sequence[Image.Image | None]], cell: int = 256,
                    labels: Sequence[str] = ("source", "target", "output", "sub image"),
                    captions: Sequence[Sequence[str | None]] | None = None) -> Image.Image:
    """Rows of (source | target | output | sub image); a missing image (e.g. no sub image) is a white cell;
    `captions`: text under the cells (the evaluation writes each output's PSNR in/out of the mask)."""
    from ..imagegrid import make_grid

    return make_grid([list(r) for r in rows], labels=list(labels), cell=cell, captions=captions)


def save_png(image: Image.Image, path: Path | str) -> Path:
    """Atomic PNG write."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


@dataclass
class SampleEvaluation:
    """Metrics of one sample; `error` is set (and the metrics absent) when it could not be evaluated."""

    id: str
    index: int
    metrics: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def row(self) -> dict[str, Any]:
        return {"id": self.id, "index": self.index, **self.metrics, "error": self.error or "",
                "notes": "; ".join(self.notes)}
