"""The accelerate set-up of a training run: one process, DDP, or DeepSpeed ZeRO (on CUDA, or on CPU over gloo), and
the DeepSpeed configs it refuses."""
from __future__ import annotations

import os
from typing import Callable

import torch

from .config import TrainConfig
from .faults import TrainingError


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


def deepspeed_stage(accelerator, cfg: TrainConfig, say: Callable[[str], None]) -> int:
    """The ZeRO stage of a DeepSpeed run, after refusing a config with a known trap (`deepspeed_config_problems`)
    and noting, through `say`, what ZeRO changes for Prodigy."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    problems = deepspeed_config_problems(ds, cfg.optimizer, cfg.grad_clip)
    if problems:
        raise TrainingError("DeepSpeed config refused: " + "; ".join(problems))
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if cfg.optimizer == "prodigy" and stage >= 1:
        say("[train] note: under ZeRO each rank estimates Prodigy's step size d from its own shard "
            "(no all-reduce) and factored second moments are disabled; DDP is the exact mode")
    if cfg.optimizer == "prodigy" and stage == 3:
        say("[train] ZeRO-3: ProdigyPlusScheduleFree runs with use_schedulefree=False. Under ZeRO-3 its "
            "optimizer.eval() sees no parameters, so the averaged (evaluation) weights could never be "
            "saved; without schedule-free the saved weights are the trained ones.")
    return stage
