#!/usr/bin/env python
"""Which levers pay for the training step on the full-size 2511 DiT (random weights, 1024² target + one 1024²
reference, 256 text tokens, bf16, batch 1), upstream's training module rerun in the same process:

    python bench/bench_train_levers.py [--cases up,r32,r32c,r32c40,r32c20,def,defc,defc40,defclib,opt,f8err,r32cf8]

Cases: `up` upstream (rank 32, 12 targets, AdamW, gradient checkpointing on every block); `r32` the workspace, same
LoRA, plain mode; `c` = `compile_blocks` (regional torch.compile); `40`/`20` = `checkpoint_last_n` (only the last N
of the 60 blocks recompute); `def` the shipped default (bridge + STE, 512² sub box, rank 512, 17 targets,
ProdigyPlusScheduleFree batched over same-shape tensors, bf16 trainables); `lib` = the library's own per-tensor
ProdigyPlusScheduleFree instead; `32` after `c` = fp32 trainables; `opt` = the default LoRA's optimizer step alone
(random gradients, no forward), library against batched, and how far apart one step (stochastic rounding off) leaves
the weights. Per case: median s per optimizer step at accumulation 1 (2 warm-ups, --repeats timed), the optimizer
step's own share, peak memory, the first (compiling) step, and the time per sample at the presets' accumulation of 16
(forward/backward + optimizer step / 16). `b10` after `c` (05, 10, 20, 30, 50): no torch.utils.checkpoint; the
compiled blocks' partitioner recomputes what it must to stay within 10 % of the activation memory it would save.
`f8` at the end = `fp8_matmuls` (the frozen block linears' GEMMs in fp8, forward and input gradient); `f8err` = how
far one r32 step's LoRA gradients move from the bf16 eager ones with compile, with fp8 matmuls, and with both. fp8
converts the DiT's linears for good, so the fp8 cases run after all others, whatever the order given.
`--profile r32c,defc` profiles one more step of those cases (GPU time by
attention / matmul / other, top kernels). Writes $OUT/train_levers.md.
"""
from __future__ import annotations

import sys
import traceback
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


KERNEL_KINDS = (("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
                ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "sm90", "sm100")))


