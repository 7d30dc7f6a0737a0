#!/usr/bin/env python
"""Click-to-image time of the app vs a bare Editor call with the same settings.

    python bench/bench_app.py                      # CPU, tiny model (default 256x256, flow 8 steps, CFG 4)
    python bench/bench_app.py --gpu                # GPU: full-size 2511 DiT (random bf16 weights), 1024x1024
    python bench/bench_app.py --gpu --sampler flow --steps 40
    python bench/bench_app.py --null-edit --size 1024x1024     # the app's fixed overhead alone (stub edit)
    python bench/bench_app.py --encode-only --size 1024x1024   # the output PNG writer alone
    python bench/bench_app.py --queue-poll-only --runs 25 --threads 1  # gradio's idle queue poll vs Python-bound work

The app is served live in this process (gradio in a thread on a free 127.0.0.1 port, the same EditService and
Blocks as `app_gradio.py`) and called through `gradio_client` (`/edit`): upload of image + mask, queue, validation,
the edit, PNG encoding of the outputs and their download by the client. The client runs in a separate process, like
an API user (`--client thread` runs it in this process, as before 2026-11-27: its threads then share the server's
GIL). Two clients are timed: gradio_client as constructed by default ("default", which builds a new TLS context for
every request) and with one TLS context (`ssl_verify=httpx.create_ssl_context()`, "tls-once", the documented way).
The bare call is `Editor.edit` on in-memory PIL images, same pipeline, same settings, same seed. Runs alternate
(bare, app default, app tls-once, bare, app tls-once, app default, ...) after one warm-up each; the medians are
reported (and means: gradio_client polls for the result every 50 ms, so single calls are quantised), with the
overhead (app − bare) absolute and relative.

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
import random
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
    from diffsynth_edit.app.editor_setup import resolve_device, resolve_dtype, tiny_sources
    from diffsynth_edit.editing.editor import Editor
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


CLIENTS = ("default", "tls-once")


def client_worker(argv) -> int:
    """`bench_app.py --client-worker URL IMAGE MASK W H JSON`: a separate process, like an API user. It builds one
    gradio_client per kind (CLIENTS), warms each up, then for every line it reads on stdin (a client kind) makes one
    `/edit` call and prints {"s": click-to-image seconds, "server_s": service.generate's seconds} as a JSON line."""
    url, image_path, mask_path, w, h, call = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4]), json.loads(argv[5])
    import httpx
    from gradio_client import Client, handle_file

    clients = {"default": Client(url, verbose=False),
               "tls-once": Client(url, verbose=False, ssl_verify=httpx.create_ssl_context())}

    def one(client) -> dict:
        t = time.perf_counter()
        out, _, info = client.predict(handle_file(image_path), handle_file(mask_path), call["prompt"], None, "", 1.0,
                                      call["sampler"], call["steps"], call["cfg"], 7, 0.0, api_name="/edit")
        elapsed = time.perf_counter() - t
        assert Image.open(out).size == (w, h), out
        return {"s": elapsed, "server_s": info["seconds"]}

    for c in clients.values():
        one(c)
    print("ready", flush=True)
    for line in sys.stdin:
        kind = line.strip()
        if not kind:
            continue
        print(json.dumps(one(clients[kind])), flush=True)
    return 0


