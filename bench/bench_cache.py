#!/usr/bin/env python
"""Phase-1 cache throughput: the workspace cache vs upstream diffsynth's `sft:data_process` on the same samples.

    python bench/bench_cache.py                 # GPU: full-size text encoder (8.3 B) + VAE, random bf16 weights
    python bench/bench_cache.py --tiny          # CPU smoke test with the tiny models
    OUT=/some/dir python bench/bench_cache.py   # also writes $OUT/cache_bench.md

Models: diffsynth's `QwenImageTextEncoder()` and `QwenImageVAE()` are built on the meta device, materialised on the
GPU with `to_empty` and filled with small normal values (norm weights 1, biases 0) in bf16; the VAE's latent
mean/std constants are restored. Tokenizer (`--tokenizer`): Qwen's real BPE ranks when `bench/fetch_qwen_tokenizer.sh`
has fetched them (real text token counts and special ids), else the tiny byte-level tokenizer
(`diffsynth_edit.tiny.build_tokenizer`) with the text encoder's special token ids set to its ids (TEXT token counts
about 3-4x the real Qwen BPE counts: the prompt side is heavier than in reality). The image processor uses the real
Qwen2-VL settings (patch 14, merge 2, temporal 2, min_pixels 56², max_pixels 28²·1280), and both paths resize
reference images to 384² for the VL encoder, so VISION token counts are realistic.

Samples: N synthetic 1024² samples (source, target, one 1024² reference, a mask) written as PNG, plus one warm-up
sample that is excluded from the statistics.

Paths timed per sample (median over N):
- upstream: what diffsynth 2.1.12's `launch_data_process_task` does per sample for Qwen-Image-Edit
  (train.py `get_pipeline_inputs` with `edit_image` as extra input, `edit_image_auto_resize=True`, `cfg_scale=1`,
  every `pipe.units` entry through `pipe.unit_runner`, then `torch.save((inputs_shared, inputs_posi, inputs_nega))`),
  image loading included (upstream's dataloader loads in workers; the load time is also shown separately);
- workspace, sequential: hash + read/resize + encode (target, source, reference, sub crop, white crop; prompt and
  empty prompt: one text-encoder pass + the negative's few tail tokens on the prompt's KV cache) + atomic
  safetensors write, one sample at a time;
- workspace `run_cache` end to end (worker processes for reading on CUDA, a writer thread, the sub crops on a side
  thread, `--batch-sizes` samples per device batch): samples/s over all samples, one run per batch size.
Instructions differ in length between samples (0-7 optional sentences), as in real edit datasets. `--fresh-data`
gives every run new samples (new crop sizes); `--trace` times each device call (synchronised) with its shape and
whether the process had seen it, and lists the device loop's idle gaps; `--skip-sequential` drops the second path.
The workspace does more work per sample than upstream (the negative prompt's tail tokens, the sub-crop latents and
the mask), and stores no pickled PIL images; the negative is stored as prefix length + tail (cache format 2).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from harness import build_full_pipeline, build_tiny_pipeline, sync, tokenizer_choice


# ---- data ------------------------------------------------------------------------------------------------------------
def _scene(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth, photo-like synthetic image (gradients, shapes, light noise): PNG sizes like real photos."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([a * x + b * y + c for a, b, c in rng.uniform(-80, 80, (3, 3)) + [0, 0, 128]], -1)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 16, size // 3, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


# Instructions in real edit datasets differ in length; padded batches then meet new token lengths.
_DETAILS = ["Keep the lighting of the room and the shadows on the table unchanged.",
            "The vase should be slightly transparent with visible water inside.",
            "Use warm colours for the flowers, mostly orange and yellow tulips.",
            "Do not change anything outside the marked region.",
            "Match the perspective and the scale of the surrounding objects.",
            "Add a soft reflection of the window on the glass.",
            "The stems should be visible through the glass and slightly bent."]


def make_samples(root: Path, n: int, size: int, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        src = _scene(rng, size)
        ref = _scene(rng, size)
        mask = Image.new("L", (size, size), 0)
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        w, h = (int(v) for v in rng.integers(size // 5, size // 2, 2))
        ImageDraw.Draw(mask).ellipse([x0, y0, x0 + w, y0 + h], fill=255)
        tgt = Image.composite(_scene(rng, size), src, mask)
        names = {k: f"{k}_{i:03d}.png" for k in ("source", "target", "ref", "mask")}
        for k, im in (("source", src), ("target", tgt), ("ref", ref), ("mask", mask)):
            im.save(root / names[k], compress_level=1)
        extra = " ".join(_DETAILS[j] for j in rng.permutation(len(_DETAILS))[:int(rng.integers(0, len(_DETAILS) + 1))])
        entries.append({"prompt": f"Picture 1 is the image to modify. Replace the object in the marked region with "
                                  f"a glass vase of flowers that matches picture 2, sample {i}. {extra}".strip(),
                        "image": names["target"], "edit_image": [names["source"], names["ref"]],
                        "back_mask": names["mask"], "id": f"b{i:03d}", "edit_type": "replace"})
    path = root / "dataset.json"
    path.write_text(json.dumps(entries, indent=1))
    return path


# ---- the two paths ---------------------------------------------------------------------------------------------------
def upstream_sample(pipe, entry: dict, root: Path, out: Path, zero_cond_t: bool = True) -> tuple[float, float, int]:
    """diffsynth sft:data_process for one sample; (seconds incl. loading, loading seconds, bytes written)."""
    t0 = time.perf_counter()
    image = Image.open(root / entry["image"]).convert("RGB")
    edit = [Image.open(root / p).convert("RGB") for p in entry["edit_image"]]
    t_load = time.perf_counter() - t0
    # upstream train.py QwenImageTrainingModule.get_pipeline_inputs (+ extra input edit_image)
    inputs_posi = {"prompt": entry["prompt"]}
    inputs_nega = {"negative_prompt": ""}
    inputs_shared = {"cfg_scale": 1, "rand_device": pipe.device, "use_gradient_checkpointing": True,
                     "use_gradient_checkpointing_offload": False, "edit_image_auto_resize": True,
                     "zero_cond_t": zero_cond_t, "tiled": False, "tile_size": 128, "tile_stride": 64,
                     "input_image": image, "height": image.size[1], "width": image.size[0], "edit_image": edit}
    inputs = (inputs_shared, inputs_posi, inputs_nega)
    with torch.no_grad():
        for unit in pipe.units:
            inputs = pipe.unit_runner(unit, pipe, *inputs)
    torch.save(inputs, out)
    sync(str(pipe.device))
    return time.perf_counter() - t0, t_load, out.stat().st_size


def workspace_sample(pipe, item, encoder, writer, settings_fp: str, max_pixels: int) -> float:
    from diffsynth_edit.cache.samples import prepare_sample
    from diffsynth_edit.cache.manifest import sample_hash

    t0 = time.perf_counter()
    item.hash = sample_hash(settings_fp, item.prompt, item.input_files(), item.id, item.edit_type)
    prepared = prepare_sample(item, max_pixels, pipe)  # + uint8 pixels and processor outputs, as run_cache's readers
    tensors = encoder.encode([prepared])[0]
    writer._write(item, tensors)  # synchronous: the same atomic safetensors write run_cache does in its thread
    sync(str(pipe.device))
    return time.perf_counter() - t0


class DeviceTrace:
    """`--trace`: every VAE call, white-image encode and text-encoder call of `SampleEncoder`, synchronised and timed,
    with its input shape and whether the process had seen that shape before (new shapes are what a first run pays
    for)."""

    def __init__(self, device: str):
        self.device, self.calls, self.seen = device, [], set()
        import diffsynth_edit.encoding as encoding
        from diffsynth_edit.cache.encoder import SampleEncoder

        trace = self
        vae_encode, pairs = SampleEncoder._vae_encode, encoding.encode_prompt_pairs

        def timed_call(kind, shape, fn, *a):
            sync(trace.device)
            t = time.perf_counter()
            out = fn(*a)
            sync(trace.device)
            key = (kind, shape)
            trace.calls.append((kind, shape, key not in trace.seen, time.perf_counter() - t, t))
            trace.seen.add(key)
            return out

        def traced_vae(enc, pixels):
            return timed_call("vae", (len(pixels), *pixels[0].shape[1:]), vae_encode, enc, pixels)

        def traced_pairs(pipe, inputs):
            rows = [t for x in inputs for t in x[0][:2]]
            n_img = sum(0 if x[2] is None else len(x[2]) for x in inputs)
            return timed_call("text", (len(rows), max(len(t) for t in rows), n_img), pairs, pipe, inputs)

        SampleEncoder._vae_encode = traced_vae
        encoding.encode_prompt_pairs = traced_pairs

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls

    @staticmethod
    def gaps(runs: list[tuple[str, float, float, list]], min_gap: float = 0.5) -> list[str]:
        """Where the device loop did no device work for `min_gap` s or more: run start -> first call, between calls,
        last call -> run end (times from the run's start)."""
        lines = ["", f"Device-idle gaps of {min_gap} s or more per run (s from the run's start: gap):", ""]
        for label, t0, t1, calls in runs:
            marks = [(t0, t0)] + [(c[4], c[4] + c[3]) for c in calls] + [(t1, t1)]
            gaps = [(a_end - t0, b_start - a_end) for (_, a_end), (b_start, _) in zip(marks, marks[1:])
                    if b_start - a_end >= min_gap]
            lines.append(f"- {label}: {t1 - t0:.1f} s, {sum(c[3] for c in calls):.1f} s in device calls; gaps: "
                         + (", ".join(f"at {a:.1f}: {g:.1f}" for a, g in gaps) or "none"))
        return lines

    @staticmethod
    def table(runs: list[tuple[str, list]]) -> list[str]:
        lines = ["", "Device calls per run (`--trace`; synchronised; 'new': first call at that input shape in the "
                     "process):", "", "| run | kind | calls | new shapes | s in new-shape calls | s in seen-shape calls "
                     "| median new | median seen | slowest call |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | "
                     "---: | --- |"]
        med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        for label, calls in runs:
            for kind in ("vae", "text"):
                cs = [c for c in calls if c[0] == kind]
                if not cs:
                    continue
                new = [c[3] for c in cs if c[2]]
                old = [c[3] for c in cs if not c[2]]
                worst = max(cs, key=lambda c: c[3])
                lines.append(f"| {label} | {kind} | {len(cs)} | {len(new)} | {sum(new):.2f} | {sum(old):.2f} | "
                             f"{med(new):.3f} | {med(old):.3f} | {worst[3]:.3f} s at {worst[1]} |")
        return lines


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke test)")
    ap.add_argument("--n", type=int, default=None, help="timed samples (default 8; 3 with --tiny)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024; 128 with --tiny)")
    ap.add_argument("--tiny-meta", action="store_true", help="tiny model classes through the full-size build path "
                    "(meta device + to_empty + random init): CPU smoke test of that path")
    ap.add_argument("--device", default=None)
    ap.add_argument("--workers", default="auto", choices=("auto", "process", "thread"),
                    help="run_cache image preparation: worker processes or threads (auto: processes on CUDA)")
    ap.add_argument("--num-workers", type=int, default=4)
    ap.add_argument("--batch-sizes", default="4", help="run_cache batch sizes to time, comma-separated (e.g. 4,8,16)")
    ap.add_argument("--fresh-data", action="store_true",
                    help="each run_cache run on its own samples (other seeds: other mask boxes, so other crop shapes)")
    ap.add_argument("--no-fsync", action="store_true", help="run_cache without fsync per file")
    ap.add_argument("--skip-upstream", action="store_true", help="only the workspace paths")
    ap.add_argument("--profile", action="store_true", help="kernel/op table of one SampleEncoder.encode of 4 samples")
    ap.add_argument("--trace", action="store_true", help="time every device call of run_cache (synchronised: "
                    "slower), with its shape and whether the shape was new in the process")
    ap.add_argument("--skip-sequential", action="store_true", help="no one-sample-at-a-time workspace path")
    ap.add_argument("--no-cudnn-sdp", action="store_true", help="torch.backends.cuda.enable_cudnn_sdp(False)")
    ap.add_argument("--tokenizer", default="auto", choices=("auto", "qwen", "bytes"),
                    help="qwen: Qwen's real BPE ranks (bench/fetch_qwen_tokenizer.sh); bytes: the tiny byte-level "
                         "tokenizer (~3-4x the real text token counts); auto: qwen if fetched")
    ap.add_argument("--workdir", default=None, help="where samples and outputs go (default: a temp dir)")
    return ap.parse_args(argv)