def profile_step(step, key: str) -> None:
    """One more `step` under torch.profiler: GPU time by kind of kernel (attention, matmul, the rest) and the
    top kernels, printed."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    kinds = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        kinds[kind] += e.self_device_time_total / 1e6
    total = sum(kinds.values())
    if not total:
        print(f"PROFILE {key} | no GPU kernels recorded", flush=True)
        return
    print(f"PROFILE {key} | GPU kernel time {total:.3f} s | " + " | ".join(
        f"{k} {v:.3f} s ({v / total:.0%})" for k, v in kinds.items()), flush=True)
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"PROFILE {key} | {e.self_device_time_total / 1e3:9.1f} ms | {e.count:5d} x | {e.key[:110]}", flush=True)


def prodigy_like(optim, cls=None):
    """A fresh `cls` optimizer (default: the library's per-tensor ProdigyPlusScheduleFree) with the arguments and
    parameters of the workspace's batched `optim`."""
    from prodigyplus import ProdigyPlusScheduleFree

    g = optim.param_groups[0]
    return (cls or ProdigyPlusScheduleFree)([{"params": g["params"]}], lr=g["lr"], betas=g["betas"],
                                            weight_decay=g["weight_decay"], d0=g["d0"],
                                            use_schedulefree=g["use_schedulefree"])


def workspace_case(dit, x: TrainInputs, a, device: str, key: str, mode: str, rank: int, targets, optimizer: str,
                   compiled: bool, last_n: int | None, tdtype: torch.dtype = torch.bfloat16,
                   budget: float | None = None, fp8: bool = False, save_attention: bool = False) -> tuple | None:
    """One workspace configuration: its report row, None when it ran out of memory. `budget`: the trainer's
    `recompute_budget` (no block checkpointing; the compiled blocks' partitioner recomputes within the budget);
    `fp8`: the trainer's `fp8_matmuls`; `save_attention`: the trainer's `save_attention`."""
    from diffsynth_edit.speedups import uncompile_blocks
    from diffsynth_edit.training.config import TrainConfig

    library = optimizer == "prodigy-lib"
    optimizer = "prodigy" if library else optimizer
    cfg = TrainConfig(mode=mode, lora_rank=rank, optimizer=optimizer, gradient_checkpointing=True,
                      checkpoint_last_n=last_n, recompute_budget=budget, fp8_matmuls=fp8,
                      save_attention=save_attention,
                      learning_rate=1e-4 if optimizer == "adamw" else 1.0)
    model, optim, params, ste = workspace_training(dit, cfg, targets, tdtype, device, compiled)
    if library:
        optimizer, optim = "prodigy (library, per tensor)", prodigy_like(optim)
    elif optimizer == "prodigy":
        optimizer = "prodigy (batched)"
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
        if key in a.profile.split(","):
            profile_step(step, key)
        print(f"RESULT {key} | {mode} r{rank} {len(targets)}t {optimizer} {str(tdtype)[6:]} compiled={compiled} "
              f"last_n={last_n} budget={budget}{' fp8' if fp8 else ''}{' save_attention' if save_attention else ''} | "
              f"{med:.3f} | {peak:.1f} | {[round(t, 3) for t in ts]} | opt {opt_med:.3f} | first {first:.1f}",
              flush=True)
        recompute = (f"partitioner memory budget {budget}{' keeping attention' if save_attention else ''}"
                     if budget is not None else
                     f"last {last_n} blocks recompute" if last_n else "every block recomputes")
        label = (f"{key}: {mode}, rank {rank}, {len(targets)} targets, {optimizer}, {str(tdtype)[6:]} trainables"
                 f"{', compiled blocks' if compiled else ''}, {recompute}{', fp8 matmuls' if fp8 else ''}")
        row = (label, med, opt_med, peak, first, ts)
    except torch.OutOfMemoryError:
        print(f"RESULT {key} | OOM", flush=True)
    except Exception as e:  # one failing case (a compiler error on the card's torch, say) must not lose the others
        traceback.print_exc()
        print(f"RESULT {key} | ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
    del optim, model, params
    if compiled:
        uncompile_blocks(dit, ste)
    strip_lora(dit)
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def optimizer_case(dit, a, device: str) -> list[tuple]:
    """The default LoRA's optimizer step alone: library vs batched rows, and the weights' distance after one step."""
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.variants import LORA_TARGETS_2511

    cfg = TrainConfig(mode="bridge", lora_rank=512, optimizer="prodigy", learning_rate=1.0)
    model, batched, params, ste = workspace_training(dit, cfg, LORA_TARGETS_2511, torch.bfloat16, device)
    g = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * 1e-3 for p in params]
    start = [p.detach().clone() for p in params]
    n = sum(p.numel() for p in params)

    def fresh(make, stochastic: bool = True):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        opt = make()
        for group in opt.param_groups:
            group["stochastic_rounding"] = stochastic
        return opt

    makers = {"library (per tensor)": lambda: prodigy_like(batched),
              "workspace (batched)": lambda: prodigy_like(batched, type(batched))}
    rows, first = [], None
    for name, make in makers.items():
        opt = fresh(make)
        times = []
        for _ in range(a.warmup + a.repeats):
            for p, gr in zip(params, grads):
                p.grad = gr
            timed_optimizer_step(opt, device, times)
        ts = times[a.warmup:]
        med = sorted(ts)[len(ts) // 2]
        print(f"RESULT opt | {name} | {len(params)} tensors, {n / 1e9:.2f} G elements | {med:.3f} | "
              f"{[round(t, 3) for t in ts]}", flush=True)
        rows.append((f"opt: optimizer step alone, {name}, {len(params)} tensors ({n / 1e9:.2f} G elements)", med,
                     med, torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
                     float("nan"), ts))
        del opt
        opt = fresh(make, stochastic=False)  # one step each from the same start: how far apart they land
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
        del opt
        if first is None:
            first = [p.detach().clone() for p in params]
        else:
            diff = max((p.detach().float() - r.float()).abs().max().item() for p, r in zip(params, first))
            moved = max((r.float() - s.float()).abs().max().item() for r, s in zip(first, start))
            print(f"RESULT opt | one step, stochastic rounding off: max |batched - library| {diff:.3g}, "
                  f"max |update| {moved:.3g}", flush=True)
    for p in params:
        p.grad = None
    del model, batched, first
    release_lora(dit, device)
    return rows


def fp8_gradient_case(dit, x: TrainInputs, device: str) -> list[str]:
    """One r32 step's LoRA gradients (B drawn at random so that A has gradient too, the same draw each time) with
    bf16 eager (the reference), compiled, fp8 matmuls, fp8 compiled: report lines. Leaves the linears in fp8."""
    from diffsynth_edit.fp8_base import fp8_matmul_blocks
    from diffsynth_edit.speedups import compile_blocks, uncompile_blocks
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.variants import LORA_TARGETS_UPSTREAM

    cfg = TrainConfig(mode="plain", lora_rank=32, optimizer="adamw", gradient_checkpointing=True)
    model, optim, params, _ = workspace_training(dit, cfg, LORA_TARGETS_UPSTREAM, torch.bfloat16, device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * 1e-3)
    batch, noised = fixed_noised_batch(x, device)

    def grads(compiled: bool) -> tuple[float, torch.Tensor]:
        if compiled:
            compile_blocks(dit)
        try:
            loss, _, _ = model(batch, noised)
            gs = torch.autograd.grad(loss, params, allow_unused=True)  # the last block's text outputs go unused
        finally:
            if compiled:
                uncompile_blocks(dit)
                torch._dynamo.reset()
        return float(loss.detach()), torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten()
                                       for p, g in zip(params, gs)])

    def attempt(label: str, compiled: bool) -> None:
        try:
            runs[label] = grads(compiled)
        except Exception as e:  # report it and go on: the other runs still compare
            traceback.print_exc()
            print(f"RESULT f8err | {label} | ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)

    runs = {"bf16 eager (reference)": grads(False)}
    attempt("bf16 compiled", True)
    n = fp8_matmul_blocks(dit)
    attempt("fp8 matmuls, eager", False)
    attempt("fp8 matmuls, compiled", True)
    ref = runs["bf16 eager (reference)"][1].double()
    lines = [f"LoRA gradients of one r32 step ({ref.numel()} elements, LoRA B drawn ~ N(0, 1e-3)); {n} block linears "
             "in fp8", "", "| run | loss | rel L2 diff of the LoRA gradient to bf16 eager | cosine |",
             "| --- | ---: | ---: | ---: |"]
    for label, (loss, g) in runs.items():
        g = g.double()
        rel = float((g - ref).norm() / ref.norm())
        cos = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
        lines.append(f"| {label} | {loss:.6f} | {rel:.4f} | {cos:.5f} |")
        print(f"RESULT f8err | {label} | loss {loss:.6f} | rel {rel:.4f} | cos {cos:.5f}", flush=True)
    del model, optim, params
    release_lora(dit, device)
    return lines


def main() -> int:
    p = bench_parser()
    p.add_argument("--cases", default="up,r32,r32c,r32c40,r32c20,def,defc,defc40")
    p.add_argument("--profile", default="", help="comma-separated cases to profile one more step of")
    a = p.parse_args()
    device, dtype = device_and_dtype(a.tiny)
    from diffsynth_edit.activation import set_dit_activation
    from diffsynth_edit.variants import LORA_TARGETS_2511, LORA_TARGETS_UPSTREAM

    cases = a.cases.split(",")
    table = {
        "r32": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", False, None),
        "r32c": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", True, None),
        "r32c40": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", True, 40),
        "r32c20": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", True, 20),
        "def": ("bridge", 512, LORA_TARGETS_2511, "prodigy", False, None),
        "defc": ("bridge", 512, LORA_TARGETS_2511, "prodigy", True, None),
        "defc40": ("bridge", 512, LORA_TARGETS_2511, "prodigy", True, 40),
        "defc32": ("bridge", 512, LORA_TARGETS_2511, "prodigy", True, None, torch.float32),
        "defc32b10": ("bridge", 512, LORA_TARGETS_2511, "prodigy", True, None, torch.float32, 0.1),
        **{f"r32cb{round(b * 100):02d}": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", True, None, torch.bfloat16, b)
           for b in (0.05, 0.1, 0.2, 0.3, 0.5)},
        **{f"defcb{round(b * 100):02d}": ("bridge", 512, LORA_TARGETS_2511, "prodigy", True, None, torch.bfloat16, b)
           for b in (0.05, 0.1, 0.2, 0.3)},
        "deflib": ("bridge", 512, LORA_TARGETS_2511, "prodigy-lib", False, None),
        "defclib": ("bridge", 512, LORA_TARGETS_2511, "prodigy-lib", True, None),
        "r32f8": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", False, None, torch.bfloat16, None, True),
        "r32cf8": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", True, None, torch.bfloat16, None, True),
        **{f"r32cb{round(b * 100):02d}f8": ("plain", 32, LORA_TARGETS_UPSTREAM, "adamw", True, None, torch.bfloat16,
                                            b, True) for b in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)},
        "defcf8": ("bridge", 512, LORA_TARGETS_2511, "prodigy", True, None, torch.bfloat16, None, True),
        **{f"defcb{round(b * 100):02d}f8": ("bridge", 512, LORA_TARGETS_2511, "prodigy", True, None, torch.bfloat16,
                                            b, True) for b in (0.02, 0.05, 0.1, 0.2, 0.3)},
    }
    defaults = (torch.bfloat16, None, False)  # tdtype, budget, fp8 when a row leaves them out
    table = {k: v + defaults[len(v) - 6:] for k, v in table.items()}
    # "sa": the budget cases with `save_attention` (the partitioner weighs the attention forward before recomputing)
    table |= {f"{k}sa": (*v, True) for k, v in table.items() if v[7] is not None}
    unknown = [k for k in cases if k not in table and k not in ("up", "opt", "f8err")]
    if unknown:  # before the model is built: a typo must not cost a device call
        raise SystemExit(f"error: unknown --cases {','.join(unknown)} (known: up, opt, f8err, {', '.join(table)})")
    dit = build_tiny_dit(device, dtype) if a.tiny else build_full_dit(device, dtype)
    x = train_inputs(a.tiny, device, dtype)
    rows = []
    print(device_name(device), torch.__version__, flush=True)
    if "up" in cases:
        rows.append(upstream_case(dit, x, a, device, dtype))
    # fp8 converts the DiT's linears for good: the bf16 cases first, then the gradient comparison, then fp8 timings
    cases.sort(key=lambda k: 1 if k == "f8err" else 2 if k in table and table[k][8] else 0)
    set_dit_activation(dit, "gelu-tanh")  # the workspace default (the released model's activation)
    if "opt" in cases:
        rows += optimizer_case(dit, a, device)
    f8_lines = []
    for key in cases:
        if key == "f8err":
            f8_lines = ["", *fp8_gradient_case(dit, x, device)]
        elif key in table:
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
    write_report("\n".join(lines + f8_lines), "train_levers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