class ClientProcess:
    """Drives `client_worker` in a subprocess (its own interpreter: no GIL or thread shared with the server)."""

    def __init__(self, url: str, image_path: Path, mask_path: Path, w: int, h: int, call: dict):
        env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--client-worker", url,
                                      str(image_path), str(mask_path), str(w), str(h), json.dumps(call)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"client worker failed to start: {line!r}")

    def call(self, kind: str) -> dict:
        self.proc.stdin.write(kind + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("client worker died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class ClientThread:
    """The same calls from this process (`--client thread`: the client's threads share the server's GIL)."""

    def __init__(self, url: str, image_path: Path, mask_path: Path, w: int, h: int, call: dict):
        import httpx
        from gradio_client import Client, handle_file

        self.handle_file, self.w, self.h, self.call_args = handle_file, w, h, call
        self.paths = (str(image_path), str(mask_path))
        self.clients = {"default": Client(url, verbose=False),
                        "tls-once": Client(url, verbose=False, ssl_verify=httpx.create_ssl_context())}
        for kind in self.clients:
            self.call(kind)

    def call(self, kind: str) -> dict:
        c = self.call_args
        t = time.perf_counter()
        out, _, info = self.clients[kind].predict(
            self.handle_file(self.paths[0]), self.handle_file(self.paths[1]), c["prompt"], None, "", 1.0,
            c["sampler"], c["steps"], c["cfg"], 7, 0.0, api_name="/edit")
        elapsed = time.perf_counter() - t
        assert Image.open(out).size == (self.w, self.h), out
        return {"s": elapsed, "server_s": info["seconds"]}

    def close(self) -> None:
        pass


def encode_only(w: int, h: int, runs: int) -> dict:
    """Output PNG writing alone: Pillow at compress_level 1 (the app before 2026-11-27) vs `app.png.encode_png`, on
    the bench's smooth image, the same with ±6 of noise (photograph-like) and uniform noise (random-weight model)."""
    import io

    from diffsynth_edit.app.png import MAX_THREADS, encode_png

    tmp = Path(tempfile.mkdtemp(prefix="bench_png_"))
    smooth = Image.open(make_inputs(tmp, w, h)[0]).convert("RGB")
    rng = np.random.default_rng(0)
    images = {"smooth": smooth,
              "photo": Image.fromarray((np.asarray(smooth, dtype=np.int16) + rng.integers(-6, 7, (h, w, 3)))
                                       .clip(0, 255).astype(np.uint8)),
              "noise": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))}

    def pil(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    out = {"size": [w, h], "runs": runs, "threads": MAX_THREADS, "load_average_1m": round(os.getloadavg()[0], 2)}
    for name, im in images.items():
        t = {"pillow_level1": [], "app_png": []}
        size = {}
        for _ in range(runs):  # alternating
            for key, fn in (("pillow_level1", pil), ("app_png", encode_png)):
                t0 = time.perf_counter()
                data = fn(im)
                t[key].append(time.perf_counter() - t0)
                size[key] = len(data)
        out[name] = {k: {"median_ms": round(1000 * statistics.median(v), 1), "bytes": size[k]} for k, v in t.items()}
    return out


def queue_poll_only(rounds: int) -> dict:
    """A Python-bound loop (20k tiny torch ops, like a kernel-launch loop) in a process serving the app, idle, with
    gradio's queue polling every 1 ms (gradio's default), 5 ms (the app's QUEUE_POLL_S) or 50 ms; alternating."""
    from diffsynth_edit.app.service import EditService
    from diffsynth_edit.app.testing import free_port, wait_for_http
    from diffsynth_edit.app.ui import build_ui, launch

    class NoEditor:
        checkpoint = None

    x = torch.zeros(64)

    def work() -> float:
        t = time.perf_counter()
        y = x
        for _ in range(20000):
            y = y + 1.0
        return time.perf_counter() - t

    demo = build_ui(EditService(NoEditor(), [Path(tempfile.mkdtemp(prefix="bench_app_"))]), default_steps=4)
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    wait_for_http(f"http://127.0.0.1:{port}/config", timeout=120)
    times = {0.001: [], 0.005: [], 0.05: []}
    for _ in range(rounds):
        for poll in times:
            demo._queue.sleep_when_free = poll
            time.sleep(0.02)
            times[poll].append(work())
    demo.close()
    return {"rounds": rounds, "load_average_1m": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads(),
            **{f"poll_{int(p * 1000)}ms": {"median_s": round(statistics.median(v), 5), "min_s": round(min(v), 5)}
               for p, v in times.items()}}


def parse_args(argv) -> argparse.Namespace:
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
    ap.add_argument("--null-jitter-ms", type=float, default=50.0,
                    help="--null-edit: the stub sleeps a random 0..N ms (the same in a run's bare and app calls), so "
                         "the result lands at a random phase of gradio_client's 50 ms result poll, as a real edit's "
                         "does; the overhead is then read per run (app − bare), median and mean")
    ap.add_argument("--null-output", default="input", choices=["input", "photo", "noise"],
                    help="--null-edit: the stub returns the input, the input with ±6 of noise, or uniform noise")
    ap.add_argument("--encode-only", action="store_true",
                    help="only time the output PNG writer (Pillow compress_level 1 vs app.png) at --size, --runs")
    ap.add_argument("--queue-poll-only", action="store_true",
                    help="only time a Python-bound loop beside an idle app, gradio's queue polling every 1 / 5 / 50 ms "
                         "(--runs rounds)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--client", default="process", choices=["process", "thread"],
                    help="where the gradio_client runs: a separate process like an API user (default), or a thread of "
                         "this process (the client then shares the server's GIL and CPU: the measurement before "
                         "2026-11-27)")
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    return ap.parse_args(argv)


def install_null_edit(editor, args, jitter: list[float]) -> None:
    """--null-edit: `editor.edit` becomes an instant stub that sleeps `jitter[0]` s, reports its steps and returns
    --null-output."""
    from diffsynth_edit.editing.request import EditResult

    outputs = {}

    def null_output(img: Image.Image) -> Image.Image:
        """The stub's output: the input itself (smooth), the input with ±6 of noise (like a photograph), or
        uniform noise (like the random-weight DiT of --gpu): what the app's PNG writer has to compress."""
        if args.null_output == "input":
            return img
        if img.size not in outputs:
            rng = np.random.default_rng(0)
            if args.null_output == "photo":
                arr = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (img.height, img.width, 3))
            else:
                arr = rng.integers(0, 256, (img.height, img.width, 3))
            outputs[img.size] = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        return outputs[img.size]

    def null_edit(request, settings=None, progress=None):
        if jitter[0]:
            time.sleep(jitter[0])
        for i in range(settings.steps):
            if progress is not None:
                progress(i + 1, settings.steps)
        img = null_output(request.image.convert("RGB"))
        return EditResult(img, None, {"sampler": settings.sampler, "steps": settings.steps, "seed": settings.seed,
                                      "size": list(img.size), "box": [0, 0, 0, 0]}, [], None, None)
    editor.edit = null_edit


