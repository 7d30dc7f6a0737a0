"""Loading every component (DiT, text encoder, VAE, tokenizer, processor) through diffsynth's own loader.

Sources, in order: explicit per-component paths; a local model root in the hub layout
(`<root>/Qwen/Qwen-Image-Edit-2511/transformer/...`); hub ids downloaded by diffsynth when `allow_download` is on.
With local sources nothing touches the network. Missing weights raise MissingWeightsError naming the component.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .speedups import exact_speedups
from .variants import ModelVariant, get_variant

COMPONENTS = ("dit", "text_encoder", "vae", "tokenizer", "processor")


class MissingWeightsError(FileNotFoundError):
    """A model component was not found locally and downloading is off."""


@dataclass
class ModelSources:
    """Where the weights come from. Paths override `model_root`; `model_root` uses the hub folder layout."""

    variant: str = "2511"
    model_root: Path | None = None
    dit_path: Path | None = None
    text_encoder_path: Path | None = None
    vae_path: Path | None = None
    tokenizer_path: Path | None = None
    processor_path: Path | None = None
    allow_download: bool = False
    dit_activation: str = "gelu-tanh"  # activation.REFERENCE; "sigmoid-1.702" = diffsynth 2.1.12's approximation

    @property
    def spec(self) -> ModelVariant:
        return get_variant(self.variant)


def _component_location(src: ModelSources, name: str) -> tuple[str, str, bool]:
    """(repo id, pattern, is_dir) of a component."""
    v = src.spec
    return {
        "dit": (v.dit_repo, v.dit_pattern, False),
        "text_encoder": (v.text_encoder_repo, v.text_encoder_pattern, False),
        "vae": (v.vae_repo, v.vae_pattern, False),
        "tokenizer": (v.tokenizer_repo, v.tokenizer_subdir, True),
        "processor": (v.processor_repo, v.processor_subdir, True),
    }[name]


def download_hint(src: ModelSources, name: str) -> str:
    repo, pattern, is_dir = _component_location(src, name)
    sub = pattern.split("/")[0]
    return (f"download it with `huggingface-cli download {repo} --include '{sub}/*' --local-dir models/{repo}` "
            f"(or `modelscope download --model {repo} --include '{sub}/*' --local_dir models/{repo}`) and pass "
            f"--model-root models, or give --{name.replace('_', '-')}-path, or allow downloads with --allow-download")


def resolve_local(src: ModelSources, name: str) -> list[str] | str | None:
    """Local file list (weights) or folder (tokenizer/processor) for a component, or None."""
    explicit = getattr(src, f"{name}_path")
    repo, pattern, is_dir = _component_location(src, name)
    if explicit is not None:
        p = Path(explicit)
        if is_dir:
            return str(p) if p.is_dir() else None
        if p.is_dir():
            files = sorted(glob.glob(str(p / "*.safetensors")))
            return files or None
        return [str(p)] if p.is_file() else None
    if src.model_root is not None:
        base = Path(src.model_root) / repo
        if is_dir:
            d = base / pattern
            return str(d) if d.is_dir() else None
        files = sorted(glob.glob(str(base / pattern)))
        return files or None
    return None


def register_tiny_models(model_root: Path | str) -> bool:
    """If `model_root` holds the tiny test models, teach diffsynth's hash registry their classes. Idempotent."""
    marker = Path(model_root) / "tiny_models.json"
    if not marker.is_file():
        return False
    from diffsynth.configs import MODEL_CONFIGS, VERSION_CHECKER_MAPS, VRAM_MANAGEMENT_MODULE_MAPS

    from .tiny import REAL_CLASSES, TINY_CLASSES

    try:
        registry = json.loads(marker.read_text(encoding="utf-8"))["models"]
        entries = [(name, str(entry["hash"]), entry["class"]) for name, entry in registry.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MissingWeightsError(f"{marker}: not a tiny-model registry ({type(e).__name__}: {e})") from None
    for name, _, cls in entries:
        # diffsynth imports and calls the class the file names: only the workspace's own tiny classes are taken.
        if TINY_CLASSES.get(name) != cls:
            raise MissingWeightsError(f"{marker}: entry {name!r} names class {cls!r}; only the workspace's tiny "
                                      f"classes ({', '.join(sorted(TINY_CLASSES.values()))}) are accepted")
    known = {c["model_hash"] for c in MODEL_CONFIGS}
    for name, entry in registry.items():
        if entry["hash"] in known:
            continue
        cfg = {"model_hash": entry["hash"], "model_name": name, "model_class": entry["class"]}
        if name == "qwen_image_text_encoder":
            cfg["state_dict_converter"] = ("diffsynth.utils.state_dict_converters.qwen_image_text_encoder."
                                           "QwenImageTextEncoderStateDictConverter")
        MODEL_CONFIGS.append(cfg)
        real = REAL_CLASSES[name]
        VRAM_MANAGEMENT_MODULE_MAPS.setdefault(entry["class"], VRAM_MANAGEMENT_MODULE_MAPS[real])
        if real in VERSION_CHECKER_MAPS:
            VERSION_CHECKER_MAPS.setdefault(entry["class"], VERSION_CHECKER_MAPS[real])
    return True


def _ensure_cpu_empty_cache() -> None:
    # diffsynth's VRAM manager calls torch.<device>.empty_cache(), which torch.cpu lacks.
    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None  # type: ignore[attr-defined]


def model_configs_for(src: ModelSources, components: Iterable[str], offload: bool = False,
                      device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """diffsynth ModelConfig objects for the weight components; raises MissingWeightsError with a how-to."""
    from diffsynth.core import ModelConfig

    configs = {}
    for name in components:
        if name in ("tokenizer", "processor"):
            continue
        local = resolve_local(src, name)
        vram = {}
        if offload:
            vram = dict(offload_device="cpu", offload_dtype=dtype, onload_device="cpu", onload_dtype=dtype,
                        preparing_device=device, preparing_dtype=dtype, computation_device=device,
                        computation_dtype=dtype)
        if local is not None:
            configs[name] = ModelConfig(path=local, **vram)
        elif src.allow_download:
            repo, pattern, _ = _component_location(src, name)
            configs[name] = ModelConfig(model_id=repo, origin_file_pattern=pattern, **vram)
        else:
            raise MissingWeightsError(f"{name.replace('_', ' ')} weights for Qwen-Image-Edit-{src.variant} not "
                                      f"found ({_describe_lookup(src, name)}); {download_hint(src, name)}")
    return configs


def _describe_lookup(src: ModelSources, name: str) -> str:
    explicit = getattr(src, f"{name}_path")
    repo, pattern, _ = _component_location(src, name)
    if explicit is not None:
        return f"looked at {explicit}"
    if src.model_root is not None:
        return f"looked for {Path(src.model_root) / repo / pattern}"
    return "no --model-root or component path given"


def _tokenizer_dir(src: ModelSources, name: str) -> str | None:
    local = resolve_local(src, name)
    if local is not None:
        return local
    if src.allow_download:
        from diffsynth.core import ModelConfig

        repo, pattern, _ = _component_location(src, name)
        cfg = ModelConfig(model_id=repo, origin_file_pattern=pattern)
        cfg.download_if_necessary()
        return cfg.path
    raise MissingWeightsError(f"{name} for Qwen-Image-Edit-{src.variant} not found ({_describe_lookup(src, name)}); "
                              f"{download_hint(src, name)}")


def load_pipeline(src: ModelSources, components: Iterable[str] = COMPONENTS, device: str | torch.device = "cpu",
                  torch_dtype: torch.dtype = torch.bfloat16, offload: bool = False):
    """Build a diffsynth QwenImagePipeline holding only `components` (e.g. no DiT for caching)."""
    components = tuple(components)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    if not src.allow_download:
        os.environ.setdefault("DIFFSYNTH_SKIP_DOWNLOAD", "true")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _ensure_cpu_empty_cache()
    for root in {src.model_root, *(find_tiny_root(Path(p).resolve()) for p in _explicit_paths(src))}:
        if root is not None:
            register_tiny_models(root)
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    device = str(device)
    if device.startswith("cpu"):
        device = "cpu"  # diffsynth's DiskMap rejects "cpu:0"
    configs = model_configs_for(src, components, offload=offload, device=device, dtype=torch_dtype)
    tokenizer_dir = _tokenizer_dir(src, "tokenizer") if "tokenizer" in components else None
    processor_dir = _tokenizer_dir(src, "processor") if "processor" in components else None
    pipe = QwenImagePipeline(device=device, torch_dtype=torch_dtype)
    pool = pipe.download_and_load_models(list(configs.values()))
    pipe.text_encoder = pool.fetch_model("qwen_image_text_encoder")
    pipe.dit = pool.fetch_model("qwen_image_dit")
    pipe.vae = pool.fetch_model("qwen_image_vae")
    if tokenizer_dir is not None:
        from transformers import Qwen2Tokenizer

        pipe.tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_dir)
    if processor_dir is not None:
        from transformers import Qwen2VLProcessor

        pipe.processor = Qwen2VLProcessor.from_pretrained(processor_dir)
    pipe.vram_management_enabled = pipe.check_vram_management_state()
    exact_speedups(pipe)  # single-frame VAE convs as 2D, vision attention in one call (see speedups)
    if pipe.dit is not None:  # the released model's tanh-GELU unless asked otherwise (see activation)
        from .activation import set_dit_activation

        set_dit_activation(pipe.dit, src.dit_activation)
    for name in ("text_encoder", "dit", "vae"):
        model = getattr(pipe, name)
        if model is not None:
            model.eval().requires_grad_(False)
    return pipe


def _explicit_paths(src: ModelSources) -> list[Path]:
    out = []
    for name in COMPONENTS:
        p = getattr(src, f"{name}_path")
        if p is not None:
            out.append(Path(p))
    return out


def find_tiny_root(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if (parent / "tiny_models.json").is_file():
            return parent
    return None