def upstream_timings(pipe, entries: list[dict], root: Path, up_dir: Path) -> tuple[list, list, list]:
    """Upstream's `sft:data_process` per sample: (seconds, of which image loading, bytes), the first left out."""
    up_dir.mkdir(exist_ok=True)
    up_times, up_loads, up_bytes = [], [], []
    for i, e in enumerate(entries):
        t, tl, b = upstream_sample(pipe, e, root, up_dir / f"{i}.pth")
        if i > 0:
            up_times.append(t), up_loads.append(tl), up_bytes.append(b)
    return up_times, up_loads, up_bytes


def sequential_workspace(pipe, dataset: Path, work: Path, dtype_name: str, max_pixels: int, args, device: str
                         ) -> tuple[list, list, str]:
    """The workspace cache one sample at a time (hash + load + encode + atomic write): (seconds, bytes) per sample,
    the first left out, and the --profile table."""
    from diffsynth_edit.cache.config import TORCH_DTYPES, CacheConfig
    from diffsynth_edit.cache.encoder import SampleEncoder
    from diffsynth_edit.cache.manifest import CacheSettings
    from diffsynth_edit.cache.samples import load_items
    from diffsynth_edit.cache.writer import _Writer

    cfg = CacheConfig(dataset=dataset, cache_dir=work / "cache_seq", dtype=dtype_name, max_pixels=max_pixels,
                      progress=False)
    cfg.validate()
    items = load_items(cfg)
    settings = CacheSettings(cfg.variant, max_pixels, dtype_name, "bench-random-weights")
    encoder = SampleEncoder(pipe, TORCH_DTYPES[dtype_name], batch_size=4)
    ws_bytes_by_id: dict[str, int] = {}
    writer = _Writer(cfg.cache_dir, settings, lambda item, rec, err: ws_bytes_by_id.__setitem__(
        item.id, rec["bytes"] if rec else -1))
    ws_times = []
    for i, item in enumerate([] if args.skip_sequential else items):
        t = workspace_sample(pipe, item, encoder, writer, settings.fingerprint(), max_pixels)
        if i > 0:
            ws_times.append(t)
    writer.close()
    encoder.close()
    ws_bytes = [ws_bytes_by_id[it.id] for it in items[1:]] if ws_times else [0]
    ws_times = ws_times or [float("nan")]
    profile_text = ""
    if args.profile and device.startswith("cuda"):
        from torch.profiler import ProfilerActivity, profile

        from diffsynth_edit.cache.samples import prepare_sample

        prepared = [prepare_sample(it, max_pixels, pipe) for it in items[1:5]]
        encoder.encode(prepared)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            encoder.encode(prepared)
            sync(device)
            wall = time.perf_counter() - t0
        avg = prof.key_averages()
        profile_text = (f"\n\nOne `SampleEncoder.encode` of 4 prepared samples: {wall:.3f} s wall\n\n```\n"
                        + avg.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
                        + "\n" + avg.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
                        + "\n```")
    return ws_times, ws_bytes, profile_text


