"""The training loop (SFT and LBM), on accelerate, read like nanoGPT's: set up (`build.TrainingRun`), one loop over
optimizer steps, summarise.

"step" always means optimizer step: logs, file names, save_every, max_steps.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import NoReturn

import torch

from ..atomic import atomic_write_json, kill_point
from ..checkpoint import write_checkpoint
from ..config import config_to_dict
from ..lifetime import StopRequest, stop_requests
from .build import TrainingRun
from .config import TrainConfig
from .data import collate, sample_generator
from .faults import KILL_ENV, TrainingError, TrainingStopped, signal_point
from .logger import RunLogger
from .losses import make_lbm_inputs, make_sft_inputs
from .optim import base_optimizer, effective_lr
from .resume import load_resume_state, save_resume_state


class Trainer(TrainingRun):
    """`build()`, then `fit()`: the loop, its checkpoints, resume states and validation grids."""

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        import diffsynth

        from .. import __version__

        cfg = self.cfg
        return {"format": "qwen-edit-workspace/1", "variant": self.variant.name, "zero_cond_t": self.zero_cond_t,
                "mode": cfg.mode, "objective": cfg.objective, "lora_rank": cfg.lora_rank,
                "dit_activation": cfg.dit_activation,
                "lora_alpha": float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank),
                "alpha_folded": False, "lora_targets": cfg.lora_targets or list(self.variant.lora_targets),
                "step": self.step, "optimizer": cfg.optimizer, "weights": "eval" if self.schedule_free else "train",
                "diffsynth": diffsynth.__version__ if hasattr(diffsynth, "__version__") else "2.1.12",
                "workspace": __version__}

    def save_checkpoint(self) -> Path:
        """Caller has switched to the eval view. Atomic; prunes to keep_last."""
        path = self.run_dir / f"step-{self.step:06d}.safetensors"
        lora, ste = self.trainable_state()
        if self.main:
            write_checkpoint(path, lora, ste, self.metadata())
            ckpts = sorted(self.run_dir.glob("step-*.safetensors"))
            for old in ckpts[:-self.cfg.keep_last] if self.cfg.keep_last > 0 else []:
                old.unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        return path

    # ---- one micro-batch ----------------------------------------------------------------------------------------
    def micro_batch(self):
        cfg = self.cfg
        ids, epoch = self.stream.next()
        gens = [sample_generator(cfg.seed, epoch, i) for i in ids]
        use_neg = [bool(torch.rand(1, generator=g) < cfg.cfg_drop_prob) for g in gens]
        batch = collate([self.cache.load(i) for i in ids], use_neg, self.device)
        bridge = cfg.mode == "bridge"
        if cfg.objective == "lbm":
            noised = make_lbm_inputs(batch, gens, bridge, cfg.lbm_grid, cfg.lbm_probs, cfg.bridge_sigma)
        else:
            noised = make_sft_inputs(batch, gens, bridge)
        return batch, noised

    # ---- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> Path | None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        resumed = cfg.resume and load_resume_state(self)
        self.state_step = self.step if resumed else 0  # the step of the resume state on disk (0: none)
        self.micro_batches = 0
        if cfg.resume and not resumed:
            self._print(f"[train] --resume: no state in {self.run_dir / 'state'}, starting fresh")
        if self.main:
            atomic_write_json(self.run_dir / "config.json", config_to_dict(cfg) | {"variant": self.variant.name})
        logger = RunLogger(self.run_dir, config_to_dict(cfg) | {"run_name": cfg.run_name}, cfg.wandb,
                           enabled=self.main, resume=resumed, resume_step=self.step)
        self._print(f"[train] {cfg.objective} {cfg.mode} Qwen-Image-Edit-{self.variant.name} zero_cond_t="
                    f"{self.zero_cond_t}: {self.n_trainable / 1e6:.2f} M trainable, {len(self.cache)} cached samples, "
                    f"accumulation {cfg.gradient_accumulation} x batch {cfg.batch_size} x {self.accelerator.num_processes} "
                    f"process(es); {'resuming at step ' + str(self.step) if resumed else 'from step 0'}")
        self.train_view()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.main, desc="train", unit="step")
        last_path = None
        running = None
        t0, samples = time.time(), 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with stop_requests() as stop:
            while self.step < cfg.max_steps:
                start = self.stream.state_dict()
                done = self.optimizer_step(stop)
                if done is None:  # a stop signal: the step in progress is dropped, the data goes back to its start
                    self.stream.load_state_dict(start)
                    self.stop_and_save(stop, logger, bar)
                losses, n, grad_norm, step_lr = done
                samples += n
                self.step += 1
                # Means over all ranks' micro-batches (each rank's own mean would log rank 0's share only).
                loss_v, main_v, sub_v = self.accelerator.reduce(losses, reduction="mean").tolist()
                running = loss_v if running is None else 0.9 * running + 0.1 * loss_v
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    dt = time.time() - t0
                    logger.log(self.step, {
                        "loss": loss_v, "loss_main": main_v,
                        "loss_sub": sub_v if cfg.mode == "bridge" else "",
                        "lr": step_lr, "grad_norm": grad_norm,
                        "samples_per_s": samples / max(dt, 1e-9),
                        "peak_mem_gib": (torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                                         if self.device.type == "cuda" else "")})
                    t0, samples = time.time(), 0
                last_path = self.save_and_validate(logger) or last_path
                kill_point(KILL_ENV, "step", self.step)
        bar.close()
        curve = logger.finish()
        if curve is not None:
            self._print(f"[train] loss curve: {curve}")
        self._print(f"[train] done: {last_path}")
        return last_path

    def optimizer_step(self, stop: StopRequest) -> tuple[torch.Tensor, int, float, float] | None:
        """One optimizer step over `gradient_accumulation` micro-batches: (this rank's mean loss, main loss and sub
        loss, stacked; the samples seen by all ranks; the gradient norm; the learning rate the step used). None when
        a stop signal came before one of its micro-batches (weights and optimizer are then as the last step left
        them: the gradients accumulated so far are dropped)."""
        cfg = self.cfg
        acc_loss = torch.zeros((), device=self.device)
        acc_main = torch.zeros((), device=self.device)
        acc_sub = torch.zeros((), device=self.device)
        samples, grad_norm, step_lr = 0, float("nan"), float("nan")
        for _ in range(cfg.gradient_accumulation):
            if self.stop_agreed(stop):
                return None
            batch, noised = self.micro_batch()
            with self.accelerator.accumulate(self.model):
                loss, lm, ls = self.model(batch, noised)
                self.accelerator.backward(loss)
                acc_loss += loss.detach() / cfg.gradient_accumulation
                acc_main += lm / cfg.gradient_accumulation
                if ls is not None:
                    acc_sub += ls / cfg.gradient_accumulation
                samples += len(batch["ids"]) * self.accelerator.num_processes
                if self.accelerator.sync_gradients:
                    if not torch.isfinite(acc_loss):
                        raise TrainingError(f"non-finite loss ({acc_loss.item()}) at step {self.step + 1} "
                                            f"(samples {batch['ids']}); stopping without saving. Lower the learning "
                                            f"rate or check the cache with `train_2511.py verify`.")
                    grad_norm = self._grad_norm()
                    if cfg.grad_clip > 0:
                        self.accelerator.clip_grad_norm_(self._params(), cfg.grad_clip)
                    self.optimizer.step()
                    step_lr = effective_lr(base_optimizer(self.optimizer))  # the lr this step used
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            self.micro_batches += 1
            signal_point(self.micro_batches)
        return torch.stack([acc_loss, acc_main, acc_sub]), samples, grad_norm, step_lr

    def stop_agreed(self, stop: StopRequest) -> bool:
        """Whether any process got a stop signal. All processes leave at the same micro-batch: one that went on would
        wait in the next backward's collectives for those that left."""
        if self.accelerator.num_processes == 1:
            return stop.requested
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def stop_and_save(self, stop: StopRequest, logger: RunLogger, bar) -> NoReturn:
        """After a stop signal: the resume state of the last finished step (unless it is saved already), then
        `TrainingStopped` with the signal's exit code."""
        bar.close()
        if self.step > self.state_step:
            save_resume_state(self)
            self.state_step = self.step
        logger.finish()
        what = (f"the resume state of step {self.step} is in {self.run_dir / 'state'}: run the same command with "
                f"--resume to go on" if self.step > 0 else "no step had finished, nothing to save")
        raise TrainingStopped(f"[train] stopped by {stop.signal or 'a signal on another process'} before step "
                              f"{self.step + 1} finished; {what}", stop.exit_code)

    def save_and_validate(self, logger: RunLogger) -> Path | None:
        """At a save or validation step: the checkpoint and the validation grid from the eval view, then the resume
        state from the train view. The checkpoint's path when one was written."""
        cfg = self.cfg
        save_now = self.step % cfg.save_every == 0 or self.step == cfg.max_steps
        validate_now = bool(cfg.validate_every) and (self.step % cfg.validate_every == 0 or self.step == cfg.max_steps)
        path = None
        if save_now or validate_now:
            self.eval_view()
            if save_now:
                path = self.save_checkpoint()
            if validate_now:
                self.run_validation(logger)
            self.train_view()
            if save_now:
                save_resume_state(self)
                self.state_step = self.step
        return path

    def _params(self):
        return [p for p in self.unwrapped().parameters() if p.requires_grad]

    def _grad_norm(self) -> float:
        if self.deepspeed:
            # DeepSpeed keeps the gradients in its own (partitioned) buffers, p.grad stays None; the engine has
            # already stepped inside accelerator.backward at the accumulation boundary and kept the norm.
            norm = self.model.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        grads = [p.grad.detach().float().norm() for p in self._params() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def run_validation(self, logger: RunLogger) -> Path | None:
        from .validation import validate

        m = self.unwrapped()
        ste = m.ste if self.cfg.mode == "bridge" else None
        path = self.run_dir / "samples" / f"step-{self.step:06d}.png"
        out = None
        if self.zero3:
            # ZeRO-3: the DiT and STE partitions are all-gathered module by module inside each forward (a collective),
            # so every rank samples the same edits and only the main process writes them. The VAE, built partitioned
            # by zero.Init and outside the engine's hooks unless the pixel loss uses it, is gathered whole.
            import deepspeed

            vae_params = list(self.pipe.vae.parameters()) if self.pipe.vae is not None else []
            with deepspeed.zero.GatheredParameters(vae_params, modifier_rank=None):
                out, metrics = validate(self.pipe, m.dit, ste, self.cfg, self.variant.name,
                                        path if self.main else None)
        elif self.main:
            out, metrics = validate(self.pipe, m.dit, ste, self.cfg, self.variant.name, path)
        if self.main:
            from .eval_curve import record

            record(self.run_dir, self.step, metrics)
            logger.log_wandb(self.step, {k: v for k, v in metrics.items() if k != "samples" and v is not None}, "val")
            logger.log_image(self.step, "validation", out)
        self.accelerator.wait_for_everyone()
        return out


def train(cfg: TrainConfig) -> Path | None:
    from .faults import output_write_error

    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.build()
        return trainer.fit()
    except Exception as e:
        problem = output_write_error(e, cfg.run_dir, trainer.step if trainer is not None and hasattr(trainer, "step")
                                     else 0)
        if problem is None:
            raise
        raise TrainingError(problem) from None
