#!/usr/bin/env python
"""DiT forward and 40-step CFG edit timings: upstream diffsynth vs the workspace's bridge forward and sampler.

    python bench/bench_dit_forward.py            # GPU (H100/H200): full-size 2511 DiT, random weights, bf16
    python bench/bench_dit_forward.py --tiny     # CPU smoke test with the tiny DiT (seconds)

Full-size setup: QwenImageDiT() built on the meta device, cast to bf16, materialised on the GPU with `to_empty`, every
weight drawn from N(0, 0.02), biases 0, norm scales 1 (the values do not change the timings). Inputs: a 1024² target
and one 1024² reference (latents 1×16×128×128 each), a random 256-token prompt embedding (3584 wide); the negative
prompt for CFG has 200 tokens. Timed (each under torch.no_grad, CUDA-synchronised, 2 warm-ups, median of ≥ 5):
  (a) upstream `model_fn_qwen_image(..., edit_latents=[e], zero_cond_t=True)`
  (b0) workspace `bridge_forward`, plain mode, same inputs and upstream's sigmoid activation (max abs diff to (a):
      everything but the activation); (b) the same with the workspace default, the released model's tanh-GELU
  (c) workspace `bridge_forward`, bridge mode: + a 512² sub box (1,024 more tokens) and the STE (fp32 weights, as
      the editor keeps it); (c′) the same layout without the STE, (c″) with the STE's weights in bf16
  (d) a whole 40-step CFG edit (cfg 4) through the workspace editor's sampling loop with batch_cfg on: the editor
      batches the pair only for prompts of equal length, so with these 256- and 200-token prompts it runs two
      calls per step like (d′); (d′) the same with batch_cfg off
  (e) an upstream-style 40-step CFG loop: 80 sequential `model_fn_qwen_image` calls with the Qwen-Image scheduler
  (f) as (d) in bridge mode (sub box + STE)
  (g) with --fast-loop (CUDA): (d) after the editor's opt-in `speed_up(compile_blocks=True)`; (gk) + fp8 linears
      except the image MLP's first; (g′) + fp8 on every token linear; (g″) + fast fp8 accumulation
(d)–(f) are timed once each (after one warm-up step), as they take tens of seconds. Peak memory is
torch.cuda.max_memory_allocated per section (weights included). The markdown table is printed and, when the
environment variable OUT is set, written to $OUT/dit_forward.md (plus dit_forward.json).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from harness import build_full_dit, build_tiny_dit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode with the tiny DiT")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--size", type=int, default=None, help="target/reference side in px (default 1024; tiny 128)")
    p.add_argument("--sub", type=int, default=None, help="sub box side in px (default 512; tiny 64)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--nega-tokens", type=int, default=200)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 40; tiny 4)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per case (default 5; tiny 3)")
    p.add_argument("--skip-loops", action="store_true", help="only the single-forward cases (a)-(c)")
    p.add_argument("--skip-bridge-loop", action="store_true", help="skip (f)")
    p.add_argument("--skip-sequential-cfg", action="store_true", help="skip (d′)")
    p.add_argument("--fast-loop", action="store_true", help="CUDA: also (g) compiled and (g′) compiled + fp8 loops "
                   "(fp8 is applied in place: with this flag (f) runs on the fp8 DiT)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for dit_forward.md (default $OUT)")
    return p.parse_args(argv)


# ---- inputs --------------------------------------------------------------------------------------------------------
def make_inputs(args, dit, device: str, dtype: torch.dtype, text_dim: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    lat = args.size // 8
    sub = args.sub // 8

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x = randn(1, 16, lat, lat)
    edit = randn(1, 16, lat, lat)
    sub_latents = randn(1, 16, sub, sub)
    emb = randn(1, args.prompt_tokens, text_dim)
    nega = randn(1, args.nega_tokens, text_dim)
    off = (args.size - args.sub) // 2 // 16
    n = args.sub // 16
    subyx = torch.tensor([[off, off + n, off, off + n]], device=device)
    return types.SimpleNamespace(
        x=x, edit=edit, sub=sub_latents, subyx=subyx, emb=emb, mask=torch.ones(1, emb.shape[1], dtype=torch.long,
                                                                                   device=device),
        nega=nega, nega_mask=torch.ones(1, nega.shape[1], dtype=torch.long, device=device),
        t=torch.tensor([500.0], device=device))


# ---- timing --------------------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None

    def run(self, fn, warmup: int, repeats: int):
        """(median s, all times, last output, peak GiB)."""
        self.reset_peak()
        out = None
        for _ in range(warmup):
            out = fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), times, out, self.peak_gib()


def add_row(rows: list, label: str, median: float, times: list, peak, note: str = "") -> None:
    rows.append({"case": label, "median_s": median, "min_s": min(times), "runs": len(times), "peak_gib": peak,
                 "note": note})
    print(f"{label}: median {median:.4f} s over {len(times)} ({', '.join(f'{t:.4f}' for t in times)})"
          + (f", peak {peak:.1f} GiB" if peak is not None else "") + (f"; {note}" if note else ""), flush=True)


def settle_args(args) -> tuple[str, torch.dtype] | None:
    """The device and dtype, and the tiny or full-size defaults filled in; None when CUDA is asked for but absent."""
    tiny = args.tiny
    device = args.device or ("cpu" if tiny else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device; use --tiny for the CPU smoke test", file=sys.stderr)
        return None
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    args.size = args.size or (128 if tiny else 1024)
    args.sub = args.sub or (64 if tiny else 512)
    args.steps = args.steps or (4 if tiny else 40)
    args.repeats = args.repeats or (3 if tiny else 5)
    if tiny:
        args.prompt_tokens, args.nega_tokens = min(args.prompt_tokens, 16), min(args.nega_tokens, 12)
        args.warmup = min(args.warmup, 1)
    for side in (args.size, args.sub):
        if side % 16:
            raise SystemExit(f"sizes must be multiples of 16, got {side}")
    return device, dtype


def trained_like_ste(dit, device: str):
    """The STE with trained-like gates (a fresh STE is all ones; the cost is the same), fp32 as the editor keeps it."""
    from diffsynth_edit.ste import STE

    torch.manual_seed(0)
    ste = STE.for_dit(dit)
    for head in ste.heads:
        torch.nn.init.normal_(head.weight, std=0.02)
    return ste.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def forward_cases(dit, ste, inp, args, timer: Timer, add, dtype: torch.dtype) -> tuple[float, float]:
    """(a)-(c″): single forwards. Returns the max abs differences (a)-(b) and (a)-(b0)."""
    from diffsynth.pipelines.qwen_image import model_fn_qwen_image

    from diffsynth_edit.activation import set_dit_activation
    from diffsynth_edit.bridge_dit import DiTInputs, bridge_forward

    tokens_sub = (args.sub // 16) ** 2
    plain = DiTInputs(latents=inp.x, timestep=inp.t, prompt_emb=inp.emb, prompt_emb_mask=inp.mask,
                      edit_latents=[inp.edit])
    bridged = DiTInputs(latents=inp.x, timestep=inp.t, prompt_emb=inp.emb, prompt_emb_mask=inp.mask,
                        edit_latents=[inp.edit], sub_latents=inp.sub, subyx=inp.subyx)

    def upstream():
        return model_fn_qwen_image(dit=dit, latents=inp.x, timestep=inp.t, prompt_emb=inp.emb,
                                   prompt_emb_mask=inp.mask, height=args.size, width=args.size,
                                   edit_latents=[inp.edit], zero_cond_t=True)

    set_dit_activation(dit, "sigmoid-1.702")  # upstream's own MLP activation
    med, times, out_a, peak = timer.run(upstream, args.warmup, args.repeats)
    add("(a) upstream model_fn_qwen_image", med, times, peak)

    def plain_fn():
        return bridge_forward(dit, plain, zero_cond_t=True)[0]

    med, times, out_b0, peak = timer.run(plain_fn, args.warmup, args.repeats)
    diff = same_activation_diff = (out_a.float() - out_b0.float()).abs().max().item()
    add("(b0) workspace bridge_forward, plain, upstream's sigmoid activation", med, times, peak,
        f"max abs diff to (a): {diff:.3g} (same activation: any difference is the rest of the forward)")
    set_dit_activation(dit, "gelu-tanh")  # the workspace default (the released model's) from here on
    med, times, out_b, peak = timer.run(plain_fn, args.warmup, args.repeats)
    diff = (out_a.float() - out_b.float()).abs().max().item()
    add("(b) workspace bridge_forward, plain (default tanh-GELU)", med, times, peak,
        f"max abs diff to (a): {diff:.3g} (includes the activation change)")

    def bridge_fn():
        return bridge_forward(dit, bridged, ste=ste, zero_cond_t=True)

    med, times, _, peak = timer.run(bridge_fn, args.warmup, args.repeats)
    add(f"(c) workspace bridge_forward, bridge ({args.sub}² sub + STE)", med, times, peak,
        f"+{tokens_sub} sub tokens; STE with fp32 weights, as the editor keeps it")

    def bridge_no_ste():
        return bridge_forward(dit, bridged, ste=None, zero_cond_t=True)

    med, times, _, peak = timer.run(bridge_no_ste, args.warmup, args.repeats)
    add("(c′) same token layout, no STE", med, times, peak, "isolates the STE's cost")

    if dtype != torch.float32:
        ste_low = copy.deepcopy(ste).to(dtype)

        def bridge_low_ste():
            return bridge_forward(dit, bridged, ste=ste_low, zero_cond_t=True)

        med, times, _, peak = timer.run(bridge_low_ste, args.warmup, args.repeats)
        add(f"(c″) as (c), STE weights in {str(dtype).replace('torch.', '')}", med, times, peak,
            "STE attention on the fused kernels")
    return diff, same_activation_diff


def loop_cases(dit, ste, inp, args, timer: Timer, add, device: str, dtype: torch.dtype) -> None:
    """(d)-(f): whole sampling loops, one timed run each."""
    from diffsynth.diffusion.flow_match import FlowMatchScheduler
    from diffsynth.pipelines.qwen_image import model_fn_qwen_image

    from diffsynth_edit.activation import set_dit_activation
    from diffsynth_edit.editing.editor import Editor
    from diffsynth_edit.editing.request import EditSettings, PreparedEdit
    from diffsynth_edit.geometry import Box

    pipe = types.SimpleNamespace(dit=dit, device=torch.device(device), torch_dtype=dtype)
    h = w = args.size
    prep = PreparedEdit(
        source=_blank(w, h), references=[], mask=None, box=_centre_box(args, Box), edit_latents=[inp.edit],
        prompt_emb=inp.emb, prompt_mask=inp.mask, nega_emb=inp.nega, nega_mask=inp.nega_mask,
        mask_latent=torch.ones(1, 1, h // 8, w // 8, device=device))
    settings = EditSettings(steps=args.steps, cfg_scale=args.cfg, batch_cfg=True, seed=0)
    editor = Editor(pipe, variant="2511")

    def editor_loop():
        return editor.sample(prep, settings)[0]

    editor.predict(prep, inp.x.float(), None, 1000.0, args.cfg)  # warm-up step
    med, times, _, peak = timer.run(editor_loop, 0, 1)
    paired = inp.emb.shape[1] == inp.nega.shape[1]  # the editor batches the pair only at equal lengths
    add(f"(d) workspace editor, {args.steps}-step CFG {args.cfg:g}, batch_cfg on, plain", med, times, peak,
        f"{args.steps} DiT calls of batch 2" if paired else
        f"{2 * args.steps} DiT calls of batch 1 (prompt lengths differ: the pair is not batched)")

    if not args.skip_sequential_cfg:
        sequential = EditSettings(steps=args.steps, cfg_scale=args.cfg, batch_cfg=False, seed=0)

        def editor_loop_sequential():
            return editor.sample(prep, sequential)[0]

        med, times, _, peak = timer.run(editor_loop_sequential, 0, 1)
        add(f"(d′) as (d), CFG not batched", med, times, peak, f"{2 * args.steps} DiT calls of batch 1")

    scheduler = FlowMatchScheduler("Qwen-Image")

    def upstream_loop():
        scheduler.set_timesteps(args.steps, denoising_strength=1.0,
                                dynamic_shift_len=(args.size // 16) * (args.size // 16))
        gen = torch.Generator("cpu").manual_seed(0)
        latents = torch.randn(1, 16, h // 8, w // 8, generator=gen).to(device=device, dtype=dtype)
        for timestep in scheduler.timesteps:
            ts = timestep.unsqueeze(0).to(dtype=dtype, device=device)
            common = dict(dit=dit, latents=latents, timestep=ts, height=h, width=w,
                          edit_latents=[inp.edit], zero_cond_t=True)
            posi = model_fn_qwen_image(prompt_emb=inp.emb, prompt_emb_mask=inp.mask, **common)
            nega = model_fn_qwen_image(prompt_emb=inp.nega, prompt_emb_mask=inp.nega_mask, **common)
            pred = nega + args.cfg * (posi - nega)
            latents = scheduler.step(pred, ts, latents)
        return latents

    set_dit_activation(dit, "sigmoid-1.702")  # upstream's own activation (the same cost)
    med, times, _, peak = timer.run(upstream_loop, 0, 1)
    set_dit_activation(dit, "gelu-tanh")
    add(f"(e) upstream-style {args.steps}-step CFG {args.cfg:g} loop", med, times, peak,
        f"{2 * args.steps} sequential model_fn calls")

    if args.fast_loop and device.startswith("cuda"):
        fast_loop_cases(editor, prep, inp, settings, timer, add, args)

    if not args.skip_bridge_loop:
        editor.ste = ste
        editor.predict(prep, inp.x.float(), inp.sub.float(), 1000.0, args.cfg)
        med, times, _, peak = timer.run(editor_loop, 0, 1)
        add(f"(f) workspace editor, {args.steps}-step CFG {args.cfg:g}, batched CFG, bridge", med, times,
            peak, f"{args.sub}² sub + STE")


def fast_loop_cases(editor, prep, inp, settings, timer: Timer, add, args) -> None:
    """(g) (d) with the editor's opt-in `speed_up(compile_blocks=True)`; (gk) + fp8 linears except the image MLP's
    first (`fp8_keep_bf16`); (g′) + fp8 on that one too (every token linear); (g″) + fast accumulation. fp8 is in
    place, so the cases run in this order."""
    from diffsynth_edit.speedups import quantize_dit_fp8

    kept = ["img_mlp.net.0.proj"]
    for label, fp8, fast, keep in (("(g) as (d), speed_up(compile_blocks)", False, False, []),
                                   (f"(gk) as (d), compile + fp8 linears except {kept[0]}", True, False, kept),
                                   ("(g′) as (d), compile + fp8 linears", True, False, []),
                                   ("(g″) as (g′), fast fp8 accumulation", True, True, [])):
        torch._dynamo.reset()  # each case compiles twice (two prompt lengths): four cases would pass dynamo's
        # recompile limit of 8 per code object, and the last one would run eager
        if fp8 and editor.fp8 and not keep and editor.fp8_keep_bf16:
            quantize_dit_fp8(editor.pipe.dit)  # the kept linears too (the others are fp8 already)
            editor.fp8_keep_bf16 = ()
        editor.speed_up(compile_blocks=True, fp8=fp8, fp8_fast_accum=fast if fp8 else None, fp8_keep_bf16=keep)
        t0 = time.perf_counter()
        for _ in range(2):  # both prompt lengths compile (the second makes the graph dynamic in the length)
            editor.predict(prep, inp.x.float(), None, 1000.0, args.cfg)
        timer.sync()
        warm = time.perf_counter() - t0
        med, times, _, peak = timer.run(lambda: editor.sample(prep, settings)[0], 0, 1)
        add(f"{label}, {args.steps}-step CFG {args.cfg:g}", med, times, peak, f"compile warm-up {warm:.0f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    settled = settle_args(args)
    if settled is None:
        return 2
    device, dtype = settled
    tiny = args.tiny
    timer = Timer(device)
    t_build = time.perf_counter()
    dit = build_tiny_dit(device, dtype) if tiny else build_full_dit(device, dtype)
    timer.sync()
    build_s = time.perf_counter() - t_build
    n_params = sum(p.numel() for p in dit.parameters())
    text_dim = dit.txt_in.in_features
    inp = make_inputs(args, dit, device, dtype, text_dim)
    ste = trained_like_ste(dit, device)
    tokens_main = (args.size // 16) ** 2
    tokens_sub = (args.sub // 16) ** 2
    rows = []
    add = functools.partial(add_row, rows)
    with torch.no_grad():
        diff, same_activation_diff = forward_cases(dit, ste, inp, args, timer, add, dtype)
        if not args.skip_loops:
            loop_cases(dit, ste, inp, args, timer, add, device, dtype)

    info = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffsynth": _version("diffsynth"),
        "dtype": str(dtype).replace("torch.", ""), "dit": "tiny" if tiny else "QwenImageDiT (2511, random)",
        "params": n_params, "build_s": build_s, "size": args.size, "sub": args.sub,
        "tokens": {"main": tokens_main, "edit": tokens_main, "sub": tokens_sub, "text": args.prompt_tokens,
                   "negative_text": args.nega_tokens},
        "max_abs_diff_a_b": diff, "rows": rows,
    }
    md = to_markdown(info, args)
    print()
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dit_forward.md").write_text(md)
        (out / "dit_forward.json").write_text(json.dumps(info, indent=2))
        print(f"wrote {out / 'dit_forward.md'}")
    if tiny and same_activation_diff != 0.0:
        print(f"error: upstream and plain bridge forward (same activation) differ by {same_activation_diff}",
              file=sys.stderr)
        return 1
    return 0


def _blank(w, h):
    from PIL import Image

    return Image.new("RGB", (w, h), "white")


def _centre_box(args, Box):
    off = (args.size - args.sub) // 2 // 16 * 16
    return Box(off, off + args.sub, off, off + args.sub)


def _version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - e.g. a package copied without its metadata
        return "unknown (no package metadata)"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def to_markdown(info, args) -> str:
    t = info["tokens"]
    lines = [
        "# DiT forward benchmark",
        "",
        f"- device: **{info['device']}**; torch {info['torch']} (CUDA {info['cuda']}); diffsynth {info['diffsynth']}",
        f"- model: {info['dit']}, {_count(info['params'])} params, {info['dtype']}, built in "
        f"{info['build_s']:.1f} s",
        f"- inputs: {args.size}² target + one {args.size}² reference ({t['main']} + {t['edit']} image tokens), "
        f"{t['text']} text tokens (negative {t['negative_text']}); bridge mode adds a {args.sub}² sub box "
        f"({t['sub']} tokens); zero_cond_t on",
        f"- single forwards: torch.no_grad, {args.warmup} warm-ups, median of {args.repeats}; {args.steps}-step "
        f"loops: one timed run each",
        f"- outputs of (a) and (b): max abs diff {info['max_abs_diff_a_b']:.3g}",
        "",
        "| case | median s | min s | runs | peak GiB | note |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in info["rows"]:
        peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['case']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['runs']} | {peak} | {r['note']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
