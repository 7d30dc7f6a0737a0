"""The editor: prepare an edit (resize, mask box, encode), sample it (flow matching or LBM), decode it.

    editor = Editor.from_sources(ModelSources(model_root="models"), device="cuda")
    editor.load_checkpoint("train/run/step-1000.safetensors")
    editor.set_extra_loras([lora_formats.lora_layer("lightning.safetensors", editor.pipe.dit, 1.0)])  # optional
    image, sub_image = editor.edit(EditRequest(image=src, prompt="...", mask=mask), EditSettings(steps=40))

Input conversions (documented, never silent errors): RGBA/LA/P images are composited onto white, greyscale is
converted to RGB, every image is scaled down to at most `max_pixels` with 16-aligned sides, a mask of the same
aspect ratio but another size is resized (nearest) to the image; anything else is an EditInputError.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..activation import ActivationChoice, checkpoint_activation, dit_activation, set_dit_activation
from ..bridge_dit import DiTInputs, bridge_forward
from ..checkpoint import Checkpoint, CheckpointError, check_against_model, read_checkpoint
from ..image_io import to_mask
from ..encoding import encode_prompt, encode_prompt_pair, pad_prompts, vae_decode, vae_encode, white_latents
from ..geometry import binarize_mask, fit_size, mask_bbox
from ..limits import MAX_ASPECT
from ..loading import ModelSources, load_pipeline
from ..lora_stack import LoRALayer, LoRAStack
from ..prompts import edit_prompt
from ..speedups import compile_blocks as compile_dit_blocks
from ..speedups import quantize_dit_fp8, set_fp8_fast_accum
from ..ste import STE
from ..variants import get_variant
from .request import EditInputError, EditRequest, EditResult, EditSettings, PreparedEdit
from .sampling import euler_step, flow_sigmas, lbm_grid


def to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """EXIF orientation applied; transparency composited onto white; 16-bit and float scaled to 8 bits; RGB.
    The same conversion the dataset builder applies to files (image_io.to_rgb)."""
    from ..image_io import ImageDecodeError, to_rgb as image_to_rgb

    if not isinstance(image, Image.Image):
        raise EditInputError(f"{what} must be a PIL image, got {type(image).__name__}")
    try:
        return image_to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError as e:
        raise EditInputError(f"{what}: {e}") from None


def fit_image(image: Image.Image, max_pixels: int) -> tuple[Image.Image, str | None]:
    w, h = image.size
    if max(w, h) / max(1, min(w, h)) > MAX_ASPECT:
        raise EditInputError(f"image of {w}x{h} has an aspect ratio above {MAX_ASPECT:g}:1")
    tw, th = fit_size(w, h, max_pixels)
    if (tw, th) == (w, h):
        return image, None
    return image.resize((tw, th), Image.LANCZOS), f"image resized from {w}x{h} to {tw}x{th}"


def prepare_mask(mask: Image.Image | None, size: tuple[int, int],
                 original_size: tuple[int, int] | None = None) -> tuple[Image.Image | None, str | None]:
    """Binary L-mode mask at `size`; None stays None. Raises EditInputError for empty or mismatched masks.

    `original_size` is the image's size before fitting: a mask of that size is the image's own and is resized to
    `size` even where rounding to 16 px changed the aspect ratio."""
    if mask is None:
        return None, None
    if not isinstance(mask, Image.Image):
        raise EditInputError(f"mask must be a PIL image, got {type(mask).__name__}")
    mask = to_mask(ImageOps.exif_transpose(mask))  # the dataset builder's rule (alpha matte or luminance)
    notice = None
    if mask.size != size:
        (mw, mh), (w, h) = mask.size, size
        own = original_size is not None and mask.size == tuple(original_size)
        if not own and abs(mw / mh - w / h) > 0.01 * (w / h):
            raise EditInputError(f"mask of {mw}x{mh} does not fit the image of {w}x{h} (different aspect ratio)")
        mask = mask.convert("L").resize(size, Image.NEAREST)
        notice = f"mask resized from {mw}x{mh} to {w}x{h}"
    binary = binarize_mask(mask)
    if not binary.any():
        raise EditInputError("mask is empty: paint the region to edit (white = edit)")
    return Image.fromarray((binary * 255).astype("uint8"), mode="L"), notice


class Editor:
    """Holds one loaded pipeline; edits with or without a trained checkpoint (LoRA + STE)."""

    def __init__(self, pipe, variant: str = "2511", ste: STE | None = None, hot_swap: bool = False,
                 mode: Literal["auto", "bridge", "plain"] = "auto", activation: ActivationChoice = "auto",
                 log: Callable[[str], None] = print):
        """`activation`: the DiT MLP's activation (see `activation`); "auto" keeps the loaded model's (the reference
        tanh-GELU from `load_pipeline`) and, with a checkpoint, runs the one the checkpoint was trained with."""
        self.pipe = pipe
        self.variant = get_variant(variant).name
        self.zero_cond_t = get_variant(variant).zero_cond_t
        self.ste = ste
        self.mode = mode
        self.hot_swap = hot_swap
        self.checkpoint: Checkpoint | None = None
        self.extra_loras: list[LoRALayer] = []  # third-party LoRAs stacked on the checkpoint (`set_extra_loras`)
        self._checkpoint_layer: LoRALayer | None = None
        self.fp8 = False
        self.fp8_fast_accum = False
        self.fp8_keep_bf16: tuple[str, ...] = ()
        self.compiled = False
        self._side_stream: torch.cuda.Stream | None = None  # made on the first CUDA prepare (`_vae_stream`)
        if hot_swap:
            pipe.dit = pipe.enable_lora_hot_loading(pipe.dit)
            pipe.clear_lora(verbose=0)  # a new editor starts from the base model, whatever an earlier one hot-loaded
        self.loras = LoRAStack(lambda: self.pipe.dit, mode="hot" if hot_swap else "merge")
        self.log = log
        self.activation_choice = activation
        self._base_activation = dit_activation(pipe.dit) if activation == "auto" else activation
        if activation != "auto":
            set_dit_activation(pipe.dit, activation)

    @classmethod
    def from_sources(cls, sources: ModelSources, device: str = "cpu", torch_dtype: torch.dtype = torch.bfloat16,
                     hot_swap: bool = False, checkpoint: str | Path | None = None, strength: float = 1.0) -> "Editor":
        pipe = load_pipeline(sources, device=device, torch_dtype=torch_dtype)
        editor = cls(pipe, variant=sources.variant, hot_swap=hot_swap)
        if checkpoint is not None:
            editor.load_checkpoint(checkpoint, strength)
        return editor

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @property
    def bridge(self) -> bool:
        return self.mode == "bridge" or (self.mode == "auto" and self.ste is not None)

    def ste_template(self) -> STE:
        return STE.for_dit(self.pipe.dit)

    def load_checkpoint(self, path_or_ckpt: str | Path | Checkpoint, strength: float = 1.0) -> Checkpoint:
        ckpt = path_or_ckpt if isinstance(path_or_ckpt, Checkpoint) else read_checkpoint(path_or_ckpt)
        with torch.device("meta"):
            template = self.ste_template()
        check_against_model(ckpt, self.pipe.dit, template, self.variant)
        if self.fp8 and not self.hot_swap:
            raise CheckpointError("the DiT runs in fp8: load the checkpoint before `speed_up(fp8=True)`, or create "
                                  "the editor with hot_swap=True (the LoRA then runs beside the fp8 weights)")
        layer = LoRALayer("checkpoint", ckpt.lora, strength, path=ckpt.path) if ckpt.lora.modules else None
        self.loras.set_layers(([layer] if layer else []) + self.extra_loras)  # refuses (changing nothing) when fused
        self._checkpoint_layer = layer
        self._apply_checkpoint_activation(ckpt)
        self.ste = None
        if ckpt.ste:
            ste = self.ste_template()
            ste.load_state_dict(ckpt.ste, strict=True)
            self.ste = ste.to(device=self.pipe.device, dtype=torch.float32).eval().requires_grad_(False)
            if self.compiled:
                self._compile_ste()
        self.checkpoint = ckpt
        return ckpt

    def unload_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        if self._checkpoint_layer is not None:
            self.loras.set_layers(self.extra_loras)  # refused when the LoRA is fused (no hot_swap)
            self._checkpoint_layer = None
        self.ste = None
        self.checkpoint = None
        if self._base_activation is not None:
            set_dit_activation(self.pipe.dit, self._base_activation)

    @property
    def activation(self) -> str | None:
        """The activation the DiT computes now."""
        return dit_activation(self.pipe.dit)

    def _apply_checkpoint_activation(self, ckpt: Checkpoint) -> None:
        trained, note = checkpoint_activation(ckpt.metadata, str(ckpt.path or "checkpoint"), ckpt.has_ste)
        if self.activation_choice == "auto":
            if note:
                self.log(f"[editor] {note}")
            set_dit_activation(self.pipe.dit, trained)
        elif trained != self.activation_choice:
            self.log(f"[editor] {ckpt.path or 'checkpoint'} was trained with the {trained} activation; running it "
                     f"with {self.activation_choice} as configured (dit_activation)")

    def set_extra_loras(self, layers: Sequence[LoRALayer]) -> None:
        """Stack third-party LoRAs (`lora_formats.lora_layer`) on the checkpoint's LoRA, in this order, each with its
        own strength; replaces the previous extra LoRAs (hot swap) or appends to them (fused)."""
        layers = list(layers)
        self.loras.set_layers(([self._checkpoint_layer] if self._checkpoint_layer else []) + layers)
        self.extra_loras = layers

    # ---- preparation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, request: EditRequest, settings: EditSettings) -> PreparedEdit:
        if request.image is None:
            raise EditInputError("no input image given")
        if not isinstance(request.prompt, str):
            raise EditInputError("prompt must be a string")
        prompt = edit_prompt(request.prompt)  # the training prompt's form (prompts.edit_prompt)
        notices: list[str] = []
        original = to_rgb(request.image, "image")
        source, note = fit_image(original, settings.max_pixels)
        notices += [note] if note else []
        refs = []
        for i, ref in enumerate(request.references or ()):
            r, note = fit_image(to_rgb(ref, f"reference {i + 1}"), settings.max_pixels)
            refs.append(r)
            notices += [f"reference {i + 1}: {note}"] if note else []
        mask, note = prepare_mask(request.mask, source.size, original.size)
        notices += [note] if note else []
        w, h = source.size
        box = mask_bbox(mask, (h, w))
        images = [source, *refs]
        side = self._vae_stream()
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(side.device))
        with torch.cuda.stream(side) if side is not None else nullcontext():
            edit_latents = vae_encode(self.pipe, images)
        if settings.cfg_scale != 1.0:  # one text-encoder pass + the negative's tail tokens on its KV cache
            pair = encode_prompt_pair(self.pipe, prompt, images, request.negative_prompt or "")
            prompt_emb, prompt_mask, nega_emb, nega_mask = pair.emb, pair.mask, pair.nega_emb, pair.nega_mask
        else:  # the negative is unused without guidance
            prompt_emb, prompt_mask = encode_prompt(self.pipe, prompt, images)
            nega_emb, nega_mask = prompt_emb, prompt_mask
        if side is not None:  # later work on the main stream waits for the latents; the allocator learns it uses them
            main = torch.cuda.current_stream(side.device)
            main.wait_stream(side)
            for latent in edit_latents:
                latent.record_stream(main)
        if mask is None:
            mask_latent = torch.ones(1, 1, h // 8, w // 8)
        else:
            m = torch.from_numpy(binarize_mask(mask).astype("float32"))[None, None]
            mask_latent = F.avg_pool2d(m, 8)
        return PreparedEdit(source, refs, mask, box, edit_latents, prompt_emb, prompt_mask, nega_emb, nega_mask,
                            mask_latent.to(self.pipe.device), notices)

    def _vae_stream(self) -> "torch.cuda.Stream | None":
        """A second CUDA stream for the VAE encode, which then fills the idle gaps of the launch-bound text encoder
        (many small kernels, host syncs) instead of running before it; None off CUDA."""
        device = torch.device(self.pipe.device)
        if device.type != "cuda":
            return None
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device)
        return self._side_stream

    def white_latents(self, width: int, height: int) -> torch.Tensor:
        """VAE latents of a white image (the LBM sub-stream start), computed once per size."""
        cache = self.__dict__.setdefault("_white_cache", {})
        if (width, height) not in cache:
            cache[(width, height)] = white_latents(self.pipe, width, height).float()
        return cache[(width, height)]

    # ---- speed ---------------------------------------------------------------------------------------------------
    def speed_up(self, compile_blocks: bool = False, fp8: bool = False, fp8_fast_accum: bool | None = None,
                 fp8_keep_bf16: Sequence[str] = ()) -> None:
        """Opt-in, CUDA: `fp8` runs the DiT blocks' linears as fp8 matmuls (approximate; a hot-loaded LoRA stays
        bf16) except the block linears `fp8_keep_bf16` names (e.g. "img_mlp.net.0.proj", the one that carries the
        most fp8 error); `fp8_fast_accum` (with `fp8`; None leaves it as it is) lets Hopper's fp8 GEMMs promote
        partial sums to fp32 less often (bench/RESULTS.md: faster, no measurable added error); `compile_blocks`
        compiles each DiT block with torch.compile (the first edit at a new size compiles, about a minute for the
        full model). The VAE is left eager: compiled, it recompiles for most new image sizes (see
        `speedups.compile_vae`), and every mask box gives the sub stream a new size."""
        if fp8_fast_accum and not (fp8 or self.fp8):
            raise ValueError("fp8_fast_accum changes how the fp8 matmuls accumulate: it needs fp8=True")
        if fp8_keep_bf16 and not fp8:
            raise ValueError("fp8_keep_bf16 names linears to leave out of fp8: it needs fp8=True")
        if fp8 and self.fp8 and tuple(fp8_keep_bf16) != self.fp8_keep_bf16:
            raise ValueError(f"the DiT is already fp8 with {list(self.fp8_keep_bf16)} kept in bf16; the bf16 weights "
                             "of the others are gone, so that cannot change: build a new editor")
        if fp8 and not self.fp8:
            quantize_dit_fp8(self.pipe.dit, fast_accum=bool(fp8_fast_accum), keep_bf16=fp8_keep_bf16)
            self.fp8, self.fp8_fast_accum, self.fp8_keep_bf16 = True, bool(fp8_fast_accum), tuple(fp8_keep_bf16)
        elif fp8_fast_accum is not None and fp8_fast_accum != self.fp8_fast_accum:
            set_fp8_fast_accum(self.pipe.dit, fp8_fast_accum)  # compiled blocks recompile: the flag is guarded
            self.fp8_fast_accum = fp8_fast_accum
        if compile_blocks and not self.compiled:
            compile_dit_blocks(self.pipe.dit, self.ste)  # also resets a training run's recompute budget in-process
            self.compiled = True

    def _compile_ste(self) -> None:
        if self.ste is not None:
            for block in self.ste.ste_blocks:
                block.compile()

    # ---- sampling ----------------------------------------------------------------------------------------------
    def predict(self, prep: PreparedEdit, x: torch.Tensor, x_sub: torch.Tensor | None, timestep: float,
                cfg_scale: float, batch_cfg: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Velocity for main (and sub) at `timestep` (0..1000), classifier-free guided."""
        dtype, device = self.pipe.torch_dtype, self.pipe.device
        use_cfg = cfg_scale != 1.0
        subyx = prep.subyx.to(device) if x_sub is not None else None

        def call(batch: int, emb, mask):
            inputs = DiTInputs(
                latents=x.expand(batch, -1, -1, -1).to(dtype), timestep=torch.full((batch,), float(timestep), device=device),
                prompt_emb=emb, prompt_emb_mask=mask, edit_latents=[e.to(dtype) for e in prep.edit_latents],
                sub_latents=None if x_sub is None else x_sub.expand(batch, -1, -1, -1).to(dtype),
                subyx=None if subyx is None else subyx.expand(batch, -1))
            return bridge_forward(self.pipe.dit, inputs, ste=self.ste if self.bridge else None,
                                  zero_cond_t=self.zero_cond_t)

        # One batch-2 call only where it needs no attention mask: with prompts of different lengths the masked kernel
        # is slower than two unmasked calls (H200, 1024², 40 steps: 37.4 s batched vs 35.0 s sequential).
        if use_cfg and batch_cfg and prep.prompt_emb.shape[1] == prep.nega_emb.shape[1]:
            emb, mask = pad_prompts([prep.prompt_emb, prep.nega_emb], [prep.prompt_mask, prep.nega_mask])
            main, sub = call(2, emb, mask)
            pos, neg = main[:1], main[1:]
            sub_pos, sub_neg = (sub[:1], sub[1:]) if sub is not None else (None, None)
        else:
            pos, sub_pos = call(1, prep.prompt_emb, prep.prompt_mask)
            if use_cfg:
                neg, sub_neg = call(1, prep.nega_emb, prep.nega_mask)
        if not use_cfg:
            return pos.float(), None if sub_pos is None else sub_pos.float()
        v = neg.float() + cfg_scale * (pos.float() - neg.float())
        v_sub = None if sub_pos is None else sub_neg.float() + cfg_scale * (sub_pos.float() - sub_neg.float())
        return v, v_sub

    @torch.no_grad()
    def sample(self, prep: PreparedEdit, settings: EditSettings,
               progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        settings.validate()
        device = self.pipe.device
        w, h = prep.size
        source = prep.edit_latents[0].float()
        if settings.sampler == "lbm":  # deterministic: starts from the source (and white), no noise drawn
            grid = lbm_grid(settings.steps).tolist()
            x = source.clone()
            x_sub = self.white_latents(prep.box.width, prep.box.height) if self.bridge else None
        else:
            gen = torch.Generator("cpu").manual_seed(int(settings.seed))
            noise = torch.randn(1, 16, h // 8, w // 8, generator=gen).to(device)
            sub_noise = torch.randn(1, 16, prep.box.height // 8, prep.box.width // 8, generator=gen).to(device)
            grid = flow_sigmas(settings.steps, h, w, settings.schedule).tolist()
            x = noise.clone()
            x_sub = sub_noise.clone() if self.bridge else None
        keep = 1 - prep.mask_latent  # 1 outside the edit region
        steps = len(grid) - 1
        for i in range(steps):
            s, s_next = grid[i], grid[i + 1]
            v, v_sub = self.predict(prep, x, x_sub, 1000.0 * s, settings.cfg_scale, settings.batch_cfg)
            x = euler_step(x, v, s, s_next)
            if x_sub is not None:
                x_sub = euler_step(x_sub, v_sub, s, s_next)
            if settings.blend_alpha > 0 and prep.mask is not None:
                reference = source if settings.sampler == "lbm" or s_next == 0 else (1 - s_next) * source + s_next * noise
                a = settings.blend_alpha * keep
                x = x * (1 - a) + reference * a
            if progress is not None:
                progress(i + 1, steps)
        return x, x_sub

    def edit(self, request: EditRequest, settings: EditSettings | None = None,
             progress: Callable[[int, int], None] | None = None) -> EditResult:
        settings = settings or EditSettings()
        settings.validate()
        prep = self.prepare(request, settings)
        x, x_sub = self.sample(prep, settings, progress)
        image = vae_decode(self.pipe, x)[0]
        sub_image = vae_decode(self.pipe, x_sub)[0] if x_sub is not None else None
        info = asdict(settings) | {"mode": "bridge" if self.bridge else "plain", "variant": self.variant,
                                   "zero_cond_t": self.zero_cond_t, "size": list(prep.size), "fp8": self.fp8,
                                   "fp8_fast_accum": self.fp8_fast_accum,
                                   "fp8_keep_bf16": list(self.fp8_keep_bf16),
                                   "dit_activation": self.activation,
                                   "box": list(prep.box.to_subyx()),
                                   "checkpoint": str(self.checkpoint.path) if self.checkpoint else None,
                                   "extra_loras": [layer.info() for layer in self.extra_loras]}
        return EditResult(image, sub_image, info, prep.notices, x, x_sub)
