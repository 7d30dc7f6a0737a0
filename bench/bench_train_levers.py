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

import argparse
import sys
import time

import torch

from harness import build_full_dit, build_tiny_dit, strip_lora, sync, time_steps, write_report


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cases", default="up,r32,r32c,r32c40,r32c20,def,defc,defc40")
    a = p.parse_args()
    device = "cpu" if a.tiny else "cuda"
    dtype = torch.float32 if a.tiny else torch.bfloat16
    size, sub, text_dim = (64, 32, 64) if a.tiny else (1024, 512, 3584)
    dit = build_tiny_dit(device, dtype) if a.tiny else build_full_dit(device, dtype)
    from diffsynth_edit.activation import set_dit_activation
    from diffsynth_edit.variants import LORA_TARGETS_2511, LORA_TARGETS_UPSTREAM
    from diffsynth_edit.speedups import compile_blocks, uncompile_blocks
    from diffsynth_edit.ste import STE
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.training.lora import inject_lora
    from diffsynth_edit.training.losses import NoisedBatch
    from diffsynth_edit.training.model import EditTrainModel
    from diffsynth_edit.training.optim import build_optimizer

    g = torch.Generator().manual_seed(0)
    lat = lambda h, w: torch.randn(1, 16, h // 8, w // 8, generator=g).to(device, dtype)  # noqa: E731
    x0, edit, sub0 = lat(size, size), lat(size, size), lat(sub, sub)
    emb = (torch.randn(1, 256, text_dim, generator=g) * 0.5).to(device, dtype)
    mask = torch.ones(1, 256, dtype=torch.long, device=device)
    t0 = (sub // 2) // 16
    subyx = torch.tensor([[t0, t0 + sub // 16, t0, t0 + sub // 16]], device=device)
    cases = a.cases.split(",")
    rows = []
    print(torch.cuda.get_device_name() if device == "cuda" else "cpu", torch.__version__, flush=True)

    if "up" in cases:
        from diffsynth.diffusion.loss import FlowMatchSFTLoss
        from diffsynth.diffusion.training_module import DiffusionTrainingModule
        from diffsynth.pipelines.qwen_image import QwenImagePipeline

        pipe = QwenImagePipeline(device=device, torch_dtype=dtype)
        pipe.dit = dit
        tm = DiffusionTrainingModule()
        tm.pipe = pipe
        set_dit_activation(dit, "sigmoid-1.702")  # upstream trains under its own activation
        tm.switch_pipe_to_training_mode(pipe, None, "dit", ",".join(LORA_TARGETS_UPSTREAM), 32)
        opt = torch.optim.AdamW(tm.trainable_modules(), lr=1e-4)
        inputs = {"input_latents": x0, "edit_latents": [edit], "prompt_emb": emb, "prompt_emb_mask": mask,
                  "height": size, "width": size, "use_gradient_checkpointing": True, "zero_cond_t": True,
                  "cfg_scale": 1}

        up_opt = []

        def upstream_step():
            FlowMatchSFTLoss(pipe, **inputs).backward()
            sync(device)
            t = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            up_opt.append(time.perf_counter() - t)

        med, peak, ts = time_steps(upstream_step, device, a.warmup, a.repeats)
        print(f"RESULT up | upstream r32 eager | {med:.3f} | {peak:.1f} | {[round(t, 3) for t in ts]}", flush=True)
        rows.append(("up: upstream training module, rank 32, 12 targets, AdamW", med,
                     sorted(up_opt[-a.repeats:])[a.repeats // 2], peak, float("nan"), ts))
        del opt, tm
        strip_lora(dit)
        if device == "cuda":
            torch.cuda.empty_cache()

    def case(key, mode, rank, targets, optimizer, compiled, last_n):
        cfg = TrainConfig(mode=mode, lora_rank=rank, optimizer=optimizer, gradient_checkpointing=True,
                          checkpoint_last_n=last_n, learning_rate=1e-4 if optimizer == "adamw" else 1.0)
        params = inject_lora(dit, rank, float(rank), targets, torch.bfloat16)
        ste = None
        if mode == "bridge":
            ste = STE.for_dit(dit).to(device=device, dtype=torch.bfloat16)
            params += list(ste.parameters())
        if compiled:
            compile_blocks(dit, ste)
        model = EditTrainModel(dit, ste, cfg, zero_cond_t=True)
        optim = build_optimizer(cfg, params)
        batch = {"prompt_emb": emb, "prompt_emb_mask": mask, "edit_latents": [edit], "subyx": subyx,
                 "input_latents": x0}
        noised = NoisedBatch(latents=x0.float(), sub_latents=sub0.float(), target=x0.float(),
                             sub_target=sub0.float(), timestep=torch.tensor([500.0], device=device),
                             weight=torch.ones(1, device=device), s=torch.tensor([0.5], device=device))
        opt_times = []

        def step():
            loss, _, _ = model(batch, noised)
            loss.backward()
            sync(device)
            t = time.perf_counter()
            optim.step()
            optim.zero_grad(set_to_none=True)
            sync(device)
            opt_times.append(time.perf_counter() - t)

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
            rows.append((label, med, opt_med, peak, first, ts))
        except torch.OutOfMemoryError:
            print(f"RESULT {key} | OOM", flush=True)
        del optim, model, params
        if compiled:
            uncompile_blocks(dit, ste)
        strip_lora(dit)
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()

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
            case(key, *table[key])
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    lines = [f"Card: {name}; torch {torch.__version__}; {size}² target + one {size}² reference, 256 text tokens, "
             f"{sub}² sub box in bridge mode; median of {a.repeats} steps after {a.warmup} warm-ups", "",
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
