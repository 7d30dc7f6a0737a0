"""TrainConfig: the one typed object a training run is built from (TOML preset + CLI overrides)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import ConfigError

# The flags that turn off the presets' recompute budget and `save_attention`, which only compiled blocks use (named in
# the errors that need them: without compiled blocks, with `checkpoint_last_n`, under ZeRO-3).
BUDGET_OFF_FLAGS = "--recompute-budget none --save-attention false"


@dataclass
class TrainConfig:
    cache_dir: Path = field(default=Path("data/cache"), metadata={"help": "phase-1 cache to train from"})
    output_dir: Path = field(default=Path("train"), metadata={"help": "runs are written to OUTPUT_DIR/RUN_NAME"})
    run_name: str = field(default="run", metadata={"help": "run folder name (WANDB_NAME if set)"})
    objective: Literal["sft", "lbm"] = "sft"
    mode: Literal["bridge", "plain"] = field(default="bridge", metadata={"help": "bridge: sub stream + STE"})
    # model
    variant: str | None = field(default=None, metadata={"help": "checked against the cache manifest"})
    model_root: Path | None = None
    dit_path: Path | None = None
    vae_path: Path | None = None
    allow_download: bool = False
    dit_activation: Literal["gelu-tanh", "sigmoid-1.702"] = field(default="gelu-tanh", metadata={
        "help": "DiT MLP activation: gelu-tanh = the released models' (diffusers, ComfyUI); sigmoid-1.702 = diffsynth "
                "2.1.12's approximation, to continue checkpoints trained with it. Recorded in checkpoint metadata"})
    # LoRA
    lora_rank: int = 32
    lora_alpha: float | None = field(default=None, metadata={"help": "default: = rank (scale 1)"})
    lora_targets: list[str] | None = field(default=None, metadata={"help": "default: the variant's targets"})
    train_ste: bool = True
    # optimisation
    optimizer: Literal["prodigy", "adamw"] = "prodigy"
    learning_rate: float | None = field(default=None, metadata={"help": "default 1.0 (prodigy) / 1e-4 (adamw)"})
    betas: list[float] = field(default_factory=lambda: [0.95, 0.99])
    weight_decay: float = 0.0
    d0: float = 1e-6
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    grad_clip: float = 0.0
    gradient_accumulation: int = 16
    batch_size: int = 1
    max_steps: int = 1000
    cfg_drop_prob: float = 0.1
    gradient_checkpointing: bool = True
    checkpoint_last_n: int | None = field(default=None, metadata={"help": "checkpoint only the last N blocks"})
    compile_blocks: bool = field(default=False, metadata={
        "help": "torch.compile each DiT/STE block (regional; on an H200 the step is ~30 % faster after a ~25 s "
                "first step)"})
    recompute_budget: float | None = field(default=None, metadata={
        "help": "with compile_blocks: instead of recomputing whole blocks (gradient checkpointing), each compiled "
                "block keeps this fraction of the activations it would save and recomputes the rest, the cheapest "
                "to recompute first (torch's partitioner memory budget). 0.3 on an H200, r32: 1.09 s/step at "
                "55.9 GiB vs 1.24 s at 43.6 GiB (bench/RESULTS.md)"})
    save_attention: bool = field(default=False, metadata={
        "help": "with recompute_budget: the partitioner weighs the cuDNN attention forward's runtime before "
                "recomputing it (torch lists it with neither the GEMMs nor flash attention, so below a budget it "
                "recomputes it as if free). The shipped default at budget 0.1: 1.87 s/step at 70.1 GiB vs 2.14 s at "
                "68.0 GiB with every block recomputed (H100, bench/RESULTS.md session 12)"})
    trainable_dtype: Literal["fp32", "bf16"] = "fp32"
    fp8_matmuls: bool = field(default=False, metadata={
        "help": "compute the frozen DiT blocks' token linears (attention projections, MLPs) in fp8 on the tensor "
                "cores, forward and input gradient (e4m3, per-token and per-channel scales; Ada/Hopper). Faster, "
                "and approximate: each product rounds both operands to 3 mantissa bits (bench/RESULTS.md gives the "
                "measured speed and gradient error). One process, no DeepSpeed"})
    # low-memory tier (docs/training.md "Training on 24-48 GB cards")
    fp8_base: bool = field(default=False, metadata={
        "help": "store the frozen DiT blocks' linear weights in fp8 (e4m3, per-row scales; computed in bf16): "
                "half the weight memory, the weights rounded to 3 mantissa bits"})
    blocks_to_swap: int = field(default=0, metadata={
        "help": "keep the last N DiT blocks in pinned host memory and copy each to the GPU just before use "
                "(needs gradient_checkpointing on those blocks)"})
    seed: int = 42
    # LBM
    bridge_sigma: float = 0.01
    lbm_grid: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    lbm_probs: list[float] | None = field(default=None, metadata={"help": "default uniform"})
    pixel_loss_weight: float = 0.0
    pixel_loss: Literal["l1", "lpips"] = "l1"
    # checkpoints, resume
    save_every: int = 500
    keep_last: int = 3
    resume: bool = False
    init_from: Path | None = None
    # validation and logging
    validate_every: int = 0
    val_cache_dir: Path | None = None
    val_samples: int = 4
    val_steps: int = 20
    val_cfg: float = 4.0
    log_every: int = 1
    wandb: bool = True
    device: str = "auto"
    num_workers: int = 2

    def validate(self) -> None:
        if self.gradient_accumulation < 1:
            raise ConfigError("gradient_accumulation must be ≥ 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be ≥ 1")
        if self.max_steps < 1:
            raise ConfigError("max_steps must be ≥ 1")
        if self.lora_rank < 1:
            raise ConfigError("lora_rank must be ≥ 1")
        if self.optimizer == "prodigy" and self.grad_clip > 0:
            raise ConfigError("grad_clip > 0 with the schedule-free Prodigy optimizer is refused: clipping breaks its "
                              "step-size estimate (it has StableAdamW's per-tensor update clipping built in); "
                              "set grad_clip = 0 or use optimizer = adamw")
        if not 0.0 <= self.cfg_drop_prob < 1.0:
            raise ConfigError("cfg_drop_prob must be in [0, 1)")
        if any(not 0.0 < s <= 1.0 for s in self.lbm_grid):
            raise ConfigError("lbm_grid values must be in (0, 1]")
        if self.lbm_probs is not None and (len(self.lbm_probs) != len(self.lbm_grid) or
                                           abs(sum(self.lbm_probs) - 1.0) > 1e-6 or min(self.lbm_probs) < 0):
            raise ConfigError("lbm_probs must have one non-negative probability per lbm_grid value, summing to 1")
        if self.bridge_sigma < 0:
            raise ConfigError("bridge_sigma must be ≥ 0")
        if self.validate_every and self.val_cache_dir is None:
            raise ConfigError("validate_every needs val_cache_dir (a cache of held-out samples)")
        self._validate_numbers()

    def _validate_numbers(self) -> None:
        """Numbers the optimizer or the loop would otherwise fail on late (or silently misuse)."""
        at_least = {"save_every": 1, "log_every": 1, "warmup_steps": 0, "keep_last": 0, "num_workers": 0,
                    "validate_every": 0}
        if self.validate_every:
            at_least |= {"val_samples": 1, "val_steps": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ {low}, got {getattr(self, name)}")
        positive = {"learning-rate": self.learning_rate, "lora-alpha": self.lora_alpha, "d0": self.d0}
        for flag, value in positive.items():
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{flag} must be a finite number > 0, got {value}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"--weight-decay must be ≥ 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be ≥ 0 (0 = off), got {self.grad_clip}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"--betas must be two numbers in [0, 1), e.g. 0.95,0.99; got {self.betas}")
        if self.checkpoint_last_n is not None and self.checkpoint_last_n < 0:
            raise ConfigError(f"--checkpoint-last-n must be ≥ 0, got {self.checkpoint_last_n}")
        if self.recompute_budget is not None:
            if not 0.0 <= self.recompute_budget <= 1.0:
                raise ConfigError(f"--recompute-budget must be in [0, 1], got {self.recompute_budget}")
            if not self.compile_blocks:
                raise ConfigError("--recompute-budget needs --compile-blocks (the compiled blocks' partitioner "
                                  f"chooses what to recompute); without compiled blocks also pass {BUDGET_OFF_FLAGS} "
                                  "(the 2511, 2509 and LBM presets set both)")
            if self.checkpoint_last_n is not None:
                raise ConfigError("--recompute-budget replaces block checkpointing: drop --checkpoint-last-n, or "
                                  f"pass {BUDGET_OFF_FLAGS} to use it")
        elif self.save_attention:
            raise ConfigError("--save-attention tells the partitioner of --recompute-budget what to keep: give "
                              "--recompute-budget (and --compile-blocks)")
        if self.lora_targets is not None and not self.lora_targets:
            raise ConfigError("--lora-targets is empty")
        self._validate_low_memory()
        if self.fp8_matmuls and (self.fp8_base or self.blocks_to_swap):
            raise ConfigError("--fp8-matmuls (a speed lever: fp8 GEMMs) does not combine with the low-memory tier "
                              "(--fp8-base / --blocks-to-swap); --fp8-matmuls already stores the block linears in "
                              "fp8, as two copies (the bytes of bf16)")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {self.device!r}")

    def _validate_low_memory(self) -> None:
        from ..low_memory import check_low_memory_flags

        check_low_memory_flags(self.blocks_to_swap)
        if not self.blocks_to_swap:
            return
        if not self.gradient_checkpointing:
            raise ConfigError("--blocks-to-swap needs --gradient-checkpointing (a swapped block is freed after its "
                              "forward, so it must recompute for the backward)")
        if self.checkpoint_last_n is not None and self.checkpoint_last_n < self.blocks_to_swap:
            raise ConfigError(f"--blocks-to-swap {self.blocks_to_swap} needs --checkpoint-last-n ≥ "
                              f"{self.blocks_to_swap} (the swapped blocks are the last ones and must be checkpointed)")
        if self.compile_blocks:
            raise ConfigError("--blocks-to-swap does not combine with --compile-blocks (the swap runs in the blocks' "
                              "forward hooks); turn one off")

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1.0 if self.optimizer == "prodigy" else 1e-4

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name
