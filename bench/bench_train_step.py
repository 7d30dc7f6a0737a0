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

import argparse

import torch

from harness import build_full_dit, build_tiny_dit, strip_lora, time_steps, write_report


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-b", action="store_true")
    a = p.parse_args()
    device = "cpu" if a.tiny else "cuda"
    dtype = torch.float32 if a.tiny else torch.bfloat16
    size, sub, text_dim = (64, 32, 64) if a.tiny else (1024, 512, 3584)
    dit = build_tiny_dit(device, dtype) if a.tiny else build_full_dit(device, dtype)
    from diffsynth_edit.activation import set_dit_activation
    from diffsynth_edit.variants import LORA_TARGETS_2511, LORA_TARGETS_UPSTREAM

    g = torch.Generator().manual_seed(0)
    lat = lambda h, w: torch.randn(1, 16, h // 8, w // 8, generator=g).to(device, dtype)  # noqa: E731
    x0, edit, sub0, white = lat(size, size), lat(size, size), lat(sub, sub), lat(sub, sub)
    emb = (torch.randn(1, 256, text_dim, generator=g) * 0.5).to(device, dtype)
    mask = torch.ones(1, 256, dtype=torch.long, device=device)
    t0 = (sub // 2) // 16
    subyx = torch.tensor([[t0, t0 + sub // 16, t0, t0 + sub // 16]], device=device)
    rows = []
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"

    # (a) upstream training module
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
              "height": size, "width": size, "use_gradient_checkpointing": True, "zero_cond_t": True, "cfg_scale": 1}

    def upstream_step():
        loss = FlowMatchSFTLoss(pipe, **inputs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    med, peak, _ = time_steps(upstream_step, device, a.warmup, a.repeats)
    n_up = sum(p.numel() for p in tm.trainable_modules())
    rows.append(("(a) upstream training module: plain, rank 32, 12 targets, AdamW, bf16 LoRA", med, peak, n_up))
    del opt, tm
    strip_lora(dit)
    set_dit_activation(dit, "gelu-tanh")  # the workspace default from here on
    torch.cuda.empty_cache() if device == "cuda" else None

    from diffsynth_edit.ste import STE
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.training.lora import inject_lora
    from diffsynth_edit.training.losses import NoisedBatch
    from diffsynth_edit.training.model import EditTrainModel
    from diffsynth_edit.training.optim import build_optimizer

    def workspace_case(label, mode, rank, targets, optimizer, tdtype):
        cfg = TrainConfig(mode=mode, lora_rank=rank, optimizer=optimizer, gradient_checkpointing=True,
                          learning_rate=1e-4 if optimizer == "adamw" else 1.0)
        params = inject_lora(dit, rank, float(rank), targets, tdtype)
        ste = None
        if mode == "bridge":
            ste = STE.for_dit(dit).to(device=device, dtype=tdtype)
            params += list(ste.parameters())
        model = EditTrainModel(dit, ste, cfg, zero_cond_t=True)
        optim = build_optimizer(cfg, params)
        batch = {"prompt_emb": emb, "prompt_emb_mask": mask, "edit_latents": [edit], "subyx": subyx,
                 "input_latents": x0}
        noised = NoisedBatch(latents=x0.float(), sub_latents=sub0.float(), target=x0.float(),
                             sub_target=sub0.float(), timestep=torch.tensor([500.0], device=device),
                             weight=torch.ones(1, device=device), s=torch.tensor([0.5], device=device))

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
        strip_lora(dit)
        if device == "cuda":
            torch.cuda.empty_cache()
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

    lines = [f"Card: {name}; torch {torch.__version__}; {size}² target + one {size}² reference, 256 text tokens, "
             f"{sub}² sub box in bridge mode; median of {a.repeats} steps after {a.warmup} warm-ups", "",
             "| case | s / optimizer step / sample | peak GiB | trainable params |", "| --- | --- | --- | --- |"]
    for label, med, peak, n in rows:
        lines.append(f"| {label} | {med:.3f} | {peak:.1f} | {n / 1e6:.1f} M |")
    write_report("\n".join(lines), "train_step.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
