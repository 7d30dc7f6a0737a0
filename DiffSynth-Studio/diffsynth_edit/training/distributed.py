"""The accelerate set-up of a training run: one process, DDP, or DeepSpeed ZeRO (on CUDA, or on CPU over gloo)."""
from __future__ import annotations

import os

import torch

from .config import TrainConfig


def uses_deepspeed() -> bool:
    """`accelerate launch` with a DeepSpeed config says so in the environment."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"


def build_accelerator(cfg: TrainConfig):
    """The run's `Accelerator`.

    `step_scheduler_with_optimizer=False`: the trainer calls `scheduler.step()` once per optimizer step, and `max_steps`,
    `warmup_steps` and the schedule all count optimizer steps whatever the number of processes. accelerate's default
    (without `split_batches`) steps the wrapped scheduler `num_processes` times per call, because it assumes an epoch
    of a prepared dataloader shrinks with the world size: under 2-process DDP a cosine over 100 steps reached lr 0 at
    step 50. With the flag off, accelerate steps it exactly once per call, in every mode (DDP and DeepSpeed alike)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState

    deepspeed = uses_deepspeed()
    if deepspeed and not torch.cuda.is_available():
        PartialState(backend="gloo")  # accelerate leaves the backend unset for DeepSpeed on CPU
    # `cpu=True` would silently turn DeepSpeed off (and break accelerate's state); DeepSpeed finds the CPU itself.
    cpu = not deepspeed and (cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()))
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation, cpu=cpu, step_scheduler_with_optimizer=False,
        # The last block's text-stream output is discarded, so its txt_* LoRA gets no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
