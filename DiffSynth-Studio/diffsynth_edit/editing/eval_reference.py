"""Reference rows of an evaluation: what the model's PSNR is judged against, on the same samples and regions.

- identity edit: the source returned unchanged (the floor inside the mask; exact outside it when the dataset's
  background is untouched);
- VAE round trip: the target encoded and decoded by the model's own VAE (the ceiling a latent model can reach).
Both are compared with the target exactly as the edit is (same size, same mask), so the three rows line up.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from .evaluate import region_metrics

REFERENCES = ("identity", "vae")  # metric prefixes: identity_psnr_in, vae_psnr_out, ...
REFERENCE_METRICS = tuple(f"{ref}_psnr{r}" for ref in REFERENCES for r in ("", "_in", "_out"))
ROWS = {"edit": "", "identity": "identity_", "vae": "vae_"}  # summary row -> metric prefix
LABELS = {"edit": "edit", "identity": "identity edit", "vae": "VAE round trip"}


def vae_roundtrip(pipe, image: Image.Image) -> Image.Image:
    """`image` encoded and decoded by `pipe.vae` (at its own size, a multiple of 16 as the editor's outputs are)."""
    from ..encoding import vae_decode, vae_encode

    return vae_decode(pipe, vae_encode(pipe, [image.convert("RGB")])[0])[0]


def reference_metrics(source: Image.Image, target: Image.Image, mask, roundtrip: Image.Image | None
                      ) -> dict[str, float | None]:
    """identity_psnr{,_in,_out} (source vs target) and vae_psnr{,_in,_out} (round trip vs target; None without a
    VAE). `target` and `mask` are already aligned to the output (`evaluate.align_to_output`); the source is resized
    to the target's size when it differs (LANCZOS, as the editor fits its input)."""
    if source.size != target.size:
        source = source.convert("RGB").resize(target.size, Image.LANCZOS)
    out: dict[str, float | None] = {}
    for prefix, image in (("identity_", source), ("vae_", roundtrip)):
        m = region_metrics(image, target, mask) if image is not None else {}
        for r in ("", "_in", "_out"):
            out[f"{prefix}psnr{r}"] = m.get(f"psnr{r}")
    return out


def psnr_table(mean: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{"edit" | "identity" | "vae": {"all", "in", "out"}} from an evaluation's mean metrics."""
    return {row: {"all": mean.get(f"{p}psnr"), "in": mean.get(f"{p}psnr_in"), "out": mean.get(f"{p}psnr_out")}
            for row, p in ROWS.items()}


def format_table(table: dict[str, dict[str, float | None]]) -> str:
    """One line: `PSNR in/out of the mask: edit 31.20/35.90 dB, identity edit 5.30/100.00, VAE round trip ...`."""
    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    parts = [f"{LABELS[row]} {f(v['in'])}/{f(v['out'])}" for row, v in table.items()]
    return "PSNR in/out of the mask (dB): " + ", ".join(parts)


def tile_caption(metrics: dict[str, float | None]) -> str:
    """The text under an output tile of the grid: `in 31.2 / out 35.9 dB`."""
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    return f"in {f(metrics.get('psnr_in'))} / out {f(metrics.get('psnr_out'))} dB"
