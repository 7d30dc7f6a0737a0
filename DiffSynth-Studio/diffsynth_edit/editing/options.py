"""The `edit_images.py` commands' options: one dataclass per command, assembled from option groups (model, sampler,
run, inputs), their checks, and what the editor needs from them (settings, model sources, device and dtype)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import ConfigError, ModelPathOptions
from ..low_memory import LowMemoryOptions


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class ModelOptions(ModelPathOptions, LowMemoryOptions):
    """Where the model comes from and how it runs."""

    variant: str = field(default="2511", metadata=_h("Qwen-Image-Edit variant: 2511 or 2509"))
    checkpoint: Path | None = field(default=None, metadata=_h("trained .safetensors (LoRA and/or STE)"))
    strength: float = field(default=1.0, metadata=_h("LoRA strength"))
    lora: list[str] = field(default_factory=list, metadata=_h(
        "third-party LoRA FILE[:STRENGTH] stacked on the checkpoint (diffusers, ComfyUI, kohya, DiffSynth or "
        "Lightning layout; strength 1 when omitted)"))
    mode: Literal["auto", "bridge", "plain"] = field(
        default="auto", metadata=_h("auto = bridge when the checkpoint has an STE, else plain"))
    device: str = field(default="auto", metadata=_h("auto (cuda when available), cuda, cuda:1, cpu"))
    compile: bool = field(default=False, metadata=_h("torch.compile each DiT block (CUDA; the first edit compiles)"))
    fp8: bool = field(default=False, metadata=_h("fp8 matmuls in the DiT blocks (CUDA, Ada/Hopper; approximate)"))
    fp8_fast_accum: bool = field(default=False, metadata=_h(
        "with --fp8: Hopper's fast fp8 accumulation (fewer promotions of partial sums to fp32); measured on an "
        "H100: a 40-step edit 8 % faster, the same error against an fp32 forward as plain --fp8"))
    fp8_keep_bf16: list[str] = field(default_factory=list, metadata=_h(
        "with --fp8: DiT block linears left in bf16, e.g. img_mlp.net.0.proj (the one that carries the most fp8 "
        "error: H200, compiled, a quarter less error against an fp32 forward for 8 % more forward time)"))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto", metadata=_h("auto = bfloat16 on GPU, float32 on CPU"))
    dit_activation: Literal["auto", "gelu-tanh", "sigmoid-1.702"] = field(default="auto", metadata=_h(
        "DiT MLP activation: auto = the checkpoint's (its metadata; older workspace checkpoints: sigmoid-1.702, "
        "other LoRAs: gelu-tanh), without a checkpoint gelu-tanh (the released model's); or force one"))


@dataclass
class SamplerOptions:
    sampler: Literal["flow", "lbm"] = field(default="flow", metadata=_h("flow matching or latent bridge matching"))
    steps: int = field(default=40, metadata=_h("sampling steps (LBM: 1-4)"))
    cfg: float = field(default=4.0, metadata=_h("classifier-free guidance scale (1 = off)"))
    seed: int = field(default=0, metadata=_h("noise seed (the same for every sample)"))
    blend_alpha: float = field(default=0.0, metadata=_h("background blending outside the mask, 0 = off"))
    max_pixels: int = field(default=1024 * 1024, metadata=_h("inputs are scaled down to at most this many pixels"))
    batch_cfg: bool = field(default=True, metadata=_h("positive and negative prompt in one batched DiT call"))
    schedule: Literal["qwen", "lightning"] = field(default="qwen", metadata=_h(
        "flow sigmas: qwen (dynamic shift) or lightning (shift 3, for Lightning LoRAs)"))
    negative_prompt: str = field(default="", metadata=_h("negative prompt for CFG"))


@dataclass
class RunOptions:
    out: Path | None = field(default=None, metadata=_h("output folder"))
    overwrite: bool = field(default=False, metadata=_h("redo samples whose outputs already exist"))
    limit: int | None = field(default=None, metadata=_h("only the first N dataset entries"))
    progress: bool = field(default=True, metadata=_h("tqdm progress bar"))


@dataclass
class EditInputs:
    dataset: Path | None = field(default=None, metadata=_h("dataset JSON/JSONL (see DESIGN.md)"))
    base_path: Path | None = field(default=None, metadata=_h("folder relative dataset paths start from"))
    image: Path | None = field(default=None, metadata=_h("single mode: the image to edit"))
    mask: Path | None = field(default=None, metadata=_h("single mode: mask, white = region to edit"))
    prompt: str | None = field(default=None, metadata=_h("single mode: the edit instruction"))
    references: list[Path] = field(default_factory=list, metadata=_h("single mode: extra reference images (a,b)"))
    id: str | None = field(default=None, metadata=_h("single mode: output name (default: the image's stem)"))


@dataclass
class EditConfig(RunOptions, SamplerOptions, ModelOptions, EditInputs):
    """Edit a dataset JSON (every entry's edit_image[0] with its prompt and back_mask) or a single image."""

    def validate(self) -> None:
        _validate_common(self)
        if self.dataset is not None and self.image is not None:
            raise ConfigError("give either --dataset or --image, not both")
        if self.dataset is None and self.image is None:
            raise ConfigError("give --dataset FILE.json or --image IMG --prompt TEXT")
        if self.image is not None and self.prompt is None:
            raise ConfigError("--image needs --prompt")
        if self.dataset is None and (self.base_path is not None or self.limit is not None):
            raise ConfigError("--base-path and --limit apply to --dataset only")
        if self.image is None and (self.mask is not None or self.references or self.id is not None
                                   or self.prompt is not None):
            raise ConfigError("--mask, --prompt, --references and --id apply to --image only")


@dataclass
class EvaluateInputs:
    dataset: Path | None = field(default=None, metadata=_h("dataset JSON/JSONL with targets (`image`)"))
    base_path: Path | None = field(default=None, metadata=_h("folder relative dataset paths start from"))
    grid_rows: int = field(default=16, metadata=_h("samples shown in grid.png (0 = no grid)"))
    grid_cell: int = field(default=256, metadata=_h("grid cell size in pixels"))
    lpips: bool = field(default=True, metadata=_h("LPIPS when the lpips package and its weights are local"))
    references: bool = field(default=True, metadata=_h(
        "reference rows: the identity edit (source unchanged) and the VAE round trip of the target (loads the VAE)"))


@dataclass
class EvaluateConfig(RunOptions, SamplerOptions, ModelOptions, EvaluateInputs):
    """Edit every entry of a dataset JSON and score the outputs against the targets (metrics.csv/json, grid.png)."""

    def validate(self) -> None:
        _validate_common(self)
        if self.dataset is None:
            raise ConfigError("evaluate needs --dataset FILE.json")
        if self.grid_rows < 0 or self.grid_cell < 16:
            raise ConfigError("--grid-rows must be >= 0 and --grid-cell >= 16")


@dataclass
class TinyModelConfig:
    """Write the tiny random Qwen-Image-Edit model tree (for tests, the quickstart and the demo)."""

    out: Path | None = field(default=None, metadata=_h("output folder (use it as --model-root)"))
    seed: int = field(default=0, metadata=_h("initialisation seed"))

    def validate(self) -> None:
        if self.out is None:
            raise ConfigError("tiny-model needs --out DIR")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a folder")


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """`FILE[:STRENGTH]` -> (path, strength); a suffix that is not a number is part of the file name."""
    text = str(spec).strip()
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def _validate_loras(specs) -> None:
    import math

    for spec in specs:
        path, strength = parse_lora_spec(spec)
        if not math.isfinite(strength):
            raise ConfigError(f"--lora {spec}: the strength must be a finite number")
        if path.suffix != ".safetensors":
            raise ConfigError(f"--lora {spec}: only .safetensors LoRA files are read")
        if not path.is_file():
            raise ConfigError(f"--lora {spec}: no such file {path}")


def validate_fp8_keep_bf16(names: list[str], fp8: bool, flag: str, fp8_flag: str) -> None:
    """The names must be token linears of a DiT block, and fp8 must be on (`flag`/`fp8_flag`: how the front end
    spells the two options)."""
    from ..speedups import check_keep_bf16

    if names and not fp8:
        raise ConfigError(f"{flag} names DiT linears to leave out of fp8: it needs {fp8_flag}")
    try:
        check_keep_bf16(names)
    except ValueError as e:
        raise ConfigError(f"{flag}: {e}") from None


def _validate_common(cfg) -> None:
    from ..variants import get_variant

    try:
        cfg.variant = get_variant(cfg.variant).name
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.out is None:
        raise ConfigError("--out DIR is required")
    from .editor import EditInputError

    try:
        settings_from(cfg).validate()
    except EditInputError as e:
        raise ConfigError(str(e)) from None
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError("--limit must be at least 1")
    if cfg.fp8_fast_accum and not cfg.fp8:
        raise ConfigError("--fp8-fast-accum changes how the fp8 matmuls accumulate: it needs --fp8")
    validate_fp8_keep_bf16(cfg.fp8_keep_bf16, cfg.fp8, "--fp8-keep-bf16", "--fp8")
    _validate_loras(cfg.lora)


def settings_from(cfg: SamplerOptions):
    from .editor import EditSettings

    return EditSettings(sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg, seed=cfg.seed,
                        blend_alpha=cfg.blend_alpha, max_pixels=cfg.max_pixels, batch_cfg=cfg.batch_cfg,
                        schedule=cfg.schedule)


def sources_from(cfg: ModelOptions):
    return cfg.model_sources(cfg.variant)


def resolve_device(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} but no CUDA device is available (use --device cpu)")
    if dtype == "auto":
        dtype = "float32" if device.startswith("cpu") else "bfloat16"
    return device, getattr(torch, dtype)
