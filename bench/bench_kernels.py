#!/usr/bin/env python
"""Component timings behind the cache and LBM latency work (GPU, full-size modules, random weights).

    python bench/bench_kernels.py            # GPU
    python bench/bench_kernels.py --tiny     # CPU smoke test

(A) VAE encode / decode of 1024² images: diffsynth's causal-3D convs vs `speedups.single_frame_vae` (max diff).
(B) one `bridge_forward` at the LBM edit shape (1024² main, 512² sub with STE, one 1024² edit image, 256 text
    tokens, zero_cond_t): SDPA's default backend order vs cuDNN first, eager vs compiled blocks, bf16 vs fp8
    linears (relative error of the prediction vs the eager bf16 one).
Writes $OUT/kernels.md.
"""
from __future__ import annotations

import argparse
import copy

import torch

from harness import (build_full_dit, build_full_pipeline, build_tiny_dit, build_tiny_pipeline, init_random_by_name_,
                     sync, timed, write_report)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def compile_blocks(dit, on: bool) -> None:
    """Every DiT block compiled (torch.compile) or back to eager."""
    for block in dit.transformer_blocks:
        if on:
            block.compile()
        else:
            block._compiled_call_impl = None
    torch._dynamo.reset()


def vae_section(a, device: str, dtype: torch.dtype, size: int, box: int) -> list[str]:
    """(A): the VAE, diffsynth's against the single-frame 2D convolutions (+ the variants table)."""
    from diffsynth.models.qwen_image_vae import QwenImageVAE

    from diffsynth_edit import speedups

    lines: list[str] = []

    with torch.device(device):
        ref = QwenImageVAE(base_dim=8, num_res_blocks=1) if a.tiny else QwenImageVAE()
    ref = ref.to(dtype).eval().requires_grad_(False)
    init_random_by_name_(ref)
    fast = copy.deepcopy(ref)
    patched = speedups.single_frame_vae(fast)
    lines += [f"(A) VAE, {patched} convs run as 2D", "", "| case | diffsynth | single-frame 2D | speed-up | max abs diff |",
              "| --- | ---: | ---: | ---: | ---: |"]
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for batch in (1, 4):
            x = (torch.rand(batch, 3, size, size, generator=g, device=device) * 2 - 1).to(dtype)
            t_ref, lat = timed(lambda: ref.encode(x), device, 2, a.repeats)
            t_fast, lat2 = timed(lambda: fast.encode(x), device, 2, a.repeats)
            lines.append(f"| encode {batch}×{size}² | {t_ref * 1e3:.1f} ms | {t_fast * 1e3:.1f} ms | "
                         f"{t_ref / t_fast:.2f}x | {(lat - lat2).abs().max().item():.2e} |")
        for s in (size, box):
            z = torch.randn(1, 16, s // 8, s // 8, generator=g, device=device).to(dtype)
            t_ref, img = timed(lambda: ref.decode(z), device, 2, a.repeats)
            t_fast, img2 = timed(lambda: fast.decode(z), device, 2, a.repeats)
            lines.append(f"| decode 1×{s}² | {t_ref * 1e3:.1f} ms | {t_fast * 1e3:.1f} ms | "
                         f"{t_ref / t_fast:.2f}x | {(img - img2).abs().max().item():.2e} |")
    if a.vae_variants:
        lines += vae_variants(fast, device, dtype, size, a.repeats)
    del ref, fast
    lines.append("")
    return lines


def dit_section(a, device: str, dtype: torch.dtype, size: int, box: int) -> list[str]:
    """(B): one bridge_forward, eager / compiled blocks / fp8 linears, SDPA default order or cuDNN first."""
    from diffsynth_edit import speedups
    from diffsynth_edit.bridge_dit import DiTInputs, bridge_forward
    from diffsynth_edit.ste import STE

    lines: list[str] = []

    dit = build_tiny_dit(device, dtype) if a.tiny else build_full_dit(device, dtype)
    text_dim = dit.txt_in.in_features
    ste = STE.for_dit(dit).to(device=device, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    lat = lambda h: torch.randn(1, 16, h // 8, h // 8, generator=g).to(device, dtype)  # noqa: E731
    t0 = (box // 2) // 16
    inputs = DiTInputs(latents=lat(size), timestep=torch.tensor([750.0], device=device),
                       prompt_emb=(torch.randn(1, 256, text_dim, generator=g) * 0.5).to(device, dtype),
                       prompt_emb_mask=torch.ones(1, 256, dtype=torch.long, device=device),
                       edit_latents=[lat(size)], sub_latents=lat(box),
                       subyx=torch.tensor([[t0, t0 + box // 16, t0, t0 + box // 16]], device=device))

    def forward():
        with torch.no_grad():
            return bridge_forward(dit, inputs, ste=ste, zero_cond_t=True)[0]

    def cudnn_forward():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH], set_priority=True):
            return forward()

    rows, profiles = [], []
    t, base = timed(forward, device, 2, a.repeats)
    rows.append(("eager, SDPA default order", t, 0.0))
    t, out = timed(cudnn_forward, device, 2, a.repeats)
    rows.append(("eager, cuDNN attention first", t, rel_err(out, base)))

    if a.profile and device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        for label, fn in (("default order", forward), ("cuDNN first", cudnn_forward)):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                sync(device)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70)
            profiles.append(f"Kernels of one eager forward, SDPA {label}:\n\n```\n{table}\n```")

    if not a.skip_compile:
        compile_blocks(dit, True)
        t, out = timed(cudnn_forward, device, 2, a.repeats)
        rows.append(("compiled blocks, cuDNN attention first", t, rel_err(out, base)))
        t, out = timed(forward, device, 1, a.repeats)
        rows.append(("compiled blocks, SDPA default order", t, rel_err(out, base)))
        compile_blocks(dit, False)
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        n = speedups.quantize_dit_fp8(dit)
        t, out = timed(cudnn_forward, device, 2, a.repeats)
        rows.append((f"eager, cuDNN attention first, fp8 linears ({n})", t, rel_err(out, base)))
        if not a.skip_compile:
            compile_blocks(dit, True)
            t, out = timed(cudnn_forward, device, 2, a.repeats)
            rows.append((f"compiled blocks, cuDNN attention first, fp8 linears", t, rel_err(out, base)))
    n_tok = (size // 16) ** 2 * 2 + (box // 16) ** 2
    lines += [f"(B) one bridge_forward: {n_tok} image tokens + 256 text tokens, STE routed, zero_cond_t", "",
              "| case | s / forward | rel. error vs first row |", "| --- | ---: | ---: |"]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.2e} |" for r in rows]
    if device == "cuda":
        lines.append(f"\npeak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    lines += [""] + profiles
    del dit, ste
    if device == "cuda":
        torch.cuda.empty_cache()
    return lines


def sdpa_section(a, device: str, dtype: torch.dtype, size: int, box: int) -> list[str]:
    """(D): one attention call of the full sequence on each SDPA backend (CUDA only)."""
    lines: list[str] = []
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_tok = (size // 16) ** 2 * 2 + (box // 16) ** 2 + 256
    q, k, v = (torch.randn(1, 24, n_tok, 128, device=device, dtype=dtype) for _ in range(3))
    lines += ["", f"(D) one attention call, [1, 24, {n_tok}, 128] bf16", "", "| backend | ms | TFLOP/s |",
              "| --- | ---: | ---: |"]
    flops = 4 * n_tok * n_tok * 128 * 24
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                t, _ = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, 3,
                             a.repeats * 4)
            lines.append(f"| {backend.name} | {t * 1e3:.2f} | {flops / t / 1e12:.0f} |")
        except RuntimeError as e:
            lines.append(f"| {backend.name} | unavailable: {str(e)[:80]} | |")
    del q, k, v
    return lines


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--skip-dit", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-te", action="store_true")
    p.add_argument("--skip-sdpa", action="store_true")
    p.add_argument("--vae-variants", action="store_true",
                   help="single-frame VAE encode: + channels_last, + torch.compile, and a kernel table")
    p.add_argument("--te-compile", action="store_true", help="text encoder breakdown also with compiled layers")
    p.add_argument("--profile", action="store_true", help="CUDA kernel table of one eager forward")
    a = p.parse_args()
    device = "cpu" if a.tiny else "cuda"
    dtype = torch.float32 if a.tiny else torch.bfloat16
    size, box = (64, 32) if a.tiny else (1024, 512)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    lines = [f"Card: {name}; torch {torch.__version__}; bf16; median of {a.repeats} after warm-ups", ""]

    if not a.skip_vae:
        lines += vae_section(a, device, dtype, size, box)
    if not a.skip_dit:
        lines += dit_section(a, device, dtype, size, box)
    if not a.skip_sdpa and device == "cuda":
        lines += sdpa_section(a, device, dtype, size, box)
    if not a.skip_te:
        lines += te_breakdown(a, device, dtype, size)
    write_report("\n".join(lines), "kernels.md")


def vae_variants(vae, device: str, dtype: torch.dtype, size: int, repeats: int) -> list[str]:
    """The single-frame VAE encode of 1 and 4 images: as is, with channels_last weights and input, compiled."""
    g = torch.Generator(device=device).manual_seed(1)
    xs = {b: (torch.rand(b, 3, size, size, generator=g, device=device) * 2 - 1).to(dtype) for b in (1, 4)}
    lines = ["", "| single-frame encode variant | 1 image | 4 images | max abs diff vs plain |", "| --- | ---: | ---: | ---: |"]
    with torch.no_grad():
        want = {b: vae.encode(x) for b, x in xs.items()}
        base = {b: timed(lambda: vae.encode(x), device, 2, repeats)[0] for b, x in xs.items()}
        lines.append(f"| plain | {base[1] * 1e3:.1f} ms | {base[4] * 1e3:.1f} ms | 0 |")
        if device == "cuda":
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                vae.encode(xs[1])
                sync(device)
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        for label, make in (("channels_last", lambda: _channels_last(copy.deepcopy(vae))),
                            ("torch.compile(encoder), static shapes", lambda: _compiled_encoder(copy.deepcopy(vae))),
                            ("`speedups.compile_vae` (dynamic shapes, as the cache runs it)",
                             lambda: _compiled_encoder(copy.deepcopy(vae), dynamic=True))):
            try:
                v = make()
                cl = label == "channels_last"
                fn = (lambda x: v.encode(x.contiguous(memory_format=torch.channels_last))) if cl else v.encode
                t = {b: timed(lambda: fn(x), device, 3, repeats)[0] for b, x in xs.items()}
                diff = max((fn(x) - want[b]).abs().max().item() for b, x in xs.items())
                lines.append(f"| {label} | {t[1] * 1e3:.1f} ms | {t[4] * 1e3:.1f} ms | {diff:.2e} |")
                del v
            except Exception as e:  # an experiment: report, do not stop the bench
                lines.append(f"| {label} | failed: {type(e).__name__}: {str(e)[:120]} | | |")
    if device == "cuda":
        lines += ["", "Kernels of one plain 1-image encode:", "", "```", table, "```"]
    return lines


def _channels_last(vae):
    """Conv weights in channels-last layouts (the 2D slice of a 5D channels_last_3d weight is channels_last)."""
    for p in vae.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
        elif p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    return vae


def _compiled_encoder(vae, dynamic: bool = False):
    from diffsynth_edit.speedups import compile_vae

    if dynamic:
        compile_vae(vae, encoder=True)
    else:
        vae.encoder.compile()
    return vae


def te_breakdown(a, device: str, dtype: torch.dtype, size: int) -> list[str]:
    """Where a cache sample's prompt encoding goes: CPU processor, vision tower, language model (+ negative tail)."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from diffsynth_edit import encoding

    pipe = build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny", device, dtype) if a.tiny else \
        build_full_pipeline(device, dtype, tokenizer="auto")
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(size, size, 3, generator=rng) * 255).byte().numpy()) for _ in range(2)]
    prompt = "Picture 1 is the image to modify. Replace the object in the masked region with a red ceramic vase."
    inputs = encoding.prompt_inputs(pipe, [prompt, ""], images)
    t_proc, _ = timed(lambda: encoding.prompt_inputs(pipe, [prompt, ""], images), "cpu", 1, a.repeats)
    te = pipe.text_encoder
    pv, grid = inputs[1].to(device), inputs[2].to(device)
    with torch.no_grad():
        t_vis, _ = timed(lambda: encoding._image_embeds(te.model, pv, grid), device, 2, a.repeats)
        x = inputs[0][0][None].to(device)
        emb = encoding._inputs_embeds(te, x, pv, grid, 1)
        t_lm, _ = timed(lambda: te.model(inputs_embeds=emb, attention_mask=torch.ones_like(x), use_cache=True,
                                         output_hidden_states=True, return_dict=True), device, 2, a.repeats)
        t_pair, _ = timed(lambda: encoding.encode_prompt_pair(pipe, prompt, images, inputs=inputs), device, 2,
                          a.repeats)
    out = ["", f"(C) prompt encoding of one sample: 2 images of {size}², {len(inputs[0][0])} tokens "
               f"(vision grid {grid.tolist()})", "", "| part | ms |", "| --- | ---: |",
           f"| processor (CPU, prompt + negative) | {t_proc * 1e3:.1f} |",
           f"| vision tower | {t_vis * 1e3:.1f} |", f"| language model, prompt pass | {t_lm * 1e3:.1f} |",
           f"| encode_prompt_pair (device part, inputs given) | {t_pair * 1e3:.1f} |"]
    if a.te_compile:
        want = encoding.encode_prompt(pipe, prompt, images[:1])[0]
        t_one, _ = timed(lambda: encoding.encode_prompt(pipe, prompt, images[:1]), device, 2, a.repeats)
        try:
            for block in te.model.visual.blocks:
                block.compile()
            for layer in te.model.language_model.layers:
                layer.compile()
            got = encoding.encode_prompt(pipe, prompt, images[:1])[0]
            t_comp, _ = timed(lambda: encoding.encode_prompt(pipe, prompt, images[:1]), device, 2, a.repeats)
            err = rel_err(got, want)
            out += [f"| encode_prompt, one image (editor path), eager | {t_one * 1e3:.1f} |",
                    f"| same, vision blocks + LM layers compiled (rel. err {err:.1e}) | {t_comp * 1e3:.1f} |"]
        except Exception as e:  # an experiment: report, do not stop the bench
            out.append(f"| compiled text encoder | failed: {type(e).__name__}: {str(e)[:150]} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