def end_to_end_runs(pipe, dataset: Path, work: Path, n: int, size: int, dtype_name: str, max_pixels: int, args,
                    device: str) -> tuple[list, DeviceTrace | None, list]:
    """`run_cache` once per --batch-sizes entry, each in a fresh folder after a 1-sample warm-up run: (config,
    summary, samples/s, bytes/sample) per run, the device trace and its runs."""
    from diffsynth_edit.cache.config import CacheConfig
    from diffsynth_edit.cache.encode import run_cache

    e2e = []
    trace = DeviceTrace(device) if args.trace else None
    traced_runs = []
    for run, bs in enumerate(int(b) for b in args.batch_sizes.split(",")):
        run_data = make_samples(work / f"data_{run}", n + 1, size, seed=1000 * run) if args.fresh_data and run else dataset
        cfg_e2e = CacheConfig(dataset=run_data, cache_dir=work / f"cache_e2e_{run}_{bs}", dtype=dtype_name,
                              max_pixels=max_pixels, batch_size=bs, num_workers=args.num_workers,
                              workers=args.workers, fsync=not args.no_fsync, progress=False)
        cfg_e2e.validate()
        # warm-up run on the first sample only: starts the worker processes (kept for the timed run; a real run
        # pays their start, a few seconds, once)
        warm = CacheConfig(**{**vars(cfg_e2e), "cache_dir": work / f"cache_warm_{run}_{bs}", "limit": 1})
        run_cache(warm, pipe=pipe, log=lambda s: None)
        if trace:
            trace.take()  # the warm-up's calls
        t_run = time.perf_counter()
        summary = run_cache(cfg_e2e, pipe=pipe, log=lambda s: None)
        if trace:
            traced_runs.append((f"{run} (batch {bs}{', fresh data' if run_data is not dataset else ''})",
                                t_run, time.perf_counter(), trace.take()))
        e2e.append((cfg_e2e, summary, summary.encoded / summary.encode_seconds,
                    summary.bytes_on_disk / max(1, summary.encoded)))
    return e2e, trace, traced_runs


