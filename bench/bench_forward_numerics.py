#!/usr/bin/env python
"""How close each DiT forward is to an fp32 forward of the same weights (issue 13 items 4 and 5), and where the
workspace's bf16 forward parts from upstream's.

    python bench/bench_forward_numerics.py          # GPU: full-size 2511 DiT, random bf16 weights, 1024² + 1024² ref
    python bench/bench_forward_numerics.py --tiny   # CPU smoke test (tiny DiT; no fp8, no compile)

The reference runs the bf16-stored weights in fp32: every non-block module is cast to fp32 for the run and each
transformer block just before it runs (and back after: bf16 -> fp32 -> bf16 is lossless), inputs in fp32, TF32 off.
Errors are relative L2 (‖y − y_ref‖ / ‖y_ref‖) and max abs of the DiT's output against the reference of the same
activation. Rows:
  (a)  upstream `model_fn_qwen_image`, bf16 (upstream's sigmoid activation)
  (b0) workspace `bridge_forward`, plain, bf16, the same activation; (b0c) the same with upstream's complex RoPE
       rotation forced: at b6057e7 (real (cos, sin) rotation in eager) this showed the rotation was all that
       separated the two bf16 forwards; since 5c4a7a8 eager rotates that way anyway, so (b0) and (b0c) must agree
  (b)  workspace default (tanh-GELU), bf16; (bc) the same with `compile_blocks`
  (f8) fp8 token linears (`speedups.quantize_dit_fp8`, the editor's opt-in), compiled, (f8k) with the kind of
       linear that carries most of fp8's error kept in bf16, and (f8f) (f8) with Hopper's fast fp8 accumulation
Per block (fp8 only): each block fed the reference's own input, in bf16 and with fp8 linears (all, or one kind at
a time), error of its image-stream update ‖y − y_ref‖ / ‖y_ref − x‖ — which block and which linears lose the most.
Writes $OUT/forward_numerics.md (and .json) when OUT is set.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
from pathlib import Path

import torch

from bench_dit_forward import make_inputs
from harness import build_full_dit, build_tiny_dit, timed

KINDS = {  # the token linears of a block, grouped by what they do
    "img_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_out": ("attn.to_out.0",),
    "img_mlp_in": ("img_mlp.net.0.proj",),
    "img_mlp_out": ("img_mlp.net.2",),
    "txt_all": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "txt_mlp.net.0.proj",
                "txt_mlp.net.2"),
}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    d = y.double() - ref.double()
    return (d.norm() / ref.double().norm()).item(), d.abs().max().item()


@contextlib.contextmanager
def fp32_compute(dit, low_dtype: torch.dtype):
    """Run `dit` in fp32 on its low-precision weights (see the module docstring); restores them on exit."""
    others = [m for name, m in dit.named_children() if name != "transformer_blocks"]
    for m in others:
        m.float()
    hooks = []
    for block in dit.transformer_blocks:
        hooks.append(block.register_forward_pre_hook(lambda mod, args: mod.float() and None))
        hooks.append(block.register_forward_hook(lambda mod, args, out: mod.to(low_dtype) and None))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for h in hooks:
            h.remove()
        for m in others:
            m.to(low_dtype)


@contextlib.contextmanager
def complex_rotation():
    """The workspace's blocks rotate q/k with upstream's complex multiply (its tables turned back into complex)."""
    from diffsynth.models import qwen_image_dit

    from diffsynth_edit import speedups

    patched = qwen_image_dit.apply_rotary_emb_qwen
    qwen_image_dit.apply_rotary_emb_qwen = (
        lambda x, f: speedups._original_rotary(x, f if f.is_complex() else torch.view_as_complex(f.contiguous())))
    try:
        yield
    finally:
        qwen_image_dit.apply_rotary_emb_qwen = patched


class BlockInputs:
    """Forward hooks that keep each block's keyword inputs and image-stream output (the reference run's)."""

    def __init__(self, dit):
        self.inputs, self.outputs, self.hooks = [], [], []
        for block in dit.transformer_blocks:
            self.hooks.append(block.register_forward_hook(self._keep, with_kwargs=True))

    def _keep(self, mod, args, kwargs, out):
        self.inputs.append({k: v for k, v in kwargs.items()})
        self.outputs.append(out[1].detach())

    def remove(self):
        for h in self.hooks:
            h.remove()


def block_update_err(block, kw: dict, ref_out: torch.Tensor, dtype: torch.dtype) -> float:
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k in ("image", "text", "temb")
               else v) for k, v in kw.items()}
    _, image = block(**low)
    x = kw["image"].double()
    return ((image.double() - ref_out.double()).norm() / (ref_out.double() - x).norm()).item()


def quantize_kinds(block, kinds) -> None:
    from diffsynth_edit.speedups import quantize_linear_fp8

    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name in KINDS[k] for k in kinds):
            quantize_linear_fp8(module)


def per_block_fp8(dit, captured: BlockInputs, dtype, every: int) -> tuple[list[dict], dict]:
    """Local errors of blocks 0, every, 2·every, …: bf16, all fp8, and fp8 in one kind of linear at a time."""
    rows = []
    for i in range(0, len(dit.transformer_blocks), every):
        block, kw, ref = dit.transformer_blocks[i], captured.inputs[i], captured.outputs[i]
        row = {"block": i, "bf16": block_update_err(block, kw, ref, dtype)}
        for label, kinds in [("fp8_all", tuple(KINDS))] + [(f"fp8_{k}", (k,)) for k in KINDS]:
            q = copy.deepcopy(block)
            quantize_kinds(q, kinds)
            row[label] = block_update_err(q, kw, ref, dtype)
            del q
        rows.append(row)
        print("block", i, {k: round(v, 5) for k, v in row.items() if k != "block"}, flush=True)
    means = {k: statistics.fmean(r[k] for r in rows) for k in rows[0] if k != "block"}
    return rows, means


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--block-every", type=int, default=None, help="per-block rows for every Nth block (default 6; tiny 1)")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-fp8", action="store_true", help="no per-block and fp8 rows")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    from diffsynth.pipelines.qwen_image import model_fn_qwen_image

    from diffsynth_edit.activation import set_dit_activation
    from diffsynth_edit.bridge_dit import DiTInputs, bridge_forward
    from diffsynth_edit.speedups import compile_blocks, set_fp8_fast_accum, uncompile_blocks

    cuda = not args.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.bfloat16)
    dit = build_full_dit(device, dtype) if cuda else build_tiny_dit(device, dtype)
    text_dim = dit.txt_in.in_features
    ns = argparse.Namespace(size=1024 if cuda else 128, sub=512 if cuda else 64, prompt_tokens=256 if cuda else 16,
                            nega_tokens=200 if cuda else 12)
    inp = make_inputs(ns, dit, device, dtype, text_dim)
    every = args.block_every or (6 if cuda else 1)
    rows, results = [], {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}

    def upstream(x=inp):
        return model_fn_qwen_image(dit=dit, latents=x.x, timestep=x.t, prompt_emb=x.emb, prompt_emb_mask=x.mask,
                                   height=ns.size, width=ns.size, edit_latents=[x.edit], zero_cond_t=True)

    def workspace(x=inp):
        return bridge_forward(dit, DiTInputs(latents=x.x, timestep=x.t, prompt_emb=x.emb, prompt_emb_mask=x.mask,
                                             edit_latents=[x.edit]), zero_cond_t=True)[0]

    inp32 = argparse.Namespace(**{k: (v.float() if v.is_floating_point() and k != "t" else v)
                                  for k, v in vars(inp).items()})
    with torch.no_grad():
        set_dit_activation(dit, "sigmoid-1.702")
        with fp32_compute(dit, dtype):
            ref_up = upstream(inp32)
            ref_ws = workspace(inp32)
        results["fp32_upstream_vs_fp32_workspace"] = rel_err(ref_ws, ref_up)
        out_a, out_b0 = upstream(), workspace()
        with complex_rotation():
            out_b0c = workspace()
        for label, out in (("(a) upstream bf16", out_a), ("(b0) workspace bf16, same activation", out_b0),
                           ("(b0c) workspace bf16, upstream's complex rotation", out_b0c)):
            rows.append((label, *rel_err(out, ref_up), *rel_err(out, out_a)))

        set_dit_activation(dit, "gelu-tanh")
        captured = BlockInputs(dit)
        with fp32_compute(dit, dtype):
            ref = workspace(inp32)
        captured.remove()
        out_b = workspace()
        rows.append(("(b) workspace default (tanh-GELU) bf16", *rel_err(out_b, ref), None, None))
        speed = {"(b) bf16 eager": timed(workspace, device, 2, 5 if cuda else 1)[0]}
        if not args.skip_compile and cuda:
            compile_blocks(dit)
            rows.append(("(bc) as (b), compile_blocks", *rel_err(workspace(), ref), None, None))
            speed["(bc) bf16 compiled"] = timed(workspace, device, 2, 5)[0]
            uncompile_blocks(dit)  # the per-block copies must run their own (quantised) layers
        if cuda and not args.skip_fp8:
            block_rows, means = per_block_fp8(dit, captured, dtype, every)
            results["per_block"], results["per_block_mean"] = block_rows, means
            worst = max(KINDS, key=lambda k: means[f"fp8_{k}"])
            results["worst_kind"] = worst
            del captured
            for block in dit.transformer_blocks:
                quantize_kinds(block, [k for k in KINDS if k != worst])
            if not args.skip_compile:
                compile_blocks(dit)
            rows.append((f"(f8k) fp8 linears except {worst} (bf16), compiled", *rel_err(workspace(), ref), None, None))
            speed[f"(f8k) fp8 except {worst}"] = timed(workspace, device, 2, 5)[0]
            uncompile_blocks(dit)
            for block in dit.transformer_blocks:
                quantize_kinds(block, [worst])
            if not args.skip_compile:
                compile_blocks(dit)
            rows.append(("(f8) fp8 token linears (quantize_dit_fp8), compiled", *rel_err(workspace(), ref), None,
                         None))
            speed["(f8) fp8 all"] = timed(workspace, device, 2, 5)[0]
            set_fp8_fast_accum(dit, True)  # the guarded flag recompiles the blocks on the next call
            rows.append(("(f8f) as (f8), fast fp8 accumulation", *rel_err(workspace(), ref), None, None))
            speed["(f8f) fp8 all, fast accumulation"] = timed(workspace, device, 2, 5)[0]
        results["speed_median_s"] = speed

    lines = ["| forward | rel L2 err vs fp32 | max abs err vs fp32 | rel L2 diff to (a) | max abs diff to (a) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for label, r, m, ra, ma in rows:
        fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
        lines.append(f"| {label} | {fmt(r)} | {fmt(m)} | {fmt(ra)} | {fmt(ma)} |")
    up = results["fp32_upstream_vs_fp32_workspace"]
    lines += ["", f"fp32 workspace vs fp32 upstream (same activation): rel L2 {up[0]:.3g}, max abs {up[1]:.3g}", "",
              "| timed forward | median s |", "| --- | ---: |"] + [f"| {k} | {v:.4f} |" for k, v in speed.items()]
    if "per_block_mean" in results:
        kinds = list(results["per_block_mean"])
        lines += ["", "Per block, error of the image-stream update (block fed the fp32 reference's input):", "",
                  "| block | " + " | ".join(kinds) + " |", "| ---: |" + " ---: |" * len(kinds)]
        for r in results["per_block"] + [{"block": "mean", **results["per_block_mean"]}]:
            lines.append(f"| {r['block']} | " + " | ".join(f"{r[k]:.4g}" for k in kinds) + " |")
    results["rows"] = rows
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "forward_numerics.md").write_text(text + "\n")
        (out / "forward_numerics.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
