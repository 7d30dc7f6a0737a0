#!/usr/bin/env python
"""Training-step timings on the full-size 2511 DiT (random weights): upstream diffsynth's training module vs the
workspace trainer's model, on the same inputs in the same process.

    python bench/bench_train_step.py          # GPU: 1024² target + one 1024² reference, bf16, gradient checkpointing
    python bench/bench_train_step.py --tiny   # CPU smoke test

Cases (one optimizer step = forward + backward + optimizer.step at batch 1; 2 warm-ups, median of --repeats):
  (a) upstream: `DiffusionTrainingModule.switch_pipe_to_training_mode` (peft LoRA rank 32 on the 12 upstream targets,
      bf16 LoRA weights) + `FlowMatchSFTLoss` with stage-2 cached inputs, AdamW — what `sft:train` runs per step
  (a') workspace, the same LoRA (rank 32, 12 targets), plain mode, AdamW, LoRA weights fp32 (TF32 matmuls)
  (a'') as (a') with bf16 LoRA weights (the effect of keeping trainables in fp32)
  (b) workspace default: bridge mode (512² sub box, STE), the 17 targets, rank 512, ProdigyPlusScheduleFree;
      trainable weights fp32, or bf16 when fp32 does not fit the card (reported)
Peak memory: torch.cuda.max_memory_allocated over the timed steps (weights included). Writes $OUT/train_step.md.
"""
from __future__ import annotations

import torch

from harness import (bench_parser, build_full_dit, build_tiny_dit, device_and_dtype, device_name, fixed_noised_batch,
                     release_lora, time_steps, train_inputs, upstream_training, workspace_training, write_report)


def main() -> int:
    p = bench_parser()
    p.add_argument("--skip-b", action="store_true")
    a = p.parse_args()
    device, dtype = device_and_dtype(a.tiny)
    dit = build_tiny_dit(device, dtype) if a.tiny else build_full_dit(device, dtype)
    from diffsynth_edit.activation import set_dit_activation
    from diffsynth_edit.variants import LORA_TARGETS_2511, LORA_TARGETS_UPSTREAM

    x = train_inputs(a.tiny, device, dtype, spare_latent=True)
    rows = []
    name = device_name(device)

    # (a) upstream training module
    from diffsynth.diffusion.loss import FlowMatchSFTLoss

    pipe, tm, opt, inputs = upstream_training(dit, device, dtype, x)

    def upstream_step():
        loss = FlowMatchSFTLoss(pipe, **inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    med, peak, _ = time_steps(upstream_step, device, a.warmup, a.repeats)
    n_up = sum(p.numel() for p in tm.trainable_modules())
    rows.append(("(a) upstream training module: plain, rank 32, 12 targets, AdamW, bf16 LoRA", med, peak, n_up))
    del opt, tm
    release_lora(dit, device)
    set_dit_activation(dit, "gelu-tanh")  # the workspace default from here on

    from diffsynth_edit.training.config import TrainConfig

    def workspace_case(label, mode, rank, targets, optimizer, tdtype):
        cfg = TrainConfig(mode=mode, lora_rank=rank, optimizer=optimizer, gradient_checkpointing=True,
                          learning_rate=1e-4 if optimizer == "adamw" else 1.0)
        model, optim, params, _ = workspace_training(dit, cfg, targets, tdtype, device)
        batch, noised = fixed_noised_batch(x, device)

        def step():
            loss, _, _ = model(batch, noised)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        try:
            med, peak, _ = time_steps(step, device, a.warmup, a.repeats)
            rows.append((label, med, peak, sum(p.numel() for p in params)))
            ok = True
        except torch.OutOfMemoryError:
            rows.append((label + " — out of memory", float("nan"), float("nan"), sum(p.numel() for p in params)))
            ok = False
        del optim, model, params
        release_lora(dit, device)
        return ok

    workspace_case("(a') workspace: plain, rank 32, 12 targets, AdamW, fp32 LoRA", "plain", 32,
                   LORA_TARGETS_UPSTREAM, "adamw", torch.float32)
    workspace_case("(a'') workspace: plain, rank 32, 12 targets, AdamW, bf16 LoRA", "plain", 32,
                   LORA_TARGETS_UPSTREAM, "adamw", torch.bfloat16)
    if not a.skip_b:
        rank = 8 if a.tiny else 512
        ok = workspace_case(f"(b) workspace default: bridge + STE, rank {rank}, 17 targets, Prodigy, fp32 trainables",
                            "bridge", rank, LORA_TARGETS_2511, "prodigy", torch.float32)
        if not ok:
            workspace_case(f"(b) workspace default: bridge + STE, rank {rank}, 17 targets, Prodigy, bf16 trainables",
                           "bridge", rank, LORA_TARGETS_2511, "prodigy", torch.bfloat16)

    lines = [f"Card: {name}; torch {torch.__version__}; {x.size}² target + one {x.size}² reference, 256 text tokens, "
             f"{x.sub}² sub box in bridge mode; median of {a.repeats} steps after {a.warmup} warm-ups", "",
             "| case | s / optimizer step / sample | peak GiB | trainable params |", "| --- | --- | --- | --- |"]
    for label, med, peak, n in rows:
        lines.append(f"| {label} | {med:.3f} | {peak:.1f} | {n / 1e6:.1f} M |")
    write_report("\n".join(lines), "train_step.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
