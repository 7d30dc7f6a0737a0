"""ProdigyPlusScheduleFree's step run over stacks of same-shape tensors.

The library steps one tensor at a time, some forty small kernels each; the shipped default LoRA (rank 512 on 17
targets of 60 blocks, with the STE) has 2,586 tensors, so its optimizer step cost 2.4 s on an H200 and was
launch-bound; batched it takes 0.37 s (bench/RESULTS.md, session 8). This subclass runs the same arithmetic on stacks of tensors of one shape: a leading batch
dimension, every per-tensor reduction (the factored second moment's row/column norms, StableAdamW's RMS, Prodigy's
sliced dot products) taken per slice. The launch count then follows the number of distinct shapes, not of tensors.

The state stays per tensor in the library's own layout (checkpoints move between the two classes), and the
library's elementwise methods (`update_second_moment`, `update_`, `update_params`) are called on the stacks, so
what is computed is the library's code; only the reductions' summation order differs (float32 round-off).
Configurations outside the common path (ADOPT, bias correction, cautious/grams, orthograd, FOCUS, SPEED, fused back
pass, plain Prodigy, a frozen `prodigy_steps`) take the library's own per-tensor step.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from prodigyplus import ProdigyPlusScheduleFree

_PER_TENSOR_ONLY = ("use_adopt", "use_bias_correction", "use_cautious", "use_grams", "use_orthograd", "use_focus",
                    "use_speed", "fused_back_pass")
_SLICE = 11  # the library's `get_sliced_tensor` stride


class BatchedProdigyPlusScheduleFree(ProdigyPlusScheduleFree):
    """ProdigyPlusScheduleFree (same arguments, same state) whose step batches tensors of one shape.

    `max_chunk_elements` bounds one stack (each float32 temporary is at most that many elements): at the default
    2^26 the step's live temporaries (y, z, gradient, denominator, stochastic-rounding scratch) stay under 1.3 GiB
    whatever the LoRA's size."""

    def __init__(self, params, max_chunk_elements: int = 1 << 26, **kwargs):
        super().__init__(params, **kwargs)
        self.max_chunk_elements = int(max_chunk_elements)

    def batchable(self, group: dict) -> bool:
        """Whether `group`'s options are the ones the batched step computes (else the library's step runs)."""
        frozen = group["prodigy_steps"] > 0 and group["k"] >= group["prodigy_steps"]
        return (group["use_schedulefree"] and group["train_mode"] and group["eps"] is not None and not frozen
                and not any(group[k] for k in _PER_TENSOR_ONLY))

    @torch.no_grad()
    def step(self, closure=None):
        if not all(self.batchable(g) for g in self.param_groups):
            return super().step(closure)
        self.try_unhook_kohya_fbp()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.on_start_step()
        for group in self.param_groups:
            for chunk in self._chunks(group):
                self._step_stack(chunk, group)
        for group in self.param_groups:  # the library's bookkeeping: d is re-estimated after the last tensor
            for _ in group["params"]:
                self.on_end_step()
        return loss

    def _chunks(self, group: dict) -> list[list[torch.Tensor]]:
        """The group's parameters with a gradient, in runs of one shape, dtype and state layout."""
        buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.initialise_state(p, group)  # the library's layout (a no-op after the first step)
            key = (tuple(p.shape), p.dtype, p.grad.dtype, p.device, state["z"].dtype, state["p0"].dim(),
                   state.get("exp_avg_sq_metadata"))
            buckets[key].append(p)
        chunks = []
        for ps in buckets.values():
            per_chunk = max(1, self.max_chunk_elements // max(1, ps[0].numel()))
            chunks += [ps[i:i + per_chunk] for i in range(0, len(ps), per_chunk)]
        return chunks

    def _step_stack(self, ps: list[torch.Tensor], group: dict) -> None:
        """`step_param_schedulefree` for every tensor of `ps` at once (see the module docstring)."""
        states = [self.state[p] for p in ps]
        shape = ps[0].shape if ps[0].dim() else torch.Size([1])
        as_slices = [p.view(shape) for p in ps]
        z_slices = [s["z"].view(shape) for s in states]
        _, beta2, beta3 = self.get_betas(group)
        dlr = self.get_dlr(group)

        y = torch.stack(as_slices).float()
        z = torch.stack(z_slices).float()
        grad = torch.stack([p.grad.view(shape) for p in ps]).to(torch.float32)

        moments = self._stacked_second_moment(states, shape)
        denom = self.update_second_moment(moments, group, grad, beta2, z)
        self._write_back(moments, states)
        grad.mul_(group["d"])
        update = self.update_(grad, denom, group, z)
        del denom
        if group["use_stableadamw"]:  # rms_clip_ per tensor
            rms = update.flatten(1).norm(dim=1).div(update[0].numel() ** 0.5).clamp_min(1.0)
            update.mul_(rms.rsqrt().view(-1, *([1] * len(shape))))
        self._update_prodigy(ps, states, group)
        self.update_params(y, z, update, group, dlr)
        del grad, update  # one tensor (update_ works in place on grad): freed before the copies
        self._copy_into(as_slices, y, group["stochastic_rounding"])
        self._copy_into(z_slices, z, group["stochastic_rounding"])

    @staticmethod
    def _stacked_second_moment(states: list[dict], shape: torch.Size) -> dict:
        """A state dict holding the stacked second moments, with the factored dims shifted past the stack's."""
        if "exp_avg_sq_metadata" in states[0]:
            dr, dc = states[0]["exp_avg_sq_metadata"]
            return {"exp_avg_sq_row": torch.stack([s["exp_avg_sq_row"] for s in states]),
                    "exp_avg_sq_col": torch.stack([s["exp_avg_sq_col"] for s in states]),
                    "exp_avg_sq_metadata": (dr + 1, dc + 1)}
        return {"exp_avg_sq": torch.stack([s["exp_avg_sq"].view(shape) for s in states])}

    @staticmethod
    def _write_back(moments: dict, states: list[dict]) -> None:
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in moments:
                torch._foreach_copy_([s[key].view(moments[key].shape[1:]) for s in states],
                                     list(moments[key].unbind(0)))

    def _update_prodigy(self, ps: list[torch.Tensor], states: list[dict], group: dict) -> None:
        """`update_prodigy` for the stack: Prodigy's numerator and denominator sums over every 11th element."""
        _, _, beta3 = self.get_betas(group)
        d_update = (group["d"] ** 2) / (group["d0"] ** 0.5)
        numerator, denominator = self.get_running_values_for_group(group)
        sliced_grad = torch.stack([p.grad.reshape(-1)[::_SLICE] for p in ps])
        sliced_z = torch.stack([s["z"].reshape(-1)[::_SLICE] for s in states])
        p0 = torch.stack([s["p0"] for s in states])
        x0_minus = (p0.view(len(ps), -1) if p0.dim() == 1 else p0) - sliced_z
        # torch.dot rounds its float32 accumulation to the operands' dtype once; so does this.
        x0_dot = (sliced_grad.float() * x0_minus.float()).sum(dim=1).to(torch.promote_types(sliced_grad.dtype,
                                                                                             x0_minus.dtype))
        s = torch.stack([st["s"] for st in states])
        s.mul_(beta3).add_(sliced_grad, alpha=d_update)
        torch._foreach_copy_([st["s"] for st in states], list(s.unbind(0)))
        denominator.add_(s.abs().sum(dim=1).float().sum())
        numerator.add_(x0_dot.float().sum(), alpha=d_update)

    def _copy_into(self, targets: list[torch.Tensor], source: torch.Tensor, stochastic: bool) -> None:
        """The library's `smart_copy` into every slice: stochastic rounding into bfloat16 targets when asked."""
        if stochastic and targets[0].dtype == torch.bfloat16:
            rounded = torch.empty_like(source)
            self.copy_stochastic_(rounded, source)  # float32 with the low 16 bits cleared: exact in bfloat16
            source = rounded
        torch._foreach_copy_(targets, list(source.unbind(0)))
