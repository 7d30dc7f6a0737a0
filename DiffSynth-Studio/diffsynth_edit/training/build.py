"""A training run assembled: the accelerator and its checks, the cache and its variant, then (`build`) the model,
optimizer, scheduler and batch stream prepared by accelerate; the schedule-free views and the trainable state."""
from __future__ import annotations

import contextlib

import torch

from ..cache.store import open_cache
from ..variants import VariantMismatchError, get_variant
from .config import TrainConfig
from .data import BatchStream
from .distributed import build_accelerator, deepspeed_stage
from .faults import TrainingError
from .lora import lora_state_dict
from .model import EditTrainModel, build_trainable
from .optim import base_optimizer, build_optimizer, is_schedule_free, lr_lambda


def allow_tf32(device: torch.device | str) -> None:
    """On a CUDA `device` (no-op otherwise): fp32 matmuls and convolutions on TF32 tensor cores (10 mantissa bits per
    operand, fp32 accumulation). In
    training these are the fp32 trainables' LoRA and STE matmuls, whose inputs come from bf16 activations anyway; the
    fp32 weights and their updates stay fp32. Rank 512 with fp32 trainables: 1.97 s/step with TF32 against 3.99 s
    without (H200, bench/RESULTS.md session 13)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class TrainingRun:
    """Everything a run trains with; `training.loop.Trainer` adds the loop."""

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
            self.zero_stage = deepspeed_stage(self.accelerator, cfg, self._print)
            self.zero3 = self.zero_stage == 3
        self.device = self.accelerator.device
        allow_tf32(self.device)
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

    def build(self) -> None:
        cfg = self.cfg
        self.pipe, model, params = build_trainable(cfg, self.variant, self.device, self.zero3, self.zero_cond_t,
                                                   self._print)
        self.ste = model.ste
        self.n_trainable = sum(p.numel() for p in params)
        optimizer = build_optimizer(cfg, params, schedule_free=not self.zero3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.schedule_free = is_schedule_free(base_optimizer(self.optimizer))
        self.stream = BatchStream(self.cache, cfg.batch_size, cfg.seed, self.accelerator.process_index,
                                  self.accelerator.num_processes)
        self.step = 0

    def _print(self, *a) -> None:
        if self.main:
            print(*a, flush=True)

    # ---- schedule-free views ----------------------------------------------------------------------------------
    def eval_view(self) -> None:
        if self.schedule_free:
            base_optimizer(self.optimizer).eval()
            self._sync_deepspeed_weights()
        self.model.eval()

    def train_view(self) -> None:
        if self.schedule_free:
            base_optimizer(self.optimizer).train()
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

