#!/usr/bin/env python
"""What a NEW input shape costs on the device: the first call at a shape vs a repeat at the same shape.

    python bench/bench_new_shapes.py             # GPU, every variant in its own process (env vars act at start-up)
    python bench/bench_new_shapes.py --tiny      # CPU smoke test

Why: the cache meets a new VAE input shape with nearly every sample (the sub crop and its white image have the mask
box's size) and a new padded token length with nearly every text-encoder batch. Later `run_cache` runs over samples
already seen were 5-13x faster than the first one (bench/RESULTS.md, cache, session 3), so something is paid per
shape. Cases, K fresh shapes each (seeded):
  (A) VAE encode of one image whose size is a random mask box (sides multiples of 16, 128..640 px), single-frame 2D
      VAE as the cache runs it;
  (B) masked SDPA at the text encoder's language-model shape (8 rows = 4 samples x prompt/negative, 28 query / 4 kv heads,
      head dim 128, bf16) with a right-padding + causal boolean mask, as the batched prompt encoder calls it, for K
      new lengths 300..1200;
  (C) causal SDPA of one unpadded prompt at that shape (the editor's text encoder);
  (D) SDPA forward + backward at the DiT's shape (24 heads, 6000..12000 tokens: the sub crop changes the length).
Variants (one subprocess each; `--variants`): default; TORCH_CUDNN_V8_API_DISABLED=1 (convs through cuDNN's v7 API);
TORCH_CUDNN_USE_HEURISTIC_MODE_B=1; cuDNN SDPA backend off; cudnn.benchmark on; TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1.
Writes $OUT/new_shapes.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from harness import init_random_by_name_, sync, write_report


VARIANTS = {
    "default": ({}, []),
    "TORCH_CUDNN_V8_API_DISABLED=1": ({"TORCH_CUDNN_V8_API_DISABLED": "1"}, []),
    "TORCH_CUDNN_USE_HEURISTIC_MODE_B=1": ({"TORCH_CUDNN_USE_HEURISTIC_MODE_B": "1"}, []),
    "cuDNN SDPA off": ({}, ["--no-cudnn-sdp"]),
    "cudnn.benchmark on": ({}, ["--cudnn-benchmark"]),
    "TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1": ({"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}, []),
}
CASES = {"vae": "VAE encode, new size", "sdpa": "SDPA, padding mask, new length",
         "causal": "SDPA causal (TE, 1 prompt), new length", "dit": "SDPA DiT fwd+bwd, new length"}


def first_and_repeat(fn, device: str) -> tuple[float, float]:
    """Seconds of the first call and of a repeat (median of 3)."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t
    rep = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        sync(device)
        rep.append(time.perf_counter() - t)
    return first, statistics.median(rep)


