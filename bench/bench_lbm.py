#!/usr/bin/env python
"""LBM on the full-size 2511 models (random weights): one training step, and end-to-end 1- and 4-step edits.

    python bench/bench_lbm.py          # GPU: 1024² source, mask box 512², bf16
    python bench/bench_lbm.py --tiny   # CPU smoke test

(1) one LBM optimizer step (batch 1, gradient checkpointing): bridge mode + STE, 17 targets, rank 512,
    ProdigyPlusScheduleFree; trainables fp32, or bf16 if fp32 does not fit the card (reported); `--train-dtype`,
    `--train-compile` (compile_blocks), `--train-preset` (a preset's compile_blocks, recompute_budget and
    save_attention, e.g. configs/lbm_2511.toml) and `--only-train` pick another row alone.
(2) end-to-end edits through the workspace editor, `Editor.edit` = prompt encoding (positive only: LBM runs at
    cfg 1) + VAE encode + DiT steps + VAE decode of main and sub streams, bridge mode with STE, steps 1 and 4;
    eager, then with every DiT block torch.compile'd (compile time excluded: 2 warm-up edits).
Writes $OUT/lbm.md.
"""
from __future__ import annotations

import statistics
import time

import torch
from PIL import Image

from harness import (bench_parser, build_full_dit, build_full_pipeline, build_tiny_dit, build_tiny_pipeline,
                     device_and_dtype, device_name, release_lora, sync, time_steps, tokenizer_choice,
                     workspace_training, write_report)


def preset_levers(path: str) -> dict:
    """The speed levers a training preset sets (compile_blocks, recompute_budget, save_attention), read and checked
    as `train_lbm.py --preset` reads them."""
    from diffsynth_edit.config import build_config, load_preset
    from diffsynth_edit.training.config import TrainConfig

    cfg = build_config(TrainConfig, load_preset(path, "train"), source=f"preset {path}")
    return {k: getattr(cfg, k) for k in ("compile_blocks", "recompute_budget", "save_attention")}


