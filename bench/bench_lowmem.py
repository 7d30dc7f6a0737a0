#!/usr/bin/env python
"""The low-memory tier (fp8 base + swapped blocks) on the full-size 2511 DiT (random weights), under hard memory caps.

    python bench/bench_lowmem.py          # GPU: 1024² target + one 1024² reference, 256 text tokens
    python bench/bench_lowmem.py --tiny   # CPU smoke test (no caps); --tiny --device cuda: the CUDA paths in seconds

In one process, on the same batch and the same LoRA initialisation (seeded):
  (1) bf16, full memory: plain, LoRA r32 on the 12 upstream targets, AdamW, fp32 LoRA   (the reference of 3)
  (2) bf16, full memory: bridge default (512² sub + STE, r512, 17 targets, Prodigy, bf16 trainables) (ref. of 4)
  then the frozen blocks go to fp8 in place, and
  (3) configs/train_2511_24g.toml's tier: (1) with fp8 base + --swap-24 swapped blocks, under a 24 GiB cap
  (4) configs/train_2511_48g.toml's tier: (2) with fp8 base + --swap-48 swapped blocks, under a 48 GiB cap
  (5) a whole edit through the `Editor` (full-size text encoder and VAE, random weights): text encoder with --swap-te
      of its 28 layers swapped, VAE, the fp8 DiT with --swap-edit swapped blocks, --edit-steps CFG steps, under a
      24 GiB cap; (6) its `prepare` alone (text encoder + VAE encode: phase 1's work per sample, batch 1)
The cap is `torch.cuda.set_per_process_memory_fraction(cap / total)`: the caching allocator raises out-of-memory
instead of growing past it. Reported: max_memory_allocated, median s/step of --repeats steps after --warmup, and
the losses of the first steps of (3)/(4) against (1)/(2) (what fp8 costs in accuracy; swapping changes no number).
Writes $OUT/lowmem.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from harness import build_full_dit, build_tiny_dit, strip_lora, sync, write_report

GIB = 2 ** 30


def make_batch(device, dtype, tiny):
    from diffsynth_edit.training.losses import NoisedBatch

    size, sub, text_dim = (64, 32, 64) if tiny else (1024, 512, 3584)
    g = torch.Generator().manual_seed(0)
    lat = lambda h, w: torch.randn(1, 16, h // 8, w // 8, generator=g).to(device, dtype)  # noqa: E731
    x0, edit, sub0 = lat(size, size), lat(size, size), lat(sub, sub)
    noise, sub_noise = lat(size, size), lat(sub, sub)
    emb = (torch.randn(1, 256, text_dim, generator=g) * 0.5).to(device, dtype)
    mask = torch.ones(1, 256, dtype=torch.long, device=device)
    t0 = (sub // 2) // 16
    subyx = torch.tensor([[t0, t0 + sub // 16, t0, t0 + sub // 16]], device=device)
    batch = {"prompt_emb": emb, "prompt_emb_mask": mask, "edit_latents": [edit], "subyx": subyx, "input_latents": x0}
    sigma = 0.5
    noised = NoisedBatch(latents=((1 - sigma) * x0 + sigma * noise).float(),
                         sub_latents=((1 - sigma) * sub0 + sigma * sub_noise).float(),
                         target=(noise - x0).float(), sub_target=(sub_noise - sub0).float(),
                         timestep=torch.tensor([sigma * 1000], device=device), weight=torch.ones(1, device=device),
                         s=torch.tensor([sigma], device=device))
    return batch, noised, size


def train_case(dit, batch, noised, device, a, mode, rank, targets, optimizer, tdtype):
    """Seeded LoRA (+ STE), `warmup + repeats` optimizer steps on one batch: (median s, peak GiB, losses)."""
    from diffsynth_edit.ste import STE
    from diffsynth_edit.training.build import allow_tf32
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.training.lora import inject_lora
    from diffsynth_edit.training.model import EditTrainModel
    from diffsynth_edit.training.optim import build_optimizer

    allow_tf32(device)  # as the trainer does (the fp32 LoRA's matmuls)
    cfg = TrainConfig(mode=mode, lora_rank=rank, optimizer=optimizer, gradient_checkpointing=True,
                      learning_rate=1e-4 if optimizer == "adamw" else 1.0)
    torch.manual_seed(0)
    params = inject_lora(dit, rank, float(rank), targets, tdtype)
    ste = None
    if mode == "bridge":
        ste = STE.for_dit(dit).to(device=device, dtype=tdtype)
        params += list(ste.parameters())
    model = EditTrainModel(dit, ste, cfg, zero_cond_t=True)
    optim = build_optimizer(cfg, params)
    losses, times = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(a.warmup + a.repeats):
            sync(device)
            t = time.perf_counter()
            loss, _, _ = model(batch, noised)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            losses.append(float(loss))
            sync(device)
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else float("nan")
        return statistics.median(times), peak, losses
    except torch.OutOfMemoryError:
        return float("nan"), float("nan"), losses
    finally:
        del optim, model, params
        strip_lora(dit)
        if device == "cuda":
            torch.cuda.empty_cache()


def edit_cases(dit, device, dtype, a) -> list[tuple]:
    """Whole edits through the `Editor` (text encoder + VAE encode, `edit_steps` CFG steps, VAE decode) of a 1024²
    image with one 1024² reference, for each "DiT blocks:text-encoder layers" swap pair of `--edit-configs`, and
    phase 1's work (`prepare`: text encoder + VAE encode) with the DiT off the card, as the cache runs. Each is run
    once without a cap (its peak) and then timed under the 24 GiB cap. Rows: (label, cap, s, peak GiB)."""
    import tempfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from harness import build_full_pipeline, build_tiny_pipeline

    from diffsynth_edit.block_swap import BlockSwapper
    from diffsynth_edit.editing.editor import Editor, EditRequest, EditSettings
    from diffsynth_edit.low_memory import place_encoders

    BlockSwapper.attach(dit, 0, device)  # every block back on the card
    dit.to("cpu")  # phase 1 holds no DiT
    pipe = (build_tiny_pipeline(Path(tempfile.mkdtemp()), device, dtype) if a.tiny
            else build_full_pipeline(device, dtype))
    pipe.dit = dit
    size = 64 if a.tiny else 1024
    rng = np.random.RandomState(0)
    img, ref = (Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(2))
    request = EditRequest(image=img, prompt="put the cat from picture 2 on the sofa", references=[ref])
    settings = EditSettings(steps=a.edit_steps, cfg_scale=4.0, seed=0)
    rows = []
    configs = [tuple(int(v) for v in c.split(":")) for c in a.edit_configs.split(",")]
    for k, (n_dit, n_te) in enumerate(configs):
        place_encoders(pipe, n_te, device)  # replaces the text encoder's swapper of the previous pair
        editor = Editor(pipe, variant="2511")
        if k == 0:
            _, peak, capped = _uncapped_then_capped(lambda: editor.prepare(request, settings), device)
            rows.append((f"(6) phase 1's work: `prepare` (text encoder with {n_te} of 28 layers swapped + VAE encode "
                         f"of 2 images), no DiT on the card; uncapped peak {peak:.2f} GiB", "24 GiB", *capped))
            dit.to(device)
        BlockSwapper.attach(dit, n_dit, device)
        s, peak, capped = _uncapped_then_capped(lambda: editor.edit(request, settings), device)
        rows.append((f"(5) edit through the Editor: fp8 DiT + {n_dit} swapped blocks, text encoder with {n_te} of 28 "
                     f"layers swapped; {a.edit_steps} CFG steps + encode + decode, s per edit; uncapped: {s:.2f} s, "
                     f"peak {peak:.2f} GiB", "24 GiB", *capped))
    return rows


def _uncapped_then_capped(fn, device) -> tuple[float, float, tuple[float, float]]:
    """(s, peak GiB) of `fn` after a warm-up without a cap, then (s, peak) under 24 GiB (NaN when out of memory)."""
    fn()
    out = []
    for limit in (None, 24):
        cap(device, 1.0e9 if limit is None else limit)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t = time.perf_counter()
        try:
            fn()
            sync(device)
            out.append((time.perf_counter() - t,
                        torch.cuda.max_memory_allocated() / GIB if device == "cuda" else float("nan")))
        except torch.OutOfMemoryError:
            out.append((float("nan"), float("nan")))
    cap(device, 1.0e9)
    return out[0][0], out[0][1], out[1]


def full_memory_cases(dit, batch, noised, device, a, r32, bridge, r512, rows) -> tuple:
    """(1) and (2): the bf16 references of the tiers (their rows appended; returns their results)."""
    ref32 = train_case(dit, batch, noised, device, a, *r32)
    rows.append(("(1) bf16 base, full memory: plain, r32, 12 targets, AdamW, fp32 LoRA", "—", *ref32[:2]))
    ref512 = None
    if not a.skip_48:
        ref512 = train_case(dit, batch, noised, device, a, *bridge)
        rows.append((f"(2) bf16 base, full memory: bridge + STE, r{r512}, 17 targets, Prodigy, bf16", "—",
                     *ref512[:2]))
    return ref32, ref512


def cap(device, gib):
    if device == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--swap-24", type=int, default=20, help="swapped blocks of the 24 GiB tier (the preset's)")
    p.add_argument("--swap-48", type=int, default=20, help="swapped blocks of the 48 GiB tier (the preset's)")
    p.add_argument("--edit-configs", default="12:24,24:24,36:26",
                   help="comma-separated DIT:TE swap pairs for the edits under 24 GiB (DiT blocks : text-encoder layers)")
    p.add_argument("--only-edit", action="store_true", help="skip the training cases (1)-(4)")
    p.add_argument("--skip-edit", action="store_true", help="only the training cases (1)-(4)")
    p.add_argument("--edit-steps", type=int, default=3)
    p.add_argument("--skip-48", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny); --tiny --device cuda smoke-tests "
                   "the CUDA paths (pinned copies, side stream) in seconds")
    a = p.parse_args()
    device = a.device or ("cpu" if a.tiny else "cuda")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if a.tiny:
        a.swap_24 = a.swap_48 = 2
        a.edit_configs = "2:1,1:1"
    dit = build_tiny_dit(device, dtype) if a.tiny else build_full_dit(device, dtype)
    from diffsynth_edit.block_swap import BlockSwapper
    from diffsynth_edit.fp8_base import quantise_frozen_blocks
    from diffsynth_edit.variants import LORA_TARGETS_2511, LORA_TARGETS_UPSTREAM

    batch, noised, size = make_batch(device, dtype, a.tiny)
    r512 = 8 if a.tiny else 512
    r32 = ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", torch.float32)
    bridge = ("bridge", r512, LORA_TARGETS_2511, "prodigy", torch.bfloat16)
    rows, loss_rows = [], []

    if not a.only_edit:
        ref32, ref512 = full_memory_cases(dit, batch, noised, device, a, r32, bridge, r512, rows)
    t = time.perf_counter()
    n = quantise_frozen_blocks(dit)
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"[bench] {n} linears to fp8 in {time.perf_counter() - t:.1f} s")

    def tier(label, spec, n_swap, gib, ref):
        cap(device, 1.0e9)  # lift the cap while blocks move
        t = time.perf_counter()
        BlockSwapper.attach(dit, n_swap, device)
        setup = time.perf_counter() - t
        cap(device, gib)
        med, peak, losses = train_case(dit, batch, noised, device, a, *spec)
        rows.append((f"{label} (swap set-up {setup:.1f} s)", f"{gib} GiB", med, peak))
        k = min(3, len(losses), len(ref[2]))
        loss_rows.append((label, [(ref[2][i], losses[i]) for i in range(k)]))

    if not a.only_edit:
        tier(f"(3) fp8 base + {a.swap_24} swapped blocks: as (1)", r32, a.swap_24, 24, ref32)
        if not a.skip_48:
            tier(f"(4) fp8 base + {a.swap_48} swapped blocks: as (2)", bridge, a.swap_48, 48, ref512)
    cap(device, 1.0e9)
    if not a.skip_edit:
        rows += edit_cases(dit, device, dtype, a)

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [f"Card: {name}; torch {torch.__version__}; {size}² target + one {size}² reference, 256 text tokens, "
             f"gradient checkpointing on every block, batch 1; median of {a.repeats} steps after {a.warmup} warm-ups "
             f"(NaN = out of memory under the cap)", "",
             "| case | cap | s / step | peak GiB (max_memory_allocated) |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {label} | {c} | {med:.3f} | {peak:.2f} |" for label, c, med, peak in rows]
    lines += ["", "Loss of the first optimizer steps, same batch and LoRA init (bf16 base → fp8 base):", "",
              "| tier | step 1 | step 2 | step 3 |", "| --- | --- | --- | --- |"]
    for label, pairs in loss_rows:
        cells = [f"{r:.5f} → {x:.5f} ({(x - r) / r:+.2%})" for r, x in pairs]
        lines.append(f"| {label.split(':')[0]} | " + " | ".join(cells) + " |")
    write_report("\n".join(lines), "lowmem.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
