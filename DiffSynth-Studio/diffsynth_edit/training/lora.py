"""LoRA injection (peft) with PEFT key names identical to the checkpoint format, and warm starts."""
from __future__ import annotations

import torch

from ..checkpoint import Checkpoint, CheckpointError, check_against_model
from ..config import ConfigError


def inject_lora(dit: torch.nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...],
                dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, _ in dit.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        raise ConfigError(f"--lora-targets: {', '.join(unknown)} name(s) no module of the DiT (module names such as "
                          f"to_q, img_mlp.net.2, img_in; the variant's default list is in docs/training.md)")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        init_lora_weights=True)
    inject_adapter_in_model(config, dit)
    params = []
    for name, p in dit.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
            p.requires_grad_(True)
            params.append(p)
        else:
            p.requires_grad_(False)
    if not params:
        raise ValueError(f"LoRA targets {list(targets)} matched no module of the DiT")
    return params


def lora_state_dict(dit: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT keys without prefix: `transformer_blocks.N.attn.to_q.lora_A.default.weight`."""
    return {name: p.detach() for name, p in dit.named_parameters() if "lora_" in name}


class _FullShapes:
    """A DiT built partitioned by DeepSpeed ZeRO-3's zero.Init, as the checkpoint checks see modules: each partitioned
    weight replaced by a meta tensor of its full shape (`ds_shape`; the real one reads as torch.Size([0]))."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def named_modules(self):
        from types import SimpleNamespace

        for name, mod in self.module.named_modules():
            shape = getattr(getattr(mod, "weight", None), "ds_shape", None)
            yield name, (mod if shape is None else SimpleNamespace(weight=torch.empty(shape, device="meta")))


def load_into_training(ckpt: Checkpoint, dit: torch.nn.Module, ste: torch.nn.Module | None, rank: int,
                       alpha: float, variant: str) -> dict[str, int]:
    """Warm start: copy LoRA (re-scaled to this run's alpha/rank) and STE weights; every key must fit. Runs before
    accelerate's prepare, so the LoRA and STE tensors are whole even when the DiT was built partitioned (ZeRO-3)."""
    partitioned = any(hasattr(p, "ds_shape") for p in dit.parameters())
    check_against_model(ckpt, _FullShapes(dit) if partitioned else dit, ste, variant)
    own = dict(dit.named_parameters())
    scale = alpha / rank
    copied = 0
    for name, (a, b) in ckpt.lora.modules.items():
        ka, kb = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
        if ka not in own:
            raise CheckpointError(f"{ckpt.path}: LoRA module {name} is not a target of this run; add it to "
                                  f"lora_targets or drop it from the checkpoint")
        if own[ka].shape != a.shape:
            raise CheckpointError(f"{ckpt.path}: LoRA {name} has rank {a.shape[0]}, this run uses rank {rank}")
        with torch.no_grad():
            own[ka].copy_(a * (ckpt.lora.scale.get(name, 1.0) / scale))
            own[kb].copy_(b)
        copied += 1
    if ckpt.ste:
        if ste is None:
            raise CheckpointError(f"{ckpt.path}: has STE weights but this run is in plain mode")
        ste.load_state_dict({k: v.to(torch.float32) for k, v in ckpt.ste.items()}, strict=True)
    return {"lora_modules": copied, "ste_tensors": len(ckpt.ste)}
