"""What the benchmarks share: random-weight models at full and tiny size, the common flags and device choice, the
training benchmarks' sample and set-ups (upstream's training module, the workspace trainer's model), timing, and
writing the report.

Each `bench_*.py` is a script over this module (run from the repository root as `python bench/bench_x.py`; the
script's folder is on `sys.path`, so `import harness` works). Full-size models are built on the meta device and
materialised in the target dtype with random weights: no checkpoint is read.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch


# ---- models ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def init_random_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Weights ~ N(0, std), biases 0, norm scales 1."""
    gen_device = next(model.parameters()).device
    g = torch.Generator(device=gen_device).manual_seed(seed)
    norm_types = ("RMSNorm", "LayerNorm")
    for mod_name, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if name == "bias":
                p.zero_()
            elif type(mod).__name__ in norm_types:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)


def init_random_by_name_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Weights ~ N(0, std), biases 0, every 1-D norm or scale parameter 1 (chosen by parameter name; the text encoder
    and the VAE)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                p.zero_()
            elif "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            elif p.dim() == 1 and leaf in ("gamma", "weight", "scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)


def build_full_dit(device: str, dtype: torch.dtype):
    from diffsynth.models.qwen_image_dit import QwenEmbedRope, QwenImageDiT

    with torch.device("meta"):
        dit = QwenImageDiT()
    dit = dit.to(dtype).to_empty(device=device)  # cast on meta first: fp32 storage would not fit an 80 GB card
    init_random_(dit)
    # QwenEmbedRope keeps its frequency tables as plain tensors, created on meta above: rebuild them for real.
    rope = dit.pos_embed
    dit.pos_embed = QwenEmbedRope(theta=rope.theta, axes_dim=list(rope.axes_dim), scale_rope=rope.scale_rope)
    return dit.eval().requires_grad_(False)


def build_tiny_dit(device: str, dtype: torch.dtype):
    from diffsynth_edit.tiny import TinyQwenImageDiT

    torch.manual_seed(0)
    dit = TinyQwenImageDiT()
    init_random_(dit)
    return dit.to(device=device, dtype=dtype).eval().requires_grad_(False)


