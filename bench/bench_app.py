#!/usr/bin/env python
"""Click-to-image time of the app vs a bare Editor call with the same settings.

    python bench/bench_app.py                      # CPU, tiny model (default 256x256, flow 8 steps, CFG 4)
    python bench/bench_app.py --gpu                # GPU: full-size 2511 DiT (random bf16 weights), 1024x1024
    python bench/bench_app.py --gpu --sampler flow --steps 40
    python bench/bench_app.py --null-edit --size 1024x1024     # the app's fixed overhead alone (stub edit)

The app is served live in this process (gradio in a thread on a free 127.0.0.1 port, the same EditService and
Blocks as `app_gradio.py`) and called through `gradio_client` (`/edit`): upload of image + mask, queue, validation,
the edit, PNG encoding of the outputs and their download by the client. The bare call is `Editor.edit` on in-memory
PIL images, same pipeline, same settings, same seed. Runs alternate (bare, app, bare, app, ...) after one warm-up
each; the medians are reported, with the overhead (app − bare) absolute and relative.

--gpu builds the full-size QwenImageDiT (60 blocks, 20.4 B parameters) under torch.device("meta"), materialises it
with `to_empty(device="cuda")` in bf16 and fills it with small random normals. The text encoder is a Qwen2.5-VL with
one language layer at the real width (3584, what the DiT's txt_in expects) and the VAE is the tiny one (z_dim 16):
their cost is a few ms, so the edit time is almost all DiT, which is what the overhead is measured against (the real
VAE adds ≈ 0.1 s per edit at 1024², DESIGN.md; that would only make the relative overhead smaller).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DIFFSYNTH_SKIP_DOWNLOAD", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_inputs(folder: Path, w: int, h: int) -> tuple[Path, Path]:
    """A smooth synthetic photo-like image (gradients + shapes) and a mask with one box (white = edit)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0)], -1)
    img = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (w // 4, h // 4, w // 2 + w // 8, h // 2 + h // 8))
    ip, mp = folder / "image.png", folder / "mask.png"
    img.save(ip)
    mask.save(mp)
    return ip, mp


# ---- GPU model: full-size DiT with random weights ------------------------------------------------------------------
def full_width_text_encoder():
    import torch.nn as nn
    from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    from diffsynth_edit.tiny import TOKEN_IDS, VOCAB_SIZE

    class BenchTextEncoder(QwenImageTextEncoder):
        """Qwen2.5-VL with one language layer at the real width 3584 and a 1-block vision tower."""

        def __init__(self):
            nn.Module.__init__(self)
            config = Qwen2_5_VLConfig(
                text_config=dict(
                    vocab_size=VOCAB_SIZE, hidden_size=3584, intermediate_size=512, num_hidden_layers=1,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=8192, rms_norm_eps=1e-6,
                    rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                    rope_theta=1e6, use_sliding_window=False, sliding_window=None,
                    bos_token_id=TOKEN_IDS["<|endoftext|>"], eos_token_id=TOKEN_IDS["<|im_end|>"]),
                vision_config=dict(
                    depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                    fullatt_block_indexes=[0], tokens_per_second=2),
                image_token_id=TOKEN_IDS["<|image_pad|>"], video_token_id=TOKEN_IDS["<|video_pad|>"],
                vision_start_token_id=TOKEN_IDS["<|vision_start|>"], vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
                tie_word_embeddings=False)
            self.model = Qwen2_5_VLModel(config)
            self.lm_head = nn.Linear(3584, VOCAB_SIZE, bias=False)
            self.config = config

    return BenchTextEncoder()


@torch.no_grad()
def random_full_dit(device: str, dtype: torch.dtype, num_layers: int = 60):
    from diffsynth.models.qwen_image_dit import QwenImageDiT

    with torch.device("meta"):
        dit = QwenImageDiT(num_layers=num_layers).to(dtype)
    dit = dit.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in dit.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.ndim == 1:
            p.fill_(1.0)  # norm scales
        else:
            p.normal_(0.0, 0.02, generator=gen)
    for name, b in dit.named_buffers():  # none expected; keep them finite if any
        b.zero_()
    # RoPE tables are plain tensor attributes computed in __init__ (meta above): rebuild them for real
    from diffsynth.models.qwen_image_dit import QwenEmbedRope

    dit.pos_embed = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    leftovers = [n for n, t in list(dit.named_parameters()) + list(dit.named_buffers()) if t.is_meta]
    assert not leftovers, leftovers
    return dit.eval().requires_grad_(False)


def build_editor(args):
    from diffsynth_edit.app.service import resolve_device, resolve_dtype, tiny_sources
    from diffsynth_edit.editor import Editor
    from diffsynth_edit.loading import load_pipeline

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(tiny_sources(args.tiny_root), device=device, torch_dtype=dtype)
    note = "tiny model (random weights)"
    if args.gpu:
        t = time.perf_counter()
        pipe.dit = random_full_dit(device, dtype, args.dit_layers)
        pipe.text_encoder = full_width_text_encoder().to(device=device, dtype=dtype).eval().requires_grad_(False)
        n = sum(p.numel() for p in pipe.dit.parameters())
        note = (f"QwenImageDiT {args.dit_layers} blocks ({n / 1e9:.2f} B params, random), full-width 1-layer TE, "
                f"tiny VAE; built in {time.perf_counter() - t:.0f} s")
    return Editor(pipe, variant="2511", hot_swap=True), device, dtype, note


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="full-size random DiT on CUDA (see the module docstring)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", default=None, help="WxH (default 256x256 on CPU, 1024x1024 with --gpu)")
    ap.add_argument("--sampler", default=None, choices=["flow", "lbm"])
    ap.add_argument("--steps", type=int, default=None, help="default: flow 8 on CPU; lbm 4 with --gpu")
    ap.add_argument("--cfg", type=float, default=None, help="default 4 for flow, 1 for lbm")
    ap.add_argument("--device", default=None, help="default cpu, or cuda with --gpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--dit-layers", type=int, default=60, help="--gpu: DiT blocks (60 = the real model)")
    ap.add_argument("--tiny-root", default=None, help="tiny model cache (default: a temporary folder)")
    ap.add_argument("--null-edit", action="store_true",
                    help="replace the edit by an instant stub: measures the app's fixed overhead at this size alone")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.sampler = args.sampler or ("lbm" if args.gpu else "flow")
    args.steps = args.steps or (4 if args.sampler == "lbm" else 8)
    args.cfg = args.cfg if args.cfg is not None else (1.0 if args.sampler == "lbm" else 4.0)
    w, h = map(int, (args.size or ("1024x1024" if args.gpu else "256x256")).lower().split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="bench_app_"))
    args.tiny_root = args.tiny_root or str(tmp / "tiny")

    from gradio_client import Client, handle_file

    from diffsynth_edit.app.service import EditService
    from diffsynth_edit.app.testing import free_port, wait_for_http
    from diffsynth_edit.app.ui import build_ui, launch
    from diffsynth_edit.editor import EditRequest, EditSettings

    editor, device, dtype, note = build_editor(args)
    if args.null_edit:
        from diffsynth_edit.editor import EditResult

        def null_edit(request, settings=None, progress=None):
            for i in range(settings.steps):
                if progress is not None:
                    progress(i + 1, settings.steps)
            img = request.image.convert("RGB")
            return EditResult(img, None, {"sampler": settings.sampler, "steps": settings.steps, "seed": settings.seed,
                                          "size": list(img.size), "box": [0, 0, 0, 0]}, [], None, None)

        editor.edit = null_edit
        note += "; NULL EDIT (stub returning the input: app overhead only)"
    service = EditService(editor, [tmp / "train"], max_pixels=max(w * h, 256))
    demo = build_ui(service, default_steps=args.steps)
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    wait_for_http(url + "config", timeout=120)
    client = Client(url, verbose=False)
    image_path, mask_path = make_inputs(tmp, w, h)
    image, mask = Image.open(image_path).convert("RGB"), Image.open(mask_path)
    prompt = "replace the box with a red teapot"
    settings = dict(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, seed=7, blend_alpha=0.0)

    def bare() -> float:
        sync(device)
        t = time.perf_counter()
        res = editor.edit(EditRequest(image=image, prompt=prompt, mask=mask),
                          EditSettings(**settings, max_pixels=max(w * h, 256)))
        sync(device)
        assert res.image.size == (w, h)
        return time.perf_counter() - t

    server_times = []

    def app() -> float:
        t = time.perf_counter()
        out, _, info = client.predict(handle_file(str(image_path)), handle_file(str(mask_path)), prompt, None, "",
                                      1.0, args.sampler, args.steps, args.cfg, 7, 0.0, api_name="/edit")
        elapsed = time.perf_counter() - t
        assert Image.open(out).size == (w, h), out
        server_times.append(info["seconds"])
        return elapsed

    print(f"[bench] {note}; {device} {str(dtype).replace('torch.', '')}; {w}x{h}, {args.sampler} {args.steps} steps, "
          f"cfg {args.cfg}; warm-up ...", flush=True)
    bare()
    app()
    server_times.clear()
    load0 = os.getloadavg()[0]
    bare_t, app_t = [], []
    for i in range(args.runs):
        bare_t.append(bare())
        app_t.append(app())
        print(f"[bench] run {i + 1}: bare {bare_t[-1]:.3f} s, app {app_t[-1]:.3f} s", flush=True)
    demo.close()
    mb, ma = statistics.median(bare_t), statistics.median(app_t)
    result = {
        "mode": "gpu" if args.gpu else "cpu",
        "model": note,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores: "
                                                                                    f"{cpu_model()})",
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "dtype": str(dtype).replace("torch.", ""),
        "size": [w, h], "sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "runs": args.runs,
        "bare_median_s": round(mb, 4), "app_median_s": round(ma, 4),
        "app_server_side_median_s": round(statistics.median(server_times), 4),
        "overhead_s": round(ma - mb, 4), "overhead_pct": round(100 * (ma - mb) / mb, 1) if mb > 0.05 else None,
        "bare_s": [round(x, 4) for x in bare_t], "app_s": [round(x, 4) for x in app_t],
        "versions": {"torch": torch.__version__, "gradio": __import__("gradio").__version__,
                     "python": platform.python_version()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
