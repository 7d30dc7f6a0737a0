"""Started by test_distributed.py under `accelerate launch` (CPU processes, gloo); rank 0 writes a JSON report.

    dist_worker.py schedule OUT.json STEPS WARMUP SCHEDULE ACCUMULATION
        the trainer's Accelerator and LR schedule around a one-weight model: the lr each optimizer step used
    dist_worker.py views OUT.json TRAIN-ARGS...
        a real training run (the arguments of `train_2511.py train`), then the saved checkpoint compared with the
        run's eval view and train view of the LoRA/STE weights, and its metadata
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def schedule(out: Path, steps: int, warmup: int, kind: str, accumulation: int) -> None:
    import torch

    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.training.distributed import build_accelerator
    from diffsynth_edit.training.optim import base_optimizer as _base_optimizer, lr_lambda

    cfg = TrainConfig(optimizer="adamw", learning_rate=1e-3, warmup_steps=warmup, lr_schedule=kind,
                      max_steps=steps, gradient_accumulation=accumulation, device="cpu")
    accelerator = build_accelerator(cfg)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    lrs = []
    for _ in range(steps):  # the trainer's loop structure: the scheduler steps once per optimizer step
        for _ in range(accumulation):
            with accelerator.accumulate(model):
                accelerator.backward(model(torch.ones(1, 4, device=accelerator.device)).pow(2).mean())
                if accelerator.sync_gradients:
                    optimizer.step()
                    lrs.append(_base_optimizer(optimizer).param_groups[0]["lr"])
                    scheduler.step()
                    optimizer.zero_grad()
    if accelerator.is_main_process:
        out.write_text(json.dumps({"world": accelerator.num_processes, "lrs": lrs}))
    accelerator.wait_for_everyone()


def views(out: Path, argv: list[str]) -> None:
    from diffsynth_edit.checkpoint import read_checkpoint
    from diffsynth_edit.config import parse_config
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.training.loop import Trainer

    cfg = parse_config(TrainConfig, argv, prog="dist_worker.py views", section="train")
    trainer = Trainer(cfg)
    trainer.build()
    path = trainer.fit()
    trainer.eval_view()
    eval_view = trainer.trainable_state()
    trainer.train_view()
    train_view = trainer.trainable_state()
    if trainer.main:
        from safetensors.torch import load_file

        saved = load_file(str(path))

        def flat(view) -> dict:
            lora, ste = view
            return {**lora, **{"pipe.ste." + k: v for k, v in ste.items()}}

        def diff(a: dict, b: dict) -> float:
            assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
            return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

        ev, tv = flat(eval_view), flat(train_view)
        out.write_text(json.dumps({
            "world": trainer.accelerator.num_processes, "zero_stage": trainer.zero_stage,
            "schedule_free": trainer.schedule_free, "metadata_weights": read_checkpoint(path).metadata["weights"],
            "saved_vs_eval": diff(saved, ev), "saved_vs_train": diff(saved, tv), "eval_vs_train": diff(ev, tv),
            "scale": max(v.float().abs().max().item() for v in saved.values())}))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    cmd, out = sys.argv[1], Path(sys.argv[2])
    if cmd == "schedule":
        schedule(out, int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
    else:
        views(out, sys.argv[3:])