def training_rows(dit, a, device: str, dtype: torch.dtype, size: int, box: int) -> list[tuple]:
    """(1): one LBM optimizer step with fp32 trainables, or bf16 when fp32 runs out of memory."""
    from diffsynth_edit.speedups import uncompile_blocks
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.training.losses import make_lbm_inputs
    from diffsynth_edit.variants import LORA_TARGETS_2511

    text_dim = 64 if a.tiny else 3584
    g = torch.Generator().manual_seed(0)
    lat = lambda h, w: torch.randn(1, 16, h // 8, w // 8, generator=g).to(device, dtype)  # noqa: E731
    t0 = (box // 2) // 16
    batch = {"ids": ["x"], "input_latents": lat(size, size), "edit_latents": [lat(size, size)],
             "sub_input_latents": lat(box, box), "sub_noise": lat(box, box),
             "prompt_emb": (torch.randn(1, 256, text_dim, generator=g) * 0.5).to(device, dtype),
             "prompt_emb_mask": torch.ones(1, 256, dtype=torch.long, device=device),
             "subyx": torch.tensor([[t0, t0 + box // 16, t0, t0 + box // 16]], device=device)}
    rank = 8 if a.tiny else 512
    rows = []
    dtypes = {"auto": (torch.float32, torch.bfloat16), "fp32": (torch.float32,), "bf16": (torch.bfloat16,)}
    levers = preset_levers(a.train_preset) if a.train_preset else {"compile_blocks": a.train_compile}
    compiled = levers["compile_blocks"]
    for tdtype in dtypes[a.train_dtype]:
        cfg = TrainConfig(objective="lbm", mode="bridge", lora_rank=rank, optimizer="prodigy", **levers)
        model, optim, params, ste = workspace_training(dit, cfg, LORA_TARGETS_2511, tdtype, device, compiled)
        gens = [torch.Generator().manual_seed(1)]

        def step():
            noised = make_lbm_inputs(batch, gens, True, cfg.lbm_grid, None, cfg.bridge_sigma)
            loss, _, _ = model(batch, noised)
            loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        label = (f"LBM training step: bridge + STE, rank {rank}, 17 targets, Prodigy (batched), {str(tdtype)[6:]} "
                 f"trainables{', compiled blocks' if compiled else ''}"
                 + (f", recompute_budget {cfg.recompute_budget}" if cfg.recompute_budget is not None else "")
                 + (", save_attention" if cfg.save_attention else ""))
        try:
            med, peak, times = time_steps(step, device, 2, a.repeats)
            rows.append((label, f"{med:.3f} s", f"{peak:.1f}"))
            print(f"RESULT lbm-train | {label} | {med:.3f} s | {peak:.1f} GiB | "
                  f"{', '.join(f'{t:.3f}' for t in times)}", flush=True)
            done = True
        except torch.OutOfMemoryError:
            rows.append((label, "out of memory", "—"))
            done = False
        del optim, model, params
        if compiled:
            uncompile_blocks(dit, ste)
            torch._dynamo.reset()
        del ste
        release_lora(dit, device)
        if done:
            break
    return rows


def bridge_editor(dit, a, device: str, dtype: torch.dtype):
    """The workspace editor over the full-size (or tiny) text encoder and VAE and `dit`, bridge mode with an STE."""
    from diffsynth_edit.editing.editor import Editor
    from diffsynth_edit.ste import STE

    if a.tiny:
        import tempfile
        from pathlib import Path

        pipe = build_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny", device, dtype)
    else:
        pipe = build_full_pipeline(device, dtype, tokenizer=a.tokenizer)
        from diffsynth_edit.speedups import exact_speedups

        exact_speedups(pipe)  # as the workspace loader does
    pipe.dit = dit
    ste = STE.for_dit(dit).to(device=device, dtype=torch.float32).eval()
    return Editor(pipe, variant="2511", ste=ste)


def timed_edit(editor, request, steps: int, label: str, device: str, repeats: int) -> tuple:
    """(2): the median end-to-end edit after 2 warm-ups, and the same edit in its parts (prepare: prompt + VAE
    encode; DiT steps; decode of main + sub)."""
    from diffsynth_edit.editing.request import EditSettings
    from diffsynth_edit.encoding import vae_decode

    settings = EditSettings(sampler="lbm", steps=steps, cfg_scale=1.0)
    for _ in range(2):
        editor.edit(request, settings)
    times, parts = [], []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        editor.edit(request, settings)
        sync(device)
        times.append(time.perf_counter() - t)
        marks = [time.perf_counter()]
        prep = editor.prepare(request, settings)
        sync(device), marks.append(time.perf_counter())
        x, x_sub = editor.sample(prep, settings)
        sync(device), marks.append(time.perf_counter())
        vae_decode(editor.pipe, x), vae_decode(editor.pipe, x_sub)
        sync(device), marks.append(time.perf_counter())
        parts.append([b - a_ for a_, b in zip(marks, marks[1:])])
    split = " / ".join(f"{statistics.median(p[i] for p in parts):.3f}" for i in range(3))
    return (label + f", {steps} step{'s' if steps > 1 else ''}", f"{statistics.median(times):.3f} s",
            split, f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f}" if device == "cuda" else "—")


def main() -> int:
    p = bench_parser(warmup=None)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--only-train", action="store_true", help="only (1)")
    p.add_argument("--train-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="(1)'s trainables: auto = fp32, or bf16 when fp32 runs out of memory")
    p.add_argument("--train-compile", action="store_true", help="(1) with compile_blocks")
    p.add_argument("--train-preset", default="", help="(1) with the speed levers of this training preset (TOML)")
    p.add_argument("--profile-prepare", action="store_true",
                   help="op table of one eager prepare, prepare with/without the VAE side stream")
    p.add_argument("--ste-all-rows", action="store_true",
                   help="also time the compiled + fp8 4-step edit with the STE computing every token's gate (before)")
    p.add_argument("--tokenizer", default="auto", choices=("auto", "qwen", "bytes"),
                   help="text tokens: Qwen's real BPE (bench/fetch_qwen_tokenizer.sh), byte-level, or qwen if fetched")
    a = p.parse_args()
    device, dtype = device_and_dtype(a.tiny)
    size, box = (64, 32) if a.tiny else (1024, 512)
    name = device_name(device)
    dit = build_tiny_dit(device, dtype) if a.tiny else build_full_dit(device, dtype)
    rows = [] if a.skip_train else training_rows(dit, a, device, dtype, size, box)
    if a.only_train:
        write_report(f"Card: {name}\n\n" + "\n".join(f"| {' | '.join(r)} |" for r in rows), "lbm.md")
        return 0

    # ---- end-to-end edits --------------------------------------------------------------------------------------
    from diffsynth_edit.editing.request import EditRequest, EditSettings
    from diffsynth_edit.ste import STE

    editor = bridge_editor(dit, a, device, dtype)
    src = Image.new("RGB", (size, size), (120, 160, 200))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, ((size - box) // 2 + 4, (size - box) // 2 + 4, (size + box) // 2 - 4, (size + box) // 2 - 4))
    request = EditRequest(image=src, prompt="Picture 1 is the image to modify. Replace the object with a red cube.",
                          mask=mask)
    extra: list[str] = []
    with torch.no_grad():
        prep = editor.prepare(request, EditSettings(sampler="lbm", steps=1, cfg_scale=1.0))
        extra.append(f"Text tokens into the DiT: {prep.prompt_emb.shape[1]} "
                     f"(tokenizer: {'tiny' if a.tiny else tokenizer_choice(a.tokenizer)}).")
        if a.profile_prepare:
            extra += profile_prepare(editor, request, device, a.repeats)
        for steps in (1, 4):
            rows.append(timed_edit(editor, request, steps, "end-to-end LBM edit, eager", device, a.repeats))
        if not a.skip_compile:
            editor.speed_up(compile_blocks=True)
            for steps in (1, 4):
                rows.append(timed_edit(editor, request, steps, "end-to-end LBM edit, compiled blocks", device,
                                       a.repeats))
        if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
            editor.speed_up(fp8=True)
            for steps in (1, 4):
                label = ("end-to-end LBM edit, compiled blocks + fp8 linears" if not a.skip_compile
                         else "end-to-end LBM edit, eager + fp8 linears")
                rows.append(timed_edit(editor, request, steps, label, device, a.repeats))
            if a.ste_all_rows:  # before: the STE computed every token's gate and the DiT kept the sub tokens' ones
                from diffsynth_edit.ste import straight_through_gate

                def all_rows(self, h, block_index, rows=slice(None)):
                    return straight_through_gate(self.logits(h, block_index))[:, rows]

                original, STE.forward = STE.forward, all_rows
                rows.append(timed_edit(editor, request, 4, "same, STE gate computed for every token (before)",
                                       device, a.repeats))
                STE.forward = original

    lines = [f"Card: {name}; torch {torch.__version__}; {size}² source with a {box}² mask box (sub stream), bf16; "
             f"median of {a.repeats}", "",
             "| case | time | prepare / DiT steps / decode (s) | peak GiB |", "| --- | --- | --- | --- |"]
    lines += [f"| {r[0]} | {r[1]} | {r[2] if len(r) == 4 else ''} | {r[-1]} |" for r in rows]
    lines += ["", *extra]
    write_report("\n".join(lines), "lbm.md")
    return 0


def profile_prepare(editor, request, device: str, repeats: int) -> list[str]:
    """`Editor.prepare` timed with and without the VAE side stream, and one profiled call's op table."""
    from diffsynth_edit.editing.request import EditSettings

    from diffsynth_edit import encoding
    from harness import timed as timed_median

    settings = EditSettings(sampler="lbm", steps=1, cfg_scale=1.0)

    def timed(fn) -> float:  # ms, median of `repeats` after one warm-up
        return timed_median(fn, device, 1, repeats)[0] * 1e3

    pipe, image = editor.pipe, request.image.convert("RGB")
    vl_image = encoding._embedder().resize_image(image)
    text = encoding._TEMPLATE.format(encoding._IMAGE_TEMPLATE.format(1) + request.prompt)
    parts = {"VAE encode of the source": lambda: encoding.vae_encode(pipe, [image]),
             "encode_prompt (processor + text encoder)": lambda: encoding.encode_prompt(pipe, request.prompt, [image]),
             "of which the processor (CPU)": lambda: pipe.processor(text=[text], images=[vl_image], padding=True,
                                                                      return_tensors="pt")}
    part_ms = {k: timed(fn) for k, fn in parts.items()}
    with_side = timed(lambda: editor.prepare(request, settings))
    editor._vae_stream = lambda: None
    without_side = timed(lambda: editor.prepare(request, settings))
    del editor._vae_stream
    lines = ["", f"`Editor.prepare` (median of {repeats}): {with_side:.1f} ms with the VAE on a side stream, "
                 f"{without_side:.1f} ms without; parts alone: "
                 + ", ".join(f"{k} {v:.1f} ms" for k, v in part_ms.items()) + ".", ""]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        editor.prepare(request, settings)
        sync(device)
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=70)
    lines += ["One prepare, ops by CPU total:", "", "```", table, "```"]
    if device == "cuda":
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70)
        lines += ["", "By device time:", "", "```", table, "```"]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
