"""The resume state of a run: `state/` holds the train-view LoRA/STE weights, the optimizer, the scheduler, the step,
the data position and the RNG; a new state is written beside the old one and swapped in by renames, so a crash at
any point leaves one whole state (`find_resume_state`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..atomic import atomic_save_safetensors, atomic_write_json, kill_point
from ..config import config_to_dict
from .faults import KILL_ENV, TrainingError
from .optim import base_optimizer
from .state_io import load_state, load_torch_state, restore_optimizer_state, save_state

if TYPE_CHECKING:
    from .build import TrainingRun


def zero_optimizer(run: TrainingRun):
    """DeepSpeed's ZeRO optimizer (it owns the fp32 master partitions and drives the client optimizer)."""
    return run.model.optimizer


def zero_state_file(run: TrainingRun, state_dir: Path) -> Path:
    return state_dir / f"zero-rank{run.accelerator.process_index:05d}.pt"


def deepspeed_layout(run: TrainingRun) -> dict | None:
    if not run.deepspeed:
        return None
    return {"stage": run.zero_stage, "world_size": run.accelerator.num_processes}


def save_resume_state(run: TrainingRun) -> None:
    """Train-view weights, optimizer, scheduler, step, data position and RNG, in state/ (atomic swap).

    Under DeepSpeed ZeRO every rank also writes its ZeRO optimizer state (fp32 master partition and the client
    optimizer's state of that partition) to `zero-rankNNNNN.pt`: the client optimizer sees only flat partitions,
    so its state is per rank, and the masters must come back with it (the state dir must be on a filesystem all
    ranks share)."""
    lora, ste = run.trainable_state()
    final = run.run_dir / "state"
    tmp = run.run_dir / f".state-{run.step}.tmp"
    if run.zero_stage >= 1:
        if run.main:
            tmp.mkdir(parents=True, exist_ok=True)
        run.accelerator.wait_for_everyone()
        torch.save(zero_optimizer(run).state_dict(), zero_state_file(run, tmp))
        run.accelerator.wait_for_everyone()
    if not run.main:
        run.accelerator.wait_for_everyone()
        return
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in lora.items()}
    tensors.update({"ste." + k: v.cpu().contiguous() for k, v in ste.items()})
    atomic_save_safetensors(tmp / "trainable.safetensors", tensors)
    blob = {"scheduler": run.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
    if run.zero_stage == 0:
        blob["optimizer"] = base_optimizer(run.optimizer).state_dict()
    save_state(tmp / "optimizer", blob)  # safetensors + JSON: loads without pickle, every dtype kept
    atomic_write_json(tmp / "trainer.json", {"step": run.step, "data": run.stream.state_dict(),
                                             "config": config_to_dict(run.cfg),
                                             "deepspeed": deepspeed_layout(run)})
    old = run.run_dir / f".state-old-{run.step}"
    if final.exists():
        final.rename(old)
    kill_point(KILL_ENV, "state-swap", run.step)  # the window `find_resume_state` covers
    tmp.rename(final)
    for leftover in [old, *run.run_dir.glob(".state-*")]:  # incl. those of an earlier crash
        shutil.rmtree(leftover, ignore_errors=True)
    run.accelerator.wait_for_everyone()


def find_resume_state(run_dir: Path) -> Path | None:
    """state/, else (a crash between the two renames of `save_resume_state`) the complete leftover with the
    highest step: `.state-old-<n>` (the previous state) or `.state-<n>.tmp` (the new one: trainer.json is written
    last, so a folder that has it is whole)."""
    state = run_dir / "state"
    if (state / "trainer.json").is_file():
        return state
    candidates = [p for p in run_dir.glob(".state-*") if (p / "trainer.json").is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: json.loads((p / "trainer.json").read_text())["step"])


def load_resume_state(run: TrainingRun) -> bool:
    """Restore the run from its resume state; False when there is none. A state of another DeepSpeed layout or
    another LoRA shape is refused."""
    state = find_resume_state(run.run_dir)
    if state is None:
        return False
    from safetensors.torch import load_file

    info = json.loads((state / "trainer.json").read_text())
    saved_layout, layout = info.get("deepspeed"), deepspeed_layout(run)
    if saved_layout != layout:
        raise TrainingError(f"resume state {state} was written under DeepSpeed {saved_layout or 'off'}, this run "
                            f"is {layout or 'without DeepSpeed'}; the optimizer state is partitioned per rank, so "
                            f"resume with the same mode and number of processes (or warm-start with --init-from)")
    tensors = load_file(str(state / "trainable.safetensors"))
    m = run.unwrapped()
    own = dict(m.dit.named_parameters())
    for k, v in tensors.items():
        if not k.startswith("ste.") and (k not in own or tuple(getattr(own[k], "ds_shape", own[k].shape))
                                         != tuple(v.shape)):
            raise TrainingError(f"resume state {state} does not fit this run's LoRA ({k}); "
                                f"use a new run name or the same rank/targets")
    if not run.zero3:
        # ZeRO-3's parameters are partitioned; its weights come back with the fp32 masters below.
        with torch.no_grad():
            for k, v in tensors.items():
                if not k.startswith("ste."):
                    own[k].copy_(v)
            if m.ste is not None:
                m.ste.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ste.")},
                                      strict=True)
    # optimizer.pt: states written before optimizer.safetensors/.json, read with weights_only=True.
    blob = (load_state(state / "optimizer") if (state / "optimizer.json").is_file()
            else load_torch_state(state / "optimizer.pt"))
    if run.zero_stage >= 1:
        # The ZeRO optimizer restores this rank's fp32 master partition (ZeRO-3: and the module's partitions from
        # it) and the client optimizer's state; ZeRO-1/2 then refresh the module weights from the masters.
        zero_file = zero_state_file(run, state)
        if not zero_file.is_file():
            raise TrainingError(f"resume state {state} has no {zero_file.name}; it was not written by this "
                                f"DeepSpeed layout")
        states = [None] * run.accelerator.num_processes
        states[run.accelerator.process_index] = load_torch_state(zero_file, allow_deepspeed=True)
        zero_opt = zero_optimizer(run)
        zero_opt.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        if hasattr(zero_opt, "update_lp_params"):
            zero_opt.update_lp_params()
    else:
        restore_optimizer_state(base_optimizer(run.optimizer), blob["optimizer"])
    run.scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    run.step = int(info["step"])
    run.stream.load_state_dict(info["data"])
    return True