def summarise(args, note: str, device: str, dtype: torch.dtype, w: int, h: int, load0: float, bare_t: list,
              app_t: dict, server_t: dict) -> dict:
    """The JSON result: the bare edit's and each client's times, the app's overhead per run."""
    mb = statistics.median(bare_t)
    result = {
        "mode": "gpu" if args.gpu else "cpu",
        "model": note,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores: "
                                                                                    f"{cpu_model()})",
        "torch_threads": torch.get_num_threads(),
        "client": args.client,
        "load_average_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "dtype": str(dtype).replace("torch.", ""),
        "size": [w, h], "sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "runs": args.runs,
        "bare_median_s": round(mb, 4), "bare_s": [round(x, 4) for x in bare_t],
        "app": {},
        "versions": {"torch": torch.__version__, "gradio": __import__("gradio").__version__,
                     "gradio_client": __import__("gradio_client").__version__,
                     "python": platform.python_version()},
    }
    for k in CLIENTS:
        ma = statistics.median(app_t[k])
        diffs = [a - b for a, b in zip(app_t[k], bare_t)]  # per run: the app call minus the bare call before it
        result["app"][k] = {
            "median_s": round(ma, 4), "mean_s": round(statistics.fmean(app_t[k]), 4),
            "server_side_median_s": round(statistics.median(server_t[k]), 4),
            "overhead_s": round(ma - mb, 4), "overhead_pct": round(100 * (ma - mb) / mb, 1) if mb > 0.05 else None,
            "overhead_per_run_median_s": round(statistics.median(diffs), 4),
            "overhead_per_run_mean_s": round(statistics.fmean(diffs), 4),
            "runs_s": [round(x, 4) for x in app_t[k]],
        }
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--client-worker"]:
        return client_worker(argv[1:])
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.sampler = args.sampler or ("lbm" if args.gpu else "flow")
    args.steps = args.steps or (4 if args.sampler == "lbm" else 8)
    args.cfg = args.cfg if args.cfg is not None else (1.0 if args.sampler == "lbm" else 4.0)
    w, h = map(int, (args.size or ("1024x1024" if args.gpu else "256x256")).lower().split("x"))
    if args.encode_only or args.queue_poll_only:
        result = encode_only(w, h, args.runs) if args.encode_only else queue_poll_only(args.runs)
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="bench_app_"))
    args.tiny_root = args.tiny_root or str(tmp / "tiny")

    from diffsynth_edit.app.service import EditService
    from diffsynth_edit.app.testing import free_port, wait_for_http
    from diffsynth_edit.app.ui import build_ui, launch
    from diffsynth_edit.editing.request import EditRequest, EditSettings

    editor, device, dtype, note = build_editor(args)
    jitter = [0.0]  # --null-edit: seconds the stub sleeps in this run (the same in its bare and app calls)
    if args.null_edit:
        install_null_edit(editor, args, jitter)
        note += f"; NULL EDIT (stub returning {args.null_output}: app overhead only)"
    service = EditService(editor, [tmp / "train"], max_pixels=max(w * h, 256))
    demo = build_ui(service, default_steps=args.steps)
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    wait_for_http(url + "config", timeout=120)
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

    print(f"[bench] {note}; {device} {str(dtype).replace('torch.', '')}; {w}x{h}, {args.sampler} {args.steps} steps, "
          f"cfg {args.cfg}; client in a {args.client}; warm-up ...", flush=True)
    bare()
    call = dict(prompt=prompt, sampler=args.sampler, steps=args.steps, cfg=args.cfg)
    client = (ClientProcess if args.client == "process" else ClientThread)(url, image_path, mask_path, w, h, call)
    load0 = os.getloadavg()[0]
    bare_t = []
    app_t = {k: [] for k in CLIENTS}
    server_t = {k: [] for k in CLIENTS}
    rng = random.Random(0)
    for i in range(args.runs):
        jitter[0] = rng.uniform(0, args.null_jitter_ms / 1000) if args.null_edit else 0.0
        bare_t.append(bare())
        for k in (CLIENTS if i % 2 == 0 else CLIENTS[::-1]):  # alternate the order of the two clients too
            r = client.call(k)
            app_t[k].append(r["s"])
            server_t[k].append(r["server_s"])
        print(f"[bench] run {i + 1}: bare {bare_t[-1]:.3f} s, "
              + ", ".join(f"app ({k} client) {app_t[k][-1]:.3f} s" for k in CLIENTS), flush=True)
    client.close()
    demo.close()
    result = summarise(args, note, device, dtype, w, h, load0, bare_t, app_t, server_t)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