def report_lines(args, device: str, dtype: torch.dtype, size: int, n: int, t_build: float, up: tuple, ws: tuple,
                 e2e: list, trace, traced_runs: list) -> list[str]:
    up_times, up_loads, up_bytes = up
    ws_times, ws_bytes = ws
    med = statistics.median
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    rows = [
        ("upstream diffsynth `sft:data_process` (units + `torch.save`, incl. image load)", med(up_times),
         1 / med(up_times), med(up_bytes)),
        ("workspace cache, sequential (hash + load + encode + atomic write)", med(ws_times), 1 / med(ws_times),
         med(ws_bytes)),
        *[(f"workspace `run_cache` end to end ({c.workers} workers x{c.num_workers}, batch {c.batch_size})",
           1 / rate, rate, nbytes) for c, _, rate, nbytes in e2e],
    ]
    lines = [
        f"### Cache phase-1 benchmark ({'tiny models' + (' (meta build)' if args.tiny_meta else '') if args.tiny else 'full-size TE 8.3 B + VAE, random weights'}, "
        f"{dev_name}, {str(dtype).removeprefix('torch.')}, {size}² target + source + 1 reference + mask, N={n})",
        "",
        "| path | median s/sample | samples/s | MB/sample |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {t:.3f} | {r:.2f} | {b / 1e6:.2f} |" for name, t, r, b in rows],
        "",
        f"- upstream image loading (part of its time; its dataloader workers would hide it): median "
        f"{med(up_loads):.3f} s/sample",
        "- workspace per sample: prompt and empty prompt as two rows of one text-encoder call per batch of samples "
        "(`encode_prompt_pairs`; the shared prefix stored once; vision attention one call per layer), VAE "
        "(single-frame convs as 2D) of target, source, "
        "reference and sub crop (white crop once per shape); cudnn.benchmark in run_cache only; "
        "upstream: 1 text-encoder pass (cfg_scale=1 reuses it), "
        "VAE of target, source and reference, plus pickled PIL images and the noise tensor.",
        ("- text tokens from Qwen's real BPE ranks (`bench/qwen_tokenizer.py`)" if tokenizer_choice(args.tokenizer)
         == "qwen" and not args.tiny else "- text tokens come from a byte-level tokenizer (about 3-4x the real BPE "
         "count)") + "; vision tokens are real (384² references, patch 14, merge 2).",
        f"- model build {t_build:.1f} s (not timed above); warm-up sample excluded (run_cache: worker start "
        f"excluded by a 1-sample warm-up run; all N+1 samples timed); torch {torch.__version__}.",
    ]
    names = list(dict.fromkeys(n for _, summ, _, _ in e2e for n in summ.stages))
    lines += ["", "run_cache stages, s/sample, one column per run in run order (`prep.*`: worker time, overlapped with "
                  "the device loop; `wait for prepared`: the device loop idle, waiting for a sample):", "",
              "| stage | " + " | ".join(f"batch {c.batch_size}" for c, _, _, _ in e2e) + " |",
              "| --- |" + " ---: |" * len(e2e),
              *[f"| {n} | " + " | ".join(f"{summ.stages.get(n, 0.0) / max(1, summ.encoded):.4f}"
                                         for _, summ, _, _ in e2e) + " |" for n in names]]
    if trace:
        lines += DeviceTrace.table([(r[0], r[3]) for r in traced_runs]) + DeviceTrace.gaps(traced_runs)
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    n = args.n or (3 if args.tiny else 8)
    size = args.size or (128 if args.tiny else 1024)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny_meta:
        args.tiny = True
    dtype = torch.float32 if (args.tiny and device == "cpu") else torch.bfloat16
    os.environ.setdefault("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = tempfile.TemporaryDirectory(prefix="bench_cache_")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if args.tiny_meta:
        from diffsynth_edit.tiny import TinyQwenImageTextEncoder, TinyQwenImageVAE

        pipe = build_full_pipeline(device, dtype, TinyQwenImageTextEncoder, TinyQwenImageVAE, tokenizer="bytes")
    elif args.tiny:
        pipe = build_tiny_pipeline(work / "tiny_models", device, dtype)
    else:
        pipe = build_full_pipeline(device, dtype, tokenizer=args.tokenizer)
    pipe.scheduler.set_timesteps(1000, training=True)  # as upstream's switch_pipe_to_training_mode
    t_build = time.perf_counter() - t0
    dataset = make_samples(work / "data", n + 1, size)
    entries = json.loads(dataset.read_text())

    from diffsynth_edit.atomic import atomic_path  # noqa: F401  (the writer uses it)

    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    max_pixels = 1024 * 1024
    up = upstream_timings(pipe, [] if args.skip_upstream else entries, dataset.parent, work / "upstream")

    # the workspace's loader (`load_pipeline`) runs single-frame VAE convs as 2D; upstream above ran diffsynth's own
    # and the vision tower's windowed attention in one call per layer
    from diffsynth_edit.speedups import exact_speedups

    exact_speedups(pipe)
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    ws_times, ws_bytes, profile_text = sequential_workspace(pipe, dataset, work, dtype_name, max_pixels, args, device)
    e2e, trace, traced_runs = end_to_end_runs(pipe, dataset, work, n, size, dtype_name, max_pixels, args, device)
    if args.skip_upstream:
        up = [float("nan")], [float("nan")], [0]
    lines = report_lines(args, device, dtype, size, n, t_build, up, (ws_times, ws_bytes), e2e, trace, traced_runs)
    table = "\n".join(lines) + profile_text
    print(table)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "cache_bench.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
