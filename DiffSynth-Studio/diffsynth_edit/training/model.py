"""The trainable model: the frozen DiT (+ LoRA) and the STE behind one forward that returns the loss, and its
construction (load, inject LoRA, the STE, an optional warm start, compiled blocks)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..activation import checkpoint_activation
from ..bridge_dit import DiTInputs, bridge_forward
from ..checkpoint import read_checkpoint
from ..fp8_base import fp8_matmul_blocks
from ..loading import ModelSources, load_pipeline
from ..low_memory import apply_low_memory, low_memory_enabled, several_processes
from ..speedups import compile_blocks
from ..ste import STE
from ..variants import ModelVariant
from .config import BUDGET_OFF_FLAGS, TrainConfig
from .faults import TrainingError
from .lora import inject_lora, load_into_training
from .losses import combine_losses, lbm_predicted_target, per_sample_mse


def stored_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype `p` has when a forward uses it. Under ZeRO-3 `p.data` is an empty placeholder whose dtype can differ
    from the partition's (`ds_tensor`), and a gathered parameter takes the partition's dtype."""
    ds_tensor = getattr(p, "ds_tensor", None)
    return ds_tensor.dtype if ds_tensor is not None else p.dtype


def frozen_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of `module`'s (first) frozen weight as its forward sees it."""
    return stored_dtype(next(p for p in module.parameters() if not p.requires_grad))


class EditTrainModel(nn.Module):
    """DiT (+ LoRA) and STE behind one forward that returns the loss, so DDP/DeepSpeed wrap one module."""

    def __init__(self, dit: nn.Module, ste: STE | None, cfg: TrainConfig, zero_cond_t: bool, vae=None):
        super().__init__()
        self.dit, self.ste, self.cfg, self.zero_cond_t = dit, ste, cfg, zero_cond_t
        # The frozen DiT's dtype: its inputs are cast to it here, at the one boundary between the fp32 cache/noise
        # and the DiT (ZeRO-3's linear, like F.linear, needs input and weight of one dtype).
        self.base_dtype = frozen_dtype(dit)
        self.pixel_loss = PixelLoss(vae, cfg) if cfg.objective == "lbm" and cfg.pixel_loss_weight > 0 else None

    def forward(self, batch: dict, noised) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        dtype = self.base_dtype
        bridge = self.cfg.mode == "bridge"
        inputs = DiTInputs(
            latents=noised.latents.to(dtype), timestep=noised.timestep,
            prompt_emb=batch["prompt_emb"].to(dtype), prompt_emb_mask=batch["prompt_emb_mask"],
            edit_latents=[e.to(dtype) for e in batch["edit_latents"]],
            sub_latents=noised.sub_latents.to(dtype) if bridge else None,
            subyx=batch["subyx"] if bridge else None)
        # No global autocast: it would run the frozen DiT's LayerNorms in fp32. peft casts activations to the fp32
        # LoRA weights itself (TF32 matmuls) and casts the result back; the STE autocasts its own small encoder.
        main, sub = bridge_forward(self.dit, inputs, ste=self.ste, zero_cond_t=self.zero_cond_t,
                                   use_gradient_checkpointing=(self.cfg.gradient_checkpointing and
                                                               self.cfg.recompute_budget is None),
                                   checkpoint_last_n=self.cfg.checkpoint_last_n)
        main_l = per_sample_mse(main, noised.target)
        sub_l = per_sample_mse(sub, noised.sub_target) if bridge else None
        loss = combine_losses(main_l, sub_l, noised.weight)
        if self.pixel_loss is not None:
            x_hat = lbm_predicted_target(noised.latents.float(), main.float(), noised.s)
            loss = loss + self.cfg.pixel_loss_weight * self.pixel_loss(x_hat, batch["input_latents"].float())
        return loss, main_l.mean().detach(), None if sub_l is None else sub_l.mean().detach()


class PixelLoss(nn.Module):
    """LBM's optional pixel loss: decode a random crop (≤ 64 latent px) of the predicted target and of the target
    latents with the frozen VAE; L1, or LPIPS when the `lpips` package and its weights are available locally."""

    def __init__(self, vae, cfg: TrainConfig, crop: int = 64):
        super().__init__()
        if vae is None:
            raise TrainingError("pixel_loss_weight > 0 needs the VAE (give --vae-path or --model-root)")
        self.vae, self.kind, self.crop = vae, cfg.pixel_loss, crop
        self.lpips = None
        if self.kind == "lpips":
            try:
                import lpips  # noqa: F401

                self.lpips = lpips.LPIPS(net="vgg", pretrained=True, verbose=False).eval().requires_grad_(False)
            except Exception as e:
                raise TrainingError(f"pixel_loss = lpips needs the `lpips` package with its VGG weights available "
                                    f"locally ({e}); use pixel_loss = l1") from None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h, w = pred.shape[-2:]
        ch, cw = min(h, self.crop), min(w, self.crop)
        y = int(torch.randint(0, h - ch + 1, (1,)))
        x = int(torch.randint(0, w - cw + 1, (1,)))
        dtype = next(self.vae.parameters()).dtype
        img = self.vae.decode(pred[..., y:y + ch, x:x + cw].to(dtype)).float()
        with torch.no_grad():
            ref = self.vae.decode(target[..., y:y + ch, x:x + cw].to(dtype)).float()
        if self.lpips is not None:
            return self.lpips.to(img.device)(img.clamp(-1, 1), ref.clamp(-1, 1)).mean()
        return (img - ref).abs().mean()


