"""Resume-state files that load without running code, and optimizer state restored in its saved dtypes.

The trainer's own state (optimizer, scheduler, RNG) is written as `<name>.safetensors` (every tensor, in its dtype)
plus `<name>.json` (the structure around them): no pickle is written or read. DeepSpeed's per-rank ZeRO state is a
DeepSpeed object graph and stays a torch file, read with `weights_only=True` and only DeepSpeed's own plain record
classes allowed. A state that needs anything else is refused with a message (a copied or shared run folder must not
run code on `--resume`).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_save_safetensors, atomic_write_text

FORMAT = "qwen-edit-state/1"
# DeepSpeed's ZeRO optimizer state holds these records besides tensors and builtins (stage 1/2/3 state_dict()).
_ZERO_CLASSES = ("deepspeed.runtime.zero.config:ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler:LossScaler",
                 "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
                 "deepspeed.utils.tensor_fragment:fragment_address")


class StateFileError(RuntimeError):
    """A resume-state file is unsafe or unreadable; the message names it."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").clone().contiguous()  # clone: safetensors refuses shared storage
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, where) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        for k in obj:
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} cannot be stored")
        return {"__items__": [[k, _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a resume state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__items__"}:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def save_state(base: Path, obj: dict[str, Any]) -> None:
    """Write `obj` (nested dicts/lists/tuples of tensors and builtins) as `base`.safetensors + `base`.json, atomically
    each; the JSON (written last) says the pair is whole."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, base.name)
    atomic_save_safetensors(base.with_suffix(".safetensors"), tensors)
    atomic_write_text(base.with_suffix(".json"), json.dumps({"format": FORMAT, "tree": tree}) + "\n")


def load_state(base: Path) -> dict[str, Any]:
    """Read what `save_state(base, …)` wrote."""
    from safetensors.torch import load_file

    meta_path, tensor_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        tensors = load_file(str(tensor_path))
        return _decode(meta["tree"], tensors)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise StateFileError(f"resume state {meta_path} / {tensor_path.name} is unreadable ({e})") from None
    except Exception as e:  # safetensors' own error type for a damaged file
        raise StateFileError(f"resume state {tensor_path} is unreadable ({e})") from None


def _zero_classes() -> list[type]:
    import importlib

    out = []
    for spec in _ZERO_CLASSES:
        module, _, name = spec.partition(":")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return out


def load_torch_state(path: Path, allow_deepspeed: bool = False) -> Any:
    """`torch.load(weights_only=True)`: tensors and builtins only (plus DeepSpeed's ZeRO records when
    `allow_deepspeed`); a file that needs any other class or callable is refused, never executed."""
    allowed = _zero_classes() if allow_deepspeed else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StateFileError(f"resume state {path} refused: it needs more than tensors and plain values to load "
                             f"({first}); it may run code, so it is not loaded. Resume only from states this "
                             f"workspace wrote, or warm-start from a checkpoint with --init-from") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise StateFileError(f"resume state {path} is unreadable ({e})") from None


def restore_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(saved)`, then every state tensor put back in its saved dtype.

    torch casts floating state to each parameter's dtype; ProdigyPlusScheduleFree keeps mixed dtypes on purpose (fp32
    factored second moments beside bf16 weights, bf16 `p0`/`s` beside fp32 weights), so the cast changes the run.
    Tensors in the parameter groups (Prodigy's running sums) go to the group's device, dtype kept.
    """
    optimizer.load_state_dict(saved)
    index = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
    for pid, p in zip(saved_ids, index):
        state = saved["state"].get(pid)
        if state is None:
            continue
        own = optimizer.state[p]
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":  # torch places `step` itself (CPU unless fused)
                own[k] = v.to(device=p.device, copy=True)
    for group in optimizer.param_groups:
        device = group["params"][0].device if group["params"] else torch.device("cpu")
        for k, v in group.items():
            if isinstance(v, torch.Tensor):
                group[k] = v.to(device=device)
