#!/usr/bin/env python
"""Which levers pay for the training step on the full-size 2511 DiT (random weights, 1024² target + one 1024²
reference, 256 text tokens, bf16, batch 1), upstream's training module rerun in the same process:

    python bench/bench_train_levers.py [--cases up,r32,r32c,r32c40,r32c20,def,defc,defc40]

Cases: `up` upstream (rank 32, 12 targets, AdamW, gradient checkpointing on every block); `r32` the workspace, same
LoRA, plain mode; `c` = `compile_blocks` (regional torch.compile); `40`/`20` = `checkpoint_last_n` (only the last N
of the 60 blocks recompute); `def` the shipped default (bridge + STE, 512² sub box, rank 512, 17 targets,
ProdigyPlusScheduleFree, bf16 trainables). Per case: median s per optimizer step at accumulation 1 (2 warm-ups,
--repeats timed), the optimizer step's own share, peak memory, the first (compiling) step, and the time per sample at
the presets' accumulation of 16 (forward/backward + optimizer step / 16). Writes $OUT/train_levers.md.
"""
from __future__ import annotations

import sys
import time

import torch

from harness import (TrainInputs, bench_parser, build_full_dit, build_tiny_dit, device_and_dtype, device_name,
                     fixed_noised_batch, release_lora, strip_lora, sync, time_steps, train_inputs, upstream_training,
                     workspace_training, write_report)


def timed_optimizer_step(optimizer, device: str, times: list[float]) -> None:
    """`optimizer.step()` and `zero_grad`, timed alone (synchronised before and after) into `times`."""
    sync(device)
    t = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    times.append(time.perf_counter() - t)


def upstream_case(dit, x: TrainInputs, a, device: str, dtype: torch.dtype) -> tuple:
    """Upstream's training module, eager: its report row."""
    from diffsynth.diffusion.loss import FlowMatchSFTLoss

    pipe, tm, opt, inputs = upstream_training(dit, device, dtype, x)
    up_opt = []

    def upstream_step():
        FlowMatchSFTLoss(pipe, **inputs).backward()
        timed_optimizer_step(opt, device, up_opt)

    med, peak, ts = time_steps(upstream_step, device, a.warmup, a.repeats)
    print(f"RESULT up | upstream r32 eager | {med:.3f} | {peak:.1f} | {[round(t, 3) for t in ts]}", flush=True)
    row = ("up: upstream training module, rank 32, 12 targets, AdamW", med,
           sorted(up_opt[-a.repeats:])[a.repeats // 2], peak, float("nan"), ts)
    del opt, tm
    release_lora(dit, device)
    return row


def workspace_case(dit, x: TrainInputs, a, device: str, key: str, mode: str, rank: int, targets, optimizer: str,
                   compiled: bool, last_n: int | None) -> tuple | None:
    """One workspace configuration (bf16 trainables): its report row, None when it ran out of memory."""
    from diffsynth_edit.speedups import uncompile_blocks
    from diffsynth_edit.training.config import TrainConfig

    cfg = TrainConfig(mode=mode, lora_rank=rank, optimizer=optimizer, gradient_checkpointing=True,
                      checkpoint_last_n=last_n, learning_rate=1e-4 if optimizer == "adamw" else 1.0)
    model, optim, params, ste = workspace_training(dit, cfg, targets, torch.bfloat16, device, compiled)
    batch, noised = fixed_noised_batch(x, device)
    opt_times = []

    def step():
        loss, _, _ = model(batch, noised)
        loss.backward()
        timed_optimizer_step(optim, device, opt_times)

    row = None
    t_first = time.perf_counter()
    try:
        step()
        first = time.perf_counter() - t_first
        med, peak, ts = time_steps(step, device, a.warmup, a.repeats)
        opt_med = sorted(opt_times[-a.repeats:])[a.repeats // 2]
        print(f"RESULT {key} | {mode} r{rank} {len(targets)}t {optimizer} compiled={compiled} last_n={last_n} | "
              f"{med:.3f} | {peak:.1f} | {[round(t, 3) for t in ts]} | opt {opt_med:.3f} | first {first:.1f}",
              flush=True)
        label = (f"{key}: {mode}, rank {rank}, {len(targets)} targets, {optimizer}"
                 f"{', compiled blocks' if compiled else ''}"
                 f"{f', last {last_n} blocks recompute' if last_n else ', every block recomputes'}")
        row = (label, med, opt_med, peak, first, ts)
    except torch.OutOfMemoryError:
        print(f"RESULT {key} | OOM", flush=True)
    del optim, model, params
    if compiled:
        uncompile_blocks(dit, ste)
    strip_lora(dit)
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    p = bench_parser()
    p.add_argument("--cases", default="up,r32,r32c,r32c40,r32c20,def,defc,defc40")
    a = p.parse_args()
    device, dtype = device_and_dtype(a.tiny)
    dit = build_tiny_dit(device, dtype) if a.tiny else build_full_dit(device, dtype)
    from diffsynth_edit.activation import set_dit_activation
    from diffsynth_edit.variants import LORA_TARGETS_2511, LORA_TARGETS_UPSTREAM

    x = train_inputs(a.tiny, device, dtype)
    cases = a.cases.split(",")
    rows = []
    print(device_name(device), torch.__version__, flush=True)
    if "up" in cases:
        rows.append(upstream_case(dit, x, a, device, dtype))
    table = {
        "r32": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", False, None),
        "r32c": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", True, None),
        "r32c40": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", True, 40),
        "r32c20": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", True, 20),
        "def": ("bridge", 512, LORA_TARGETS_2511, "prodigy", False, None),
        "defc": ("bridge", 512, LORA_TARGETS_2511, "prodigy", True, None),
        "defc40": ("bridge", 512, LORA_TARGETS_2511, "prodigy", True, 40),
    }
    set_dit_activation(dit, "gelu-tanh")  # the workspace default (the released model's activation)
    for key in cases:
        if key in table:
            row = workspace_case(dit, x, a, device, key, *table[key])
            rows += [row] if row is not None else []
    lines = [f"Card: {device_name(device)}; torch {torch.__version__}; {x.size}² target + one {x.size}² reference, "
             f"256 text tokens, {x.sub}² sub box in bridge mode; median of {a.repeats} steps after {a.warmup} warm-ups", "",
             "| case | s / optimizer step (accumulation 1) | of which optimizer | s / sample at accumulation 16 | "
             "peak GiB | first step s | timed steps |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, med, opt, peak, first, ts in rows:
        per_sample = med - opt + opt / 16 if opt == opt else float("nan")
        lines.append(f"| {label} | {med:.3f} | {opt:.3f} | {per_sample:.3f} | {peak:.1f} | {first:.1f} | "
                     f"{', '.join(f'{t:.3f}' for t in ts)} |")
    write_report("\n".join(lines), "train_levers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