def strip_lora(dit: torch.nn.Module) -> None:
    """Undo a peft injection in place (put every base layer back)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(dit.named_modules()):
        if isinstance(module, LoraLayer):
            parent = dit.get_submodule(name.rsplit(".", 1)[0]) if "." in name else dit
            setattr(parent, name.rsplit(".", 1)[-1], module.base_layer)
    for p in dit.parameters():
        p.requires_grad_(False)


def tokenizer_choice(choice: str) -> str:
    """'auto' -> 'qwen' when bench/.assets/qwen.tiktoken is there (bench/fetch_qwen_tokenizer.sh), else 'bytes'."""
    from qwen_tokenizer import qwen_tiktoken_path

    if choice == "auto":
        return "qwen" if qwen_tiktoken_path() else "bytes"
    return choice


def build_full_pipeline(device: str, dtype: torch.dtype, te_cls=None, vae_cls=None, tokenizer: str = "auto"):
    """QwenImagePipeline holding a full-size text encoder and VAE (random weights), tokenizer and processor.

    `te_cls`/`vae_cls` (default: diffsynth's full-size classes) let `--tiny-meta` smoke-test this path on CPU.
    `tokenizer`: 'qwen' (Qwen's real BPE ranks, real token counts and special ids; `bench/qwen_tokenizer.py`),
    'bytes' (the tiny byte-level tokenizer, ~3-4x the real text token counts) or 'auto'."""
    from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder
    from diffsynth.models.qwen_image_vae import QwenImageVAE
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    te_cls = te_cls or QwenImageTextEncoder
    vae_cls = vae_cls or QwenImageVAE
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from diffsynth_edit.tiny import TOKEN_IDS, build_tokenizer

    with torch.device("meta"):
        te = te_cls()
        vae = vae_cls()
    # Non-persistent buffers (rotary inv_freq) and plain tensor attributes (VAE mean/std) are not parameters:
    # rebuild them from fresh CPU instances of their modules.
    te.to(dtype=dtype)  # free on meta; materialising in bf16 avoids a 33 GB fp32 copy of the 8.3 B parameters
    vae.to(dtype=dtype)
    te.to_empty(device=device)
    lm_rot = te.model.language_model.rotary_emb
    fresh = type(lm_rot)(config=lm_rot.config)
    for name, buf in fresh.named_buffers():
        setattr(lm_rot, name, buf.to(device))
    vis_rot = te.model.visual.rotary_pos_emb
    fresh = type(vis_rot)(vis_rot.inv_freq.shape[0] * 2)
    vis_rot.inv_freq = fresh.inv_freq.to(device)
    init_random_by_name_(te)
    real_tokens = tokenizer_choice(tokenizer) == "qwen"
    for cfg in (te.config, getattr(te.config, "text_config", None)) if not real_tokens else ():
        if cfg is not None:
            cfg.image_token_id = TOKEN_IDS["<|image_pad|>"]
            cfg.video_token_id = TOKEN_IDS["<|video_pad|>"]
            cfg.vision_start_token_id = TOKEN_IDS["<|vision_start|>"]
            cfg.vision_end_token_id = TOKEN_IDS["<|vision_end|>"]
    vae.to_empty(device=device)
    small = QwenImageVAE(base_dim=8, num_res_blocks=1)  # same mean/std constants, tiny weights
    vae.mean, vae.std = small.mean.clone(), small.std.clone()
    init_random_by_name_(vae)
    for m in (te, vae):
        m.eval().requires_grad_(False)
        for mod in m.modules():
            for k, v in vars(mod).items():
                if isinstance(v, torch.Tensor) and v.device.type == "meta":
                    raise RuntimeError(f"{type(m).__name__}: {type(mod).__name__}.{k} is still on the meta device")

    if real_tokens:
        from qwen_tokenizer import build_qwen_tokenizer

        tok = build_qwen_tokenizer()
    else:
        tok = build_tokenizer()
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**kw))
    pipe = QwenImagePipeline(device=device, torch_dtype=dtype)
    pipe.text_encoder, pipe.vae, pipe.tokenizer, pipe.processor = te, vae, tok, processor
    pipe.vram_management_enabled = False
    return pipe


def build_tiny_pipeline(root: Path, device: str, dtype: torch.dtype):
    from diffsynth_edit.loading import ModelSources, load_pipeline
    from diffsynth_edit.tiny import write_tiny_model

    write_tiny_model(root)
    return load_pipeline(ModelSources(model_root=root), components=("text_encoder", "vae", "tokenizer", "processor"),
                         device=device, torch_dtype=dtype)


# ---- arguments -------------------------------------------------------------------------------------------------------
def bench_parser(repeats: int = 5, warmup: int | None = 2) -> argparse.ArgumentParser:
    """The flags the model benchmarks share: --tiny (CPU smoke test), --repeats and, unless `warmup` is None,
    --warmup."""
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=repeats)
    if warmup is not None:
        p.add_argument("--warmup", type=int, default=warmup)
    return p


def device_and_dtype(tiny: bool) -> tuple[str, torch.dtype]:
    """--tiny: fp32 on the CPU; else bf16 on CUDA."""
    return ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


# ---- training workloads ----------------------------------------------------------------------------------------------
@dataclass
class TrainInputs:
    """One cached training sample at batch 1 (random): a size² target and reference, a sub² box in the middle, 256
    text tokens."""

    size: int
    sub: int
    x0: torch.Tensor
    edit: torch.Tensor
    sub0: torch.Tensor
    emb: torch.Tensor
    mask: torch.Tensor
    subyx: torch.Tensor


def train_inputs(tiny: bool, device: str, dtype: torch.dtype, spare_latent: bool = False) -> TrainInputs:
    """The training benchmarks' sample: 1024² target and reference, 512² sub box (tiny: 64², 32²). `spare_latent`
    draws one more sub-sized latent before the text embedding (bench_train_step's random stream)."""
    size, sub, text_dim = (64, 32, 64) if tiny else (1024, 512, 3584)
    g = torch.Generator().manual_seed(0)
    lat = lambda h, w: torch.randn(1, 16, h // 8, w // 8, generator=g).to(device, dtype)  # noqa: E731
    x0, edit, sub0 = lat(size, size), lat(size, size), lat(sub, sub)
    if spare_latent:
        lat(sub, sub)
    emb = (torch.randn(1, 256, text_dim, generator=g) * 0.5).to(device, dtype)
    mask = torch.ones(1, 256, dtype=torch.long, device=device)
    t0 = (sub // 2) // 16
    subyx = torch.tensor([[t0, t0 + sub // 16, t0, t0 + sub // 16]], device=device)
    return TrainInputs(size, sub, x0, edit, sub0, emb, mask, subyx)


def upstream_training(dit, device: str, dtype: torch.dtype, x: TrainInputs):
    """Upstream diffsynth's training module on `dit` (peft LoRA rank 32 on its 12 targets, its own activation) with
    AdamW: (pipe, training module, optimizer, the `FlowMatchSFTLoss` keyword arguments of one step)."""
    from diffsynth.diffusion.training_module import DiffusionTrainingModule
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    from diffsynth_edit.activation import set_dit_activation
    from diffsynth_edit.variants import LORA_TARGETS_UPSTREAM

    pipe = QwenImagePipeline(device=device, torch_dtype=dtype)
    pipe.dit = dit
    tm = DiffusionTrainingModule()
    tm.pipe = pipe
    set_dit_activation(dit, "sigmoid-1.702")  # upstream trains under its own activation
    tm.switch_pipe_to_training_mode(pipe, None, "dit", ",".join(LORA_TARGETS_UPSTREAM), 32)
    opt = torch.optim.AdamW(tm.trainable_modules(), lr=1e-4)
    inputs = {"input_latents": x.x0, "edit_latents": [x.edit], "prompt_emb": x.emb, "prompt_emb_mask": x.mask,
              "height": x.size, "width": x.size, "use_gradient_checkpointing": True, "zero_cond_t": True,
              "cfg_scale": 1}
    return pipe, tm, opt, inputs


def workspace_training(dit, cfg, targets, tdtype: torch.dtype, device: str, compiled: bool = False):
    """The workspace trainer's model on `dit` for `cfg` (LoRA of cfg.lora_rank on `targets` in `tdtype`, the STE in
    bridge mode, fp8 matmuls when cfg.fp8_matmuls — irreversible: the block linears stay fp8 —, compiled blocks when
    `compiled`) and its optimizer: (model, optimizer, trainable parameters, STE or None)."""
    from diffsynth_edit.fp8_base import fp8_matmul_blocks
    from diffsynth_edit.speedups import compile_blocks
    from diffsynth_edit.ste import STE
    from diffsynth_edit.training.build import allow_tf32
    from diffsynth_edit.training.lora import inject_lora
    from diffsynth_edit.training.model import EditTrainModel
    from diffsynth_edit.training.optim import build_optimizer

    allow_tf32(device)  # as the trainer does (fp32 trainables' matmuls)
    params = inject_lora(dit, cfg.lora_rank, float(cfg.lora_rank), targets, tdtype)
    ste = None
    if cfg.mode == "bridge":
        ste = STE.for_dit(dit).to(device=device, dtype=tdtype)
        params += list(ste.parameters())
    if cfg.fp8_matmuls:
        fp8_matmul_blocks(dit)  # the layers an earlier case converted are skipped
    if compiled:
        compile_blocks(dit, ste, recompute_budget=cfg.recompute_budget, save_attention=cfg.save_attention)
    model = EditTrainModel(dit, ste, cfg, zero_cond_t=True)
    return model, build_optimizer(cfg, params), params, ste


def fixed_noised_batch(x: TrainInputs, device: str):
    """(batch, noised) of one SFT step at t = 500 on `x`: the same inputs every step."""
    from diffsynth_edit.training.losses import NoisedBatch

    batch = {"prompt_emb": x.emb, "prompt_emb_mask": x.mask, "edit_latents": [x.edit], "subyx": x.subyx,
             "input_latents": x.x0}
    noised = NoisedBatch(latents=x.x0.float(), sub_latents=x.sub0.float(), target=x.x0.float(),
                         sub_target=x.sub0.float(), timestep=torch.tensor([500.0], device=device),
                         weight=torch.ones(1, device=device), s=torch.tensor([0.5], device=device))
    return batch, noised


def release_lora(dit, device: str) -> None:
    """After a case: the DiT without LoRA, the CUDA cache emptied."""
    strip_lora(dit)
    if device == "cuda":
        torch.cuda.empty_cache()


# ---- timing ----------------------------------------------------------------------------------------------------------
def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step_fn, device, warmup, repeats):
    for _ in range(warmup):
        step_fn()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else float("nan")
    return statistics.median(times), peak, times


def timed(fn, device: str, warmup: int, repeats: int):
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# ---- reports ---------------------------------------------------------------------------------------------------------
def write_report(text: str, filename: str) -> None:
    """Print a result table and, when $OUT is set, write it there too."""
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], filename), "w") as f:
            f.write(text + "\n")