def check_fp8_matmuls(device: torch.device, zero3: bool) -> None:
    """--fp8-matmuls needs fp8 tensor cores (on CUDA) and the whole DiT in one process (DDP would broadcast the fp8
    buffers; ZeRO-3 partitions the weights it would quantise)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise TrainingError(f"--fp8-matmuls needs a GPU with fp8 tensor cores (Ada or Hopper); "
                            f"{torch.cuda.get_device_name(device)} has none")
    if zero3 or several_processes():
        raise TrainingError("--fp8-matmuls is a single-process mode (DDP would broadcast the fp8 weight buffers, "
                            "ZeRO-3 partitions the weights); run one process or turn it off")


def build_trainable(cfg: TrainConfig, variant: ModelVariant, device: torch.device, zero3: bool, zero_cond_t: bool,
                    say: Callable[[str], None]) -> tuple[object, EditTrainModel, list[nn.Parameter]]:
    """(the pipeline with the frozen DiT and, when validation or the pixel loss needs it, the VAE; the model; its
    trainable parameters). The LoRA and STE initialisation follow `cfg.seed`."""
    # The frozen DiT is bf16 on CUDA, and under ZeRO-3 on any device: there accelerate registers the DeepSpeed
    # config with transformers (whatever zero3_init_flag says), so diffsynth's loader builds the DiT inside
    # deepspeed.zero.Init(dtype=...), which partitions it as it is built. zero.Init ignores a requested fp32 on an
    # accelerator without fp16 (DeepSpeed's CPU accelerator: `dtype or fp16 if fp16_supported else bf16`) and
    # stores the partitions in bf16 while the placeholders report fp32; asking for bf16 keeps them consistent.
    dtype = torch.bfloat16 if device.type == "cuda" or zero3 else torch.float32
    sources = ModelSources(variant=variant.name, model_root=cfg.model_root, dit_path=cfg.dit_path,
                           vae_path=cfg.vae_path, allow_download=cfg.allow_download,
                           dit_activation=cfg.dit_activation)
    need_vae = bool(cfg.validate_every) or cfg.pixel_loss_weight > 0
    components = ("dit", "vae") if need_vae else ("dit",)
    lowmem = low_memory_enabled(cfg)  # the DiT is then loaded on the host and moved block by block
    pipe = load_pipeline(sources, components=components, device="cpu" if lowmem else str(device), torch_dtype=dtype)
    dit = pipe.dit
    if frozen_dtype(dit) != dtype:
        raise TrainingError(f"the DiT was loaded as {frozen_dtype(dit)}, not the requested {dtype}")
    targets = cfg.lora_targets or list(variant.lora_targets)
    alpha = float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank)
    tdtype = torch.float32 if cfg.trainable_dtype == "fp32" else torch.bfloat16
    torch.manual_seed(cfg.seed)  # LoRA A and STE initialisation are reproducible per seed
    params = inject_lora(dit, cfg.lora_rank, alpha, targets, tdtype)
    ste = None
    if cfg.mode == "bridge":
        ste = STE.for_dit(dit).to(device=device, dtype=tdtype)
        ste.requires_grad_(cfg.train_ste)
        if cfg.train_ste:
            params += list(ste.parameters())
    if cfg.init_from is not None:
        init = read_checkpoint(cfg.init_from)
        info = load_into_training(init, dit, ste, cfg.lora_rank, alpha, variant.name)
        trained, note = checkpoint_activation(init.metadata, str(cfg.init_from), init.has_ste)
        if note or trained != cfg.dit_activation:
            say(f"[train] {note or f'{cfg.init_from} was trained with the {trained} activation'}; this "
                f"run trains with {cfg.dit_activation} (dit_activation)")
        say(f"[train] warm start from {cfg.init_from}: {info}")
    if lowmem:
        apply_low_memory(dit, cfg, device, pipe=pipe)
    if cfg.fp8_matmuls:
        check_fp8_matmuls(device, zero3)
        say(f"[train] fp8 matmuls: {fp8_matmul_blocks(dit)} frozen block linears compute in fp8")
    if cfg.compile_blocks:
        if zero3:
            raise TrainingError("compile_blocks is not supported under DeepSpeed ZeRO-3 (its parameter gathering "
                                "hooks run inside the blocks); use DDP or ZeRO-2, or pass --compile-blocks false "
                                f"{BUDGET_OFF_FLAGS}")
        compile_blocks(dit, ste, recompute_budget=cfg.recompute_budget, save_attention=cfg.save_attention)
    return pipe, EditTrainModel(dit, ste, cfg, zero_cond_t, vae=pipe.vae), params