def measure(tiny: bool, k: int, seed: int) -> dict:
    from diffsynth.models.qwen_image_vae import QwenImageVAE

    from diffsynth_edit.speedups import single_frame_vae

    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    g = torch.Generator().manual_seed(seed)
    with torch.device(device):
        vae = QwenImageVAE(base_dim=8, num_res_blocks=1) if tiny else QwenImageVAE()
    vae = vae.to(dtype).eval().requires_grad_(False)
    init_random_by_name_(vae)
    single_frame_vae(vae)
    out: dict = {case: [] for case in CASES}
    with torch.no_grad():
        warm = torch.rand(1, 3, 512, 512, device=device, dtype=dtype)  # a shape no case below uses (sides % 32 == 16)
        vae.encode(warm)
        lo, hi = (8, 40) if not tiny else (4, 10)
        for _ in range(k):
            h, w = (int(v) * 16 for v in torch.randint(lo, hi + 1, (2,), generator=g))
            h, w = h + (16 if h % 32 == 0 else 0), w + (16 if w % 32 == 0 else 0)  # never 512 (the warm-up)
            x = torch.rand(1, 3, h, w, generator=g).to(device, dtype) * 2 - 1
            out["vae"].append([h, w, *first_and_repeat(lambda: vae.encode(x), device)])
        del vae
        rows, hq, hkv, d = (8, 28, 4, 128) if not tiny else (2, 4, 2, 16)
        q0 = torch.randn(rows, hq, 64, d, device=device, dtype=dtype)
        torch.nn.functional.scaled_dot_product_attention(q0, q0, q0, is_causal=True)
        for _ in range(k):
            n = int(torch.randint(300, 1201, (1,), generator=g)) if not tiny else int(torch.randint(16, 64, (1,), generator=g))
            q = torch.randn(rows, hq, n, d, generator=g).to(device, dtype)
            kv = torch.randn(rows, hkv, n, d, generator=g).to(device, dtype)
            lengths = torch.randint(n // 2, n + 1, (rows,), generator=g)
            lengths[0] = n
            valid = torch.arange(n)[None, :] < lengths[:, None]  # right padding
            mask = (torch.ones(n, n, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None].to(device)
            kk = kv.repeat_interleave(hq // hkv, dim=1)  # as transformers' sdpa path repeats kv heads
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, kk, attn_mask=mask)  # noqa: E731
            out["sdpa"].append([n, *first_and_repeat(fn, device)])
        # the editor's text encoder: one prompt (1-2 rows, no padding), causal
        for _ in range(k):
            n = int(torch.randint(300, 1201, (1,), generator=g)) if not tiny else int(torch.randint(16, 64, (1,), generator=g))
            q = torch.randn(1, hq, n, d, generator=g).to(device, dtype)
            kk = torch.randn(1, hkv, n, d, generator=g).to(device, dtype).repeat_interleave(hq // hkv, dim=1)
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, kk, is_causal=True)  # noqa: E731
            out["causal"].append([n, *first_and_repeat(fn, device)])
    # the DiT: text + main + sub + edit tokens (the sub crop's size varies per sample), 24 heads, forward + backward
    h, d = (24, 128) if not tiny else (2, 16)
    for _ in range(k):
        n = int(torch.randint(6000, 12001, (1,), generator=g)) if not tiny else int(torch.randint(64, 256, (1,), generator=g))
        q, kk, v = (torch.randn(1, h, n, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))

        def fn():
            o = torch.nn.functional.scaled_dot_product_attention(q, kk, v)
            o.sum().backward()

        out["dit"].append([n, *first_and_repeat(fn, device)])
    return out


def child(args) -> int:
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    res = measure(args.tiny, args.k, args.seed)
    res["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print("RESULT " + json.dumps(res))
    return 0


def summarise(name: str, res: dict) -> list[str]:
    lines = []
    for case, label in CASES.items():
        rows = res[case]
        first = [r[-2] for r in rows]
        rep = [r[-1] for r in rows]
        extra = sum(f - r for f, r in zip(first, rep))
        lines.append(f"| {name} | {label} | {statistics.median(first) * 1e3:.1f} | {statistics.median(rep) * 1e3:.1f} "
                     f"| {max(first) * 1e3:.1f} | {extra / len(rows) * 1e3:.1f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--k", type=int, default=8, help="fresh shapes per case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="default,cuDNN SDPA off,TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1", help="comma-separated names of " + ", ".join(VARIANTS))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-cudnn-sdp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cudnn-benchmark", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    name = "CPU" if args.tiny else torch.cuda.get_device_name()
    lines = [f"New-shape cost, {name}, torch {torch.__version__}, K={args.k} fresh shapes per case "
             f"(ms; 'extra' = mean of first call minus repeat)", "",
             "| variant | case | first call, median | repeat, median | first call, max | extra per new shape |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for v in args.variants.split(","):
        env, flags = VARIANTS[v]
        cmd = [sys.executable, __file__, "--child", "--k", str(args.k), "--seed", str(args.seed), *flags]
        if args.tiny:
            cmd.append("--tiny")
        t = time.perf_counter()
        p = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        res_line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if p.returncode or res_line is None:
            lines.append(f"| {v} | failed (rc {p.returncode}): {p.stderr.strip().splitlines()[-1:]} | | | | |")
            continue
        res = json.loads(res_line[len("RESULT "):])
        lines += summarise(v, res)
        print(f"{v}: {time.perf_counter() - t:.1f} s, cudnn {res['cudnn']}; "
              + "; ".join(f"{c} {res[c]}" for c in CASES), file=sys.stderr)
    write_report("\n".join(lines), "new_shapes.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
