"""The optimizer and its learning-rate schedule: AdamW or ProdigyPlusScheduleFree (its step batched over tensors of one
shape, `prodigy_batched.py`), warm-up then constant / cosine / linear, counted in optimizer steps."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TrainConfig


def build_optimizer(cfg: TrainConfig, params: list[nn.Parameter], schedule_free: bool = True):
    if cfg.optimizer == "prodigy":
        from .prodigy_batched import BatchedProdigyPlusScheduleFree

        # One parameter group: several groups crash under DeepSpeed ZeRO (notes/lbm_prodigy.md §4.2).
        return BatchedProdigyPlusScheduleFree([{"params": params}], lr=cfg.lr, betas=tuple(cfg.betas),
                                              weight_decay=cfg.weight_decay, d0=cfg.d0,
                                              use_schedulefree=schedule_free)
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



def base_optimizer(optimizer):
    """The client optimizer under accelerate's (and DeepSpeed's ZeRO) wrappers."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner
