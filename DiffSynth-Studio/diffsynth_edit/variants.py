"""Model variants as data: the one place that says how 2509 and 2511 differ."""
from __future__ import annotations

from dataclasses import dataclass

LORA_TARGETS_2511: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2", "txt_mod.1",
    "img_in", "txt_in", "proj_out",
)
LORA_TARGETS_2509: tuple[str, ...] = tuple(
    t for t in LORA_TARGETS_2511 if t not in ("img_in", "txt_in", "proj_out") and not t.endswith("net.0.proj")
)
# Upstream DiffSynth-Studio's 12 targets (its shipped Qwen-Image-Edit-2511.sh), for like-for-like comparisons.
LORA_TARGETS_UPSTREAM: tuple[str, ...] = LORA_TARGETS_2509


@dataclass(frozen=True)
class ModelVariant:
    name: str
    dit_repo: str
    zero_cond_t: bool
    lora_targets: tuple[str, ...]
    text_encoder_repo: str = "Qwen/Qwen-Image"
    vae_repo: str = "Qwen/Qwen-Image"
    tokenizer_repo: str = "Qwen/Qwen-Image"
    processor_repo: str = "Qwen/Qwen-Image-Edit"

    # Sub-paths inside each hub repository (also the local folder layout).
    dit_pattern: str = "transformer/diffusion_pytorch_model*.safetensors"
    text_encoder_pattern: str = "text_encoder/model*.safetensors"
    vae_pattern: str = "vae/diffusion_pytorch_model.safetensors"
    tokenizer_subdir: str = "tokenizer/"
    processor_subdir: str = "processor/"


VARIANTS: dict[str, ModelVariant] = {
    "2511": ModelVariant("2511", "Qwen/Qwen-Image-Edit-2511", zero_cond_t=True, lora_targets=LORA_TARGETS_2511),
    "2509": ModelVariant("2509", "Qwen/Qwen-Image-Edit-2509", zero_cond_t=False, lora_targets=LORA_TARGETS_2509),
}


def get_variant(name: str) -> ModelVariant:
    key = str(name).removeprefix("Qwen-Image-Edit-")
    if key not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[key]


class VariantMismatchError(ValueError):
    """A cache or checkpoint was made for another variant than the one in use."""


def check_same_variant(expected: str, found: str | None, what: str) -> None:
    if found is not None and str(found) != str(expected):
        raise VariantMismatchError(
            f"{what} was made for Qwen-Image-Edit-{found} but this run uses Qwen-Image-Edit-{expected}; "
            f"use a {what} of the same variant (zero_cond_t differs between 2509 and 2511)")
