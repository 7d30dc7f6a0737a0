"""Export a checkpoint's LoRA for ComfyUI / diffusers / kohya loaders: alpha folded into the weights, no `.alpha`.

comfyui:   diffusion_model.<module>.lora_A.weight / lora_B.weight
diffusers: transformer.<module>.lora_A.weight / lora_B.weight
kohya:     lora_unet_<module with _>.lora_down.weight / lora_up.weight
STE weights are workspace-specific and are not exported (no other loader knows them).
"""
from __future__ import annotations

from pathlib import Path

from ..activation import checkpoint_activation
from ..checkpoint import read_checkpoint, write_checkpoint


def export_state_dict(ckpt, fmt: str = "comfyui") -> dict:
    out = {}
    for name, (a, b) in ckpt.lora.modules.items():
        a = a * ckpt.lora.scale.get(name, 1.0)
        if fmt == "comfyui":
            out[f"diffusion_model.{name}.lora_A.weight"], out[f"diffusion_model.{name}.lora_B.weight"] = a, b
        elif fmt == "diffusers":
            out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = a, b
        elif fmt == "kohya":
            k = "lora_unet_" + name.replace(".", "_")
            out[f"{k}.lora_down.weight"], out[f"{k}.lora_up.weight"] = a, b
        else:
            raise ValueError(f"unknown export format {fmt!r}")
    return out


def export_checkpoint(src: str | Path, dst: str | Path, fmt: str = "comfyui") -> tuple[Path, int]:
    ckpt = read_checkpoint(src)
    sd = export_state_dict(ckpt, fmt)
    meta = {k: v for k, v in ckpt.metadata.items() if k in ("variant", "zero_cond_t", "lora_rank", "lora_targets",
                                                           "step", "workspace")}
    # the activation it was trained with travels along (resolved for checkpoints from before the field)
    meta["dit_activation"] = checkpoint_activation(ckpt.metadata, str(src), ckpt.has_ste)[0]
    meta.update({"alpha_folded": True, "export_format": fmt})
    return write_checkpoint(dst, sd, None, meta), len(sd)
