"""Validation during training: the editor's own sampler on held-out cached samples, saved as an image grid."""
from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import atomic_path
from ..cache.store import CachedSample, open_cache
from ..editing.editor import Editor
from ..editing.request import EditSettings, PreparedEdit
from ..encoding import vae_decode
from ..geometry import Box
from ..imagegrid import make_grid
from .config import TrainConfig


def prepared_from_cache(pipe, s: CachedSample) -> PreparedEdit:
    """An editor input from a cache entry (no text encoder needed); the source image is decoded when a VAE is
    loaded, else a placeholder of the right size (sampling only needs its size)."""
    from PIL import Image

    dev, dt = pipe.device, pipe.torch_dtype
    edit = [e[None].to(dev, dt) for e in s.edit_latents]
    h, w = s.size
    source = vae_decode(pipe, edit[0])[0] if pipe.vae is not None else Image.new("RGB", (w, h), "white")
    return PreparedEdit(source=source, references=[], mask=None, box=Box.from_subyx(s.subyx.tolist()),
                        edit_latents=edit, prompt_emb=s.prompt_emb[None].to(dev, dt),
                        prompt_mask=s.prompt_emb_mask[None].long().to(dev),
                        nega_emb=s.nega_prompt_emb[None].to(dev, dt), nega_mask=s.nega_prompt_emb_mask[None].long().to(dev),
                        mask_latent=s.mask_latent[None].to(dev))


@torch.no_grad()
def validate(pipe, dit, ste, cfg: TrainConfig, variant: str, out: Path | None) -> tuple[Path | None, dict]:
    """Grid rows: source | target | output | sub output, written to `out` (None: sample only, as the other ranks do
    under ZeRO-3), and the mean PSNR of the outputs in/out of the mask (`eval_curve.mean_row`). The caller switched
    the model to its eval view."""
    from .eval_curve import latent_mask, mean_row, sample_metrics

    index = open_cache(cfg.val_cache_dir)
    editor = Editor(pipe, variant=variant, ste=ste, mode="bridge" if ste is not None else "plain")
    settings = (EditSettings(sampler="lbm", steps=min(4, cfg.val_steps), cfg_scale=1.0) if cfg.objective == "lbm"
                else EditSettings(sampler="flow", steps=cfg.val_steps, cfg_scale=cfg.val_cfg))
    rows, metrics = [], []
    for i in range(min(cfg.val_samples, len(index))):
        s = index.load(i)
        prep = prepared_from_cache(pipe, s)
        x, x_sub = editor.sample(prep, settings)
        target = vae_decode(pipe, s.input_latents[None].to(pipe.device, pipe.torch_dtype))[0]
        output = vae_decode(pipe, x)[0]
        rows.append([prep.source, target, output, vae_decode(pipe, x_sub)[0] if x_sub is not None else None])
        metrics.append(sample_metrics(prep.source, target, output, latent_mask(s.mask_latent, output.size)))
    if out is None:
        return None, mean_row(metrics)
    grid = make_grid(rows, labels=["source", "target", "output", "sub"])
    with atomic_path(out) as tmp:
        grid.save(tmp, format="PNG")
    return out, mean_row(metrics)
