"""The Editor the app serves, built from its AppConfig: device and dtype, the model (or the tiny random model, asked
for or as the fallback when the weights are missing), hot-swap on, optional speed-ups."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..config import ConfigError
from ..editing.editor import Editor
from ..loading import MissingWeightsError, ModelSources, load_pipeline
from ..low_memory import apply_low_memory, low_memory_enabled


def resolve_device(name: str = "auto") -> str:
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available here")
    return name


def resolve_dtype(name: str, device: str):
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def tiny_sources(tiny_root: Path | str, variant: str = "2511") -> ModelSources:
    """The tiny random model, written once to `tiny_root` (a cache) and then read through the normal loader."""
    from ..tiny import write_tiny_model

    return ModelSources(variant=variant, model_root=write_tiny_model(tiny_root))


def build_editor(cfg, log: Callable[[str], None] = print) -> tuple[Editor, list[str]]:
    """Editor (hot-swap on) for an AppConfig; notices tell the user what was chosen (e.g. the tiny fallback)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if (cfg.compile or cfg.fp8) and not str(device).startswith("cuda"):
        raise ConfigError(f"`compile` and `fp8` need a CUDA device; this app runs on {device}")
    notices: list[str] = []
    load_device = "cpu" if low_memory_enabled(cfg) else device  # low memory: placed by apply_low_memory below
    if cfg.tiny:
        sources = tiny_sources(cfg.tiny_root, cfg.variant)
        notices.append("Running on the tiny random model (--tiny): it shows the app working; its edits are noise.")
        pipe = load_pipeline(sources, device=load_device, torch_dtype=dtype)
    else:
        sources = cfg.model_sources(cfg.variant)
        try:
            pipe = load_pipeline(sources, device=load_device, torch_dtype=dtype)
        except MissingWeightsError as e:
            if not cfg.tiny_fallback:
                raise
            sources = tiny_sources(cfg.tiny_root, cfg.variant)
            notices.append(f"No Qwen-Image-Edit-{cfg.variant} weights found, so the app runs on the tiny random "
                           f"model: its edits are noise. To use the real model: {e}")
            pipe = load_pipeline(sources, device=load_device, torch_dtype=dtype)
    for n in notices:
        log(f"[app] {n}")
    log(f"[app] model: Qwen-Image-Edit-{sources.variant} on {device} ({str(dtype).replace('torch.', '')})")
    editor = Editor(pipe, variant=sources.variant, hot_swap=True, activation=cfg.dit_activation,
                    log=lambda m: log(m.replace("[editor]", "[app]", 1)))
    if low_memory_enabled(cfg):
        apply_low_memory(pipe.dit, cfg, device, pipe=pipe)
    if cfg.compile or cfg.fp8:
        editor.speed_up(compile_blocks=cfg.compile, fp8=cfg.fp8, fp8_fast_accum=cfg.fp8_fast_accum,
                        fp8_keep_bf16=cfg.fp8_keep_bf16)
        kept = f" ({', '.join(cfg.fp8_keep_bf16)} in bf16)" if cfg.fp8_keep_bf16 else ""
        chosen = (("compiled blocks", cfg.compile), (f"fp8{kept}", cfg.fp8),
                  ("fast fp8 accumulation", cfg.fp8_fast_accum))
        log(f"[app] speed-ups: {', '.join(name for name, on in chosen if on)}")
    return editor, notices
