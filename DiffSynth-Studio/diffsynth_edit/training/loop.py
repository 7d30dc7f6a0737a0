"""The training loop (SFT and LBM), on accelerate: read like nanoGPT's — build, then one loop over optimizer steps.

"step" always means optimizer step: logs, file names, save_every, max_steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..activation import checkpoint_activation
from ..atomic import atomic_save_safetensors, atomic_write_json, kill_point
from ..bridge_dit import DiTInputs, bridge_forward
from ..cache.store import open_cache
from ..checkpoint import read_checkpoint, write_checkpoint
from ..speedups import compile_blocks
from ..config import config_to_dict
from ..loading import ModelSources, load_pipeline
from ..low_memory import apply_low_memory, low_memory_enabled
from ..ste import STE
from ..variants import VariantMismatchError, get_variant
from .config import TrainConfig
from .data import BatchStream, collate, sample_generator
from .distributed import build_accelerator
from .logger import RunLogger
from .lora import inject_lora, load_into_training, lora_state_dict
from .losses import combine_losses, lbm_predicted_target, make_lbm_inputs, make_sft_inputs, per_sample_mse
from .state_io import load_state, load_torch_state, restore_optimizer_state, save_state

KILL_ENV = "DIFFSYNTH_EDIT_TRAIN_TEST_KILL"  # crash tests: "step:<n>" or "state-swap:<n>" (atomic.kill_point)


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, bad resume state …); nothing corrupt was written."""


def deepspeed_config_problems(ds: dict, optimizer: str, grad_clip: float = 0.0) -> list[str]:
    """The known traps of ProdigyPlusScheduleFree under DeepSpeed (notes/lbm_prodigy.md §4) found in `ds`, and a
    clipping that differs from the run's `grad_clip` (under DeepSpeed only the config's value clips: accelerate's
    `clip_grad_norm_` does nothing there)."""
    problems = []
    zero = ds.get("zero_optimization", {})
    clip = ds.get("gradient_clipping", "auto")
    want = 0.0 if optimizer == "prodigy" else float(grad_clip)  # TrainConfig refuses clipping with Prodigy
    if clip in ("auto", None) or float(clip) != want:
        why = ("ProdigyPlusScheduleFree must not be clipped" if optimizer == "prodigy" else
               f"the run's grad_clip is {grad_clip} and under DeepSpeed only the config's value clips")
        problems.append(f"\"gradient_clipping\" is {clip!r}: {why}, so set \"gradient_clipping\": {want} in the "
                        f"DeepSpeed config{'' if optimizer == 'prodigy' else ' or change grad_clip'} (accelerate's "
                        f"'auto' and DeepSpeed >= 0.19.3 mean 1.0)")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none") and ds.get("zero_force_ds_cpu_optimizer", True) is not False:
        problems.append("optimizer offload without \"zero_force_ds_cpu_optimizer\": false silently replaces the "
                        "optimizer with DeepSpeedCPUAdam")
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "allgather_bucket_size"):
        if zero.get(key) == "auto":
            problems.append(f"\"{key}\": \"auto\" needs model.config.hidden_size, which the DiT has not; give an "
                            f"integer such as 500000000")
    return problems


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
                                   use_gradient_checkpointing=self.cfg.gradient_checkpointing,
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


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter], schedule_free: bool = True):
    if cfg.optimizer == "prodigy":
        from prodigyplus import ProdigyPlusScheduleFree

        # One parameter group: several groups crash under DeepSpeed ZeRO (notes/lbm_prodigy.md §4.2).
        return ProdigyPlusScheduleFree([{"params": params}], lr=cfg.lr, betas=tuple(cfg.betas),
                                       weight_decay=cfg.weight_decay, d0=cfg.d0, use_schedulefree=schedule_free)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress
    return f


def is_schedule_free(optimizer) -> bool:
    """ProdigyPlusScheduleFree with schedule-free on (ZeRO-3 builds it with use_schedulefree=False: it keeps its
    eval()/train() methods, but they do nothing and the weights are the trained ones)."""
    return (hasattr(optimizer, "eval") and hasattr(optimizer, "train") and "ProdigyPlus" in type(optimizer).__name__
            and all(g.get("use_schedulefree", True) for g in optimizer.param_groups))


def effective_lr(optimizer) -> float:
    g = optimizer.param_groups[0]
    return float(g.get("d", 1.0)) * float(g["lr"])


