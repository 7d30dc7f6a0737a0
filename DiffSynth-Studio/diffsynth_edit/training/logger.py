"""Run logging: CSV (always), wandb (online with a key, offline otherwise), a loss-curve PNG at the end."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_path

COLUMNS = ["step", "loss", "loss_main", "loss_sub", "lr", "grad_norm", "samples_per_s", "peak_mem_gib"]


class RunLogger:
    def __init__(self, run_dir: Path, config: dict[str, Any], use_wandb: bool, enabled: bool = True,
                 resume: bool = False, resume_step: int = 0):
        """`resume`: keep metrics.csv's rows up to `resume_step` (the steps after it are trained again; a row cut
        by a crash is dropped too)."""
        self.enabled = enabled
        self.csv_path = Path(run_dir) / "metrics.csv"
        self.wandb = None
        if not enabled:
            return
        kept = self._rows_up_to(resume_step) if resume and self.csv_path.exists() else []
        with atomic_path(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([COLUMNS, *kept])
        if use_wandb:
            try:
                import wandb

                if not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").exists():
                    os.environ.setdefault("WANDB_MODE", "offline")
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "qwen-image"),
                                        name=os.environ.get("WANDB_NAME") or config.get("run_name"),
                                        dir=str(run_dir), config=config, resume="allow")
            except Exception as e:  # logging must never kill a run
                print(f"[train] wandb disabled: {e}")

    def _rows_up_to(self, step: int) -> list[list[str]]:
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        return [r for r in rows if len(r) == len(COLUMNS) and r[0].isdigit() and int(r[0]) <= step]

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([step] + [values.get(c, "") for c in COLUMNS[1:]])
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_wandb(self, step: int, values: dict[str, float], prefix: str) -> None:
        """Values that are not metrics.csv columns (e.g. the validation PSNR, kept in eval_metrics.csv): wandb only."""
        if self.enabled and self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> Path | None:
        if not self.enabled:
            return None
        out = plot_loss_curve(self.csv_path, self.csv_path.with_name("loss_curve.png"))
        if self.wandb is not None:
            if out is not None:
                self.log_image(self._last_step(), "loss_curve", out)
            self.wandb.finish()
        return out

    def _last_step(self) -> int:
        rows = read_metrics(self.csv_path)
        return int(rows[-1]["step"]) if rows else 0


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_loss_curve(csv_path: Path, out: Path) -> Path | None:
    rows = [r for r in read_metrics(csv_path) if r.get("loss")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "loss_main", "loss_sub"):
        vals = [float(r[key]) for r in rows if r.get(key)]
        if len(vals) == len(steps):
            ax.plot(steps, vals, label=key, lw=1.2 if key == "loss" else 0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    return save_figure(fig, ax, out)


def save_figure(fig, ax, out: Path) -> Path:
    """Legend, grid, tight layout; written atomically as PNG; the figure closed."""
    import matplotlib.pyplot as plt

    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