def _base_optimizer(optimizer):
    """The client optimizer under accelerate's (and DeepSpeed's ZeRO) wrappers."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise TrainingError(f"--device {cfg.device}: torch sees no CUDA device here (use --device cpu or auto)")
        self.accelerator = build_accelerator(cfg)  # the scheduler steps once per optimizer step in every mode
        self.main = self.accelerator.is_main_process
        self.deepspeed = self.accelerator.state.deepspeed_plugin is not None
        self.zero_stage = 0  # ZeRO stage under DeepSpeed (0 also without DeepSpeed)
        self.zero3 = False
        if self.deepspeed:
            self._check_deepspeed()
        self.device = self.accelerator.device
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 LoRA matmuls
            torch.backends.cudnn.allow_tf32 = True
        self.cache = open_cache(cfg.cache_dir)
        self.variant = get_variant(self.cache.variant)
        if cfg.variant is not None and str(cfg.variant) != str(self.cache.variant):
            raise VariantMismatchError(f"--variant {cfg.variant} does not fit the cache {cfg.cache_dir}, which was "
                                       f"made for Qwen-Image-Edit-{self.cache.variant}; give --variant "
                                       f"{self.cache.variant} or a cache made for {cfg.variant}")
        self.zero_cond_t = self.variant.zero_cond_t  # from the manifest's variant, never from a flag
        if self.cache.zero_cond_t != self.zero_cond_t:
            raise TrainingError(f"cache {cfg.cache_dir} says zero_cond_t={self.cache.zero_cond_t} for variant "
                                f"{self.variant.name}; re-create the cache")
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _check_deepspeed(self) -> None:
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        problems = deepspeed_config_problems(ds, self.cfg.optimizer, self.cfg.grad_clip)
        if problems:
            raise TrainingError("DeepSpeed config refused: " + "; ".join(problems))
        stage = int(ds.get("zero_optimization", {}).get("stage", 0))
        if self.cfg.optimizer == "prodigy" and stage >= 1:
            self._print("[train] note: under ZeRO each rank estimates Prodigy's step size d from its own shard "
                        "(no all-reduce) and factored second moments are disabled; DDP is the exact mode")
        self.zero_stage = stage
        self.zero3 = stage == 3
        if self.cfg.optimizer == "prodigy" and self.zero3:
            self._print("[train] ZeRO-3: ProdigyPlusScheduleFree runs with use_schedulefree=False. Under ZeRO-3 its "
                        "optimizer.eval() sees no parameters, so the averaged (evaluation) weights could never be "
                        "saved; without schedule-free the saved weights are the trained ones.")

    # ---- building ---------------------------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        # The frozen DiT is bf16 on CUDA, and under ZeRO-3 on any device: there accelerate registers the DeepSpeed
        # config with transformers (whatever zero3_init_flag says), so diffsynth's loader builds the DiT inside
        # deepspeed.zero.Init(dtype=...), which partitions it as it is built. zero.Init ignores a requested fp32 on an
        # accelerator without fp16 (DeepSpeed's CPU accelerator: `dtype or fp16 if fp16_supported else bf16`) and
        # stores the partitions in bf16 while the placeholders report fp32; asking for bf16 keeps them consistent.
        dtype = torch.bfloat16 if self.device.type == "cuda" or self.zero3 else torch.float32
        sources = ModelSources(variant=self.variant.name, model_root=cfg.model_root, dit_path=cfg.dit_path,
                               vae_path=cfg.vae_path, allow_download=cfg.allow_download,
                               dit_activation=cfg.dit_activation)
        need_vae = bool(cfg.validate_every) or cfg.pixel_loss_weight > 0
        components = ("dit", "vae") if need_vae else ("dit",)
        lowmem = low_memory_enabled(cfg)  # the DiT is then loaded on the host and moved block by block
        self.pipe = load_pipeline(sources, components=components, device="cpu" if lowmem else str(self.device),
                                  torch_dtype=dtype)
        dit = self.pipe.dit
        if frozen_dtype(dit) != dtype:
            raise TrainingError(f"the DiT was loaded as {frozen_dtype(dit)}, not the requested {dtype}")
        targets = cfg.lora_targets or list(self.variant.lora_targets)
        alpha = float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank)
        tdtype = torch.float32 if cfg.trainable_dtype == "fp32" else torch.bfloat16
        torch.manual_seed(cfg.seed)  # LoRA A and STE initialisation are reproducible per seed
        params = inject_lora(dit, cfg.lora_rank, alpha, targets, tdtype)
        self.ste = None
        if cfg.mode == "bridge":
            self.ste = STE.for_dit(dit).to(device=self.device, dtype=tdtype)
            self.ste.requires_grad_(cfg.train_ste)
            if cfg.train_ste:
                params += list(self.ste.parameters())
        if cfg.init_from is not None:
            init = read_checkpoint(cfg.init_from)
            info = load_into_training(init, dit, self.ste, cfg.lora_rank, alpha, self.variant.name)
            trained, note = checkpoint_activation(init.metadata, str(cfg.init_from), init.has_ste)
            if note or trained != cfg.dit_activation:
                self._print(f"[train] {note or f'{cfg.init_from} was trained with the {trained} activation'}; this "
                            f"run trains with {cfg.dit_activation} (dit_activation)")
            self._print(f"[train] warm start from {cfg.init_from}: {info}")
        self.n_trainable = sum(p.numel() for p in params)
        if lowmem:
            apply_low_memory(dit, cfg, self.device, pipe=self.pipe)
        if cfg.compile_blocks:
            if self.zero3:
                raise TrainingError("compile_blocks is not supported under DeepSpeed ZeRO-3 (its parameter gathering "
                                    "hooks run inside the blocks); use DDP or ZeRO-2, or compile_blocks = false")
            compile_blocks(dit, self.ste)
        model = EditTrainModel(dit, self.ste, cfg, self.zero_cond_t, vae=self.pipe.vae)
        optimizer = build_optimizer(cfg, params, schedule_free=not self.zero3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.schedule_free = is_schedule_free(_base_optimizer(self.optimizer))
        self.stream = BatchStream(self.cache, cfg.batch_size, cfg.seed, self.accelerator.process_index,
                                  self.accelerator.num_processes)
        self.step = 0

    def _print(self, *a) -> None:
        if self.main:
            print(*a, flush=True)

    # ---- schedule-free views ----------------------------------------------------------------------------------
    def eval_view(self) -> None:
        if self.schedule_free:
            _base_optimizer(self.optimizer).eval()
            self._sync_deepspeed_weights()
        self.model.eval()

    def train_view(self) -> None:
        if self.schedule_free:
            _base_optimizer(self.optimizer).train()
            self._sync_deepspeed_weights()
        self.model.train()

    def _sync_deepspeed_weights(self) -> None:
        # ZeRO-1/2: eval()/train() move the fp32 masters; copy them into the bf16 module weights we save/sample.
        if self.deepspeed:
            engine_opt = getattr(self.optimizer, "optimizer", None)
            if hasattr(engine_opt, "update_lp_params"):
                engine_opt.update_lp_params()

    # ---- state --------------------------------------------------------------------------------------------------
    def unwrapped(self) -> EditTrainModel:
        return self.accelerator.unwrap_model(self.model)

    def trainable_state(self) -> tuple[dict, dict]:
        """LoRA and STE tensors on CPU; under ZeRO-3 only these (not the 20B base) are gathered."""
        m = self.unwrapped()
        gather = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for p in m.parameters() if p.requires_grad],
                                                       modifier_rank=None)
        with gather:
            lora = {k: v.detach().cpu().clone() for k, v in lora_state_dict(m.dit).items()}
            ste = {} if m.ste is None else {k: v.detach().cpu().clone() for k, v in m.ste.state_dict().items()}
        return lora, ste

    def metadata(self) -> dict:
        import diffsynth

        from .. import __version__

        cfg = self.cfg
        return {"format": "qwen-edit-workspace/1", "variant": self.variant.name, "zero_cond_t": self.zero_cond_t,
                "mode": cfg.mode, "objective": cfg.objective, "lora_rank": cfg.lora_rank,
                "dit_activation": cfg.dit_activation,
                "lora_alpha": float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank),
                "alpha_folded": False, "lora_targets": cfg.lora_targets or list(self.variant.lora_targets),
                "step": self.step, "optimizer": cfg.optimizer, "weights": "eval" if self.schedule_free else "train",
                "diffsynth": diffsynth.__version__ if hasattr(diffsynth, "__version__") else "2.1.12",
                "workspace": __version__}

    def save_checkpoint(self) -> Path:
        """Caller has switched to the eval view. Atomic; prunes to keep_last."""
        path = self.run_dir / f"step-{self.step:06d}.safetensors"
        lora, ste = self.trainable_state()
        if self.main:
            write_checkpoint(path, lora, ste, self.metadata())
            ckpts = sorted(self.run_dir.glob("step-*.safetensors"))
            for old in ckpts[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
                old.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        return path

    def _zero_optimizer(self):
        """DeepSpeed's ZeRO optimizer (it owns the fp32 master partitions and drives the client optimizer)."""
        return self.model.optimizer

    def _zero_state_file(self, state_dir: Path) -> Path:
        return state_dir / f"zero-rank{self.accelerator.process_index:05d}.pt"

    def save_resume_state(self) -> None:
        """Train-view weights, optimizer, scheduler, step, data position and RNG, in state/ (atomic swap).

        Under DeepSpeed ZeRO every rank also writes its ZeRO optimizer state (fp32 master partition and the client
        optimizer's state of that partition) to `zero-rankNNNNN.pt`: the client optimizer sees only flat partitions,
        so its state is per rank, and the masters must come back with it (the state dir must be on a filesystem all
        ranks share)."""
        lora, ste = self.trainable_state()
        final = self.run_dir / "state"
        tmp = self.run_dir / f".state-{self.step}.tmp"
        if self.zero_stage >= 1:
            if self.main:
                tmp.mkdir(parents=True, exist_ok=True)
            self.accelerator.wait_for_everyone()
            torch.save(self._zero_optimizer().state_dict(), self._zero_state_file(tmp))
            self.accelerator.wait_for_everyone()
        if not self.main:
            self.accelerator.wait_for_everyone()
            return
        tmp.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.cpu().contiguous() for k, v in lora.items()}
        tensors.update({"ste." + k: v.cpu().contiguous() for k, v in ste.items()})
        atomic_save_safetensors(tmp / "trainable.safetensors", tensors)
        blob = {"scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.zero_stage == 0:
            blob["optimizer"] = _base_optimizer(self.optimizer).state_dict()
        save_state(tmp / "optimizer", blob)  # safetensors + JSON: loads without pickle, every dtype kept
        atomic_write_json(tmp / "trainer.json", {"step": self.step, "data": self.stream.state_dict(),
                                                 "config": config_to_dict(self.cfg),
                                                 "deepspeed": self._deepspeed_layout()})
        old = self.run_dir / f".state-old-{self.step}"
        if final.exists():
            final.rename(old)
        kill_point(KILL_ENV, "state-swap", self.step)  # the window `_find_resume_state` covers
        tmp.rename(final)
        import shutil

        for leftover in [old, *self.run_dir.glob(".state-*")]:  # incl. those of an earlier crash
            shutil.rmtree(leftover, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _deepspeed_layout(self) -> dict | None:
        if not self.deepspeed:
            return None
        return {"stage": self.zero_stage, "world_size": self.accelerator.num_processes}

    def _find_resume_state(self) -> Path | None:
        """state/, else (a crash between the two renames of `save_resume_state`) the complete leftover with the
        highest step: `.state-old-<n>` (the previous state) or `.state-<n>.tmp` (the new one: trainer.json is written
        last, so a folder that has it is whole)."""
        state = self.run_dir / "state"
        if (state / "trainer.json").is_file():
            return state
        candidates = [p for p in self.run_dir.glob(".state-*") if (p / "trainer.json").is_file()]
        if not candidates:
            return None
        return max(candidates, key=lambda p: json.loads((p / "trainer.json").read_text())["step"])

    def load_resume_state(self) -> bool:
        state = self._find_resume_state()
        if state is None:
            return False
        from safetensors.torch import load_file

        info = json.loads((state / "trainer.json").read_text())
        saved_layout, layout = info.get("deepspeed"), self._deepspeed_layout()
        if saved_layout != layout:
            raise TrainingError(f"resume state {state} was written under DeepSpeed {saved_layout or 'off'}, this run "
                                f"is {layout or 'without DeepSpeed'}; the optimizer state is partitioned per rank, so "
                                f"resume with the same mode and number of processes (or warm-start with --init-from)")
        tensors = load_file(str(state / "trainable.safetensors"))
        m = self.unwrapped()
        own = dict(m.dit.named_parameters())
        for k, v in tensors.items():
            if not k.startswith("ste.") and (k not in own or tuple(getattr(own[k], "ds_shape", own[k].shape))
                                             != tuple(v.shape)):
                raise TrainingError(f"resume state {state} does not fit this run's LoRA ({k}); "
                                    f"use a new run name or the same rank/targets")
        if not self.zero3:
            # ZeRO-3's parameters are partitioned; its weights come back with the fp32 masters below.
            with torch.no_grad():
                for k, v in tensors.items():
                    if not k.startswith("ste."):
                        own[k].copy_(v)
                if m.ste is not None:
                    m.ste.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ste.")},
                                          strict=True)
        # optimizer.pt: states written before optimizer.safetensors/.json, read with weights_only=True.
        blob = (load_state(state / "optimizer") if (state / "optimizer.json").is_file()
                else load_torch_state(state / "optimizer.pt"))
        if self.zero_stage >= 1:
            # The ZeRO optimizer restores this rank's fp32 master partition (ZeRO-3: and the module's partitions from
            # it) and the client optimizer's state; ZeRO-1/2 then refresh the module weights from the masters.
            zero_file = self._zero_state_file(state)
            if not zero_file.is_file():
                raise TrainingError(f"resume state {state} has no {zero_file.name}; it was not written by this "
                                    f"DeepSpeed layout")
            states = [None] * self.accelerator.num_processes
            states[self.accelerator.process_index] = load_torch_state(zero_file, allow_deepspeed=True)
            zero_opt = self._zero_optimizer()
            zero_opt.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
            if hasattr(zero_opt, "update_lp_params"):
                zero_opt.update_lp_params()
        else:
            restore_optimizer_state(_base_optimizer(self.optimizer), blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        self.step = int(info["step"])
        self.stream.load_state_dict(info["data"])
        return True

    # ---- one micro-batch ----------------------------------------------------------------------------------------
    def micro_batch(self):
        cfg = self.cfg
        ids, epoch = self.stream.next()
        gens = [sample_generator(cfg.seed, epoch, i) for i in ids]
        use_neg = [bool(torch.rand(1, generator=g) < cfg.cfg_drop_prob) for g in gens]
        batch = collate([self.cache.load(i) for i in ids], use_neg, self.device)
        bridge = cfg.mode == "bridge"
        if cfg.objective == "lbm":
            noised = make_lbm_inputs(batch, gens, bridge, cfg.lbm_grid, cfg.lbm_probs, cfg.bridge_sigma)
        else:
            noised = make_sft_inputs(batch, gens, bridge)
        return batch, noised

    # ---- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> Path | None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        resumed = cfg.resume and self.load_resume_state()
        if cfg.resume and not resumed:
            self._print(f"[train] --resume: no state in {self.run_dir / 'state'}, starting fresh")
        if self.main:
            atomic_write_json(self.run_dir / "config.json", config_to_dict(cfg) | {"variant": self.variant.name})
        logger = RunLogger(self.run_dir, config_to_dict(cfg) | {"run_name": cfg.run_name}, cfg.wandb,
                           enabled=self.main, resume=resumed, resume_step=self.step)
        self._print(f"[train] {cfg.objective} {cfg.mode} Qwen-Image-Edit-{self.variant.name} zero_cond_t="
                    f"{self.zero_cond_t}: {self.n_trainable / 1e6:.2f} M trainable, {len(self.cache)} cached samples, "
                    f"accumulation {cfg.gradient_accumulation} x batch {cfg.batch_size} x {self.accelerator.num_processes} "
                    f"process(es); {'resuming at step ' + str(self.step) if resumed else 'from step 0'}")
        self.train_view()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.main, desc="train", unit="step")
        last_path = None
        running = None
        t0, samples = time.time(), 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < cfg.max_steps:
            acc_loss = torch.zeros((), device=self.device)
            acc_main = torch.zeros((), device=self.device)
            acc_sub = torch.zeros((), device=self.device)
            for _ in range(cfg.gradient_accumulation):
                batch, noised = self.micro_batch()
                with self.accelerator.accumulate(self.model):
                    loss, lm, ls = self.model(batch, noised)
                    self.accelerator.backward(loss)
                    acc_loss += loss.detach() / cfg.gradient_accumulation
                    acc_main += lm / cfg.gradient_accumulation
                    if ls is not None:
                        acc_sub += ls / cfg.gradient_accumulation
                    samples += len(batch["ids"]) * self.accelerator.num_processes
                    if self.accelerator.sync_gradients:
                        if not torch.isfinite(acc_loss):
                            raise TrainingError(f"non-finite loss ({acc_loss.item()}) at step {self.step + 1} "
                                                f"(samples {batch['ids']}); stopping without saving. Lower the learning "
                                                f"rate or check the cache with `train_2511.py verify`.")
                        grad_norm = self._grad_norm()
                        if cfg.grad_clip > 0:
                            self.accelerator.clip_grad_norm_(self._params(), cfg.grad_clip)
                        self.optimizer.step()
                        step_lr = effective_lr(_base_optimizer(self.optimizer))  # the lr this step used
                        self.scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            # Means over all ranks' micro-batches (each rank's own mean would log rank 0's share only).
            loss_v, main_v, sub_v = self.accelerator.reduce(torch.stack([acc_loss, acc_main, acc_sub]),
                                                            reduction="mean").tolist()
            running = loss_v if running is None else 0.9 * running + 0.1 * loss_v
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                dt = time.time() - t0
                logger.log(self.step, {
                    "loss": loss_v, "loss_main": main_v,
                    "loss_sub": sub_v if cfg.mode == "bridge" else "",
                    "lr": step_lr, "grad_norm": grad_norm,
                    "samples_per_s": samples / max(dt, 1e-9),
                    "peak_mem_gib": (torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                                     if self.device.type == "cuda" else "")})
                t0, samples = time.time(), 0
            save_now = self.step % cfg.save_every == 0 or self.step == cfg.max_steps
            validate_now = bool(cfg.validate_every) and (self.step % cfg.validate_every == 0 or self.step == cfg.max_steps)
            if save_now or validate_now:
                self.eval_view()
                if save_now:
                    last_path = self.save_checkpoint()
                if validate_now:
                    self.run_validation(logger)
                self.train_view()
                if save_now:
                    self.save_resume_state()
            kill_point(KILL_ENV, "step", self.step)
        bar.close()
        curve = logger.finish()
        if curve is not None:
            self._print(f"[train] loss curve: {curve}")
        self._print(f"[train] done: {last_path}")
        return last_path

    def _params(self):
        return [p for p in self.unwrapped().parameters() if p.requires_grad]

    def _grad_norm(self) -> float:
        if self.deepspeed:
            # DeepSpeed keeps the gradients in its own (partitioned) buffers, p.grad stays None; the engine has
            # already stepped inside accelerator.backward at the accumulation boundary and kept the norm.
            norm = self.model.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        grads = [p.grad.detach().float().norm() for p in self._params() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def run_validation(self, logger: RunLogger) -> Path | None:
        from .validation import validate

        m = self.unwrapped()
        ste = m.ste if self.cfg.mode == "bridge" else None
        path = self.run_dir / "samples" / f"step-{self.step:06d}.png"
        out = None
        if self.zero3:
            # ZeRO-3: the DiT and STE partitions are all-gathered module by module inside each forward (a collective),
            # so every rank samples the same edits and only the main process writes them. The VAE, built partitioned
            # by zero.Init and outside the engine's hooks unless the pixel loss uses it, is gathered whole.
            import deepspeed

            vae_params = list(self.pipe.vae.parameters()) if self.pipe.vae is not None else []
            with deepspeed.zero.GatheredParameters(vae_params, modifier_rank=None):
                out, metrics = validate(self.pipe, m.dit, ste, self.cfg, self.variant.name,
                                        path if self.main else None)
        elif self.main:
            out, metrics = validate(self.pipe, m.dit, ste, self.cfg, self.variant.name, path)
        if self.main:
            from .eval_curve import record

            record(self.run_dir, self.step, metrics)
            logger.log_wandb(self.step, {k: v for k, v in metrics.items() if k != "samples" and v is not None}, "val")
            logger.log_image(self.step, "validation", out)
        self.accelerator.wait_for_everyone()
        return out


def train(cfg: TrainConfig) -> Path | None:
    from .faults import output_write_error

    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.build()
        return trainer.fit()
    except Exception as e:
        problem = output_write_error(e, cfg.run_dir, trainer.step if trainer is not None and hasattr(trainer, "step")
                                     else 0)
        if problem is None:
            raise
        raise TrainingError(problem) from None
