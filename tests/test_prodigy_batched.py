"""The batched ProdigyPlusScheduleFree step computes what the library's per-tensor step computes."""
from __future__ import annotations

import copy

import pytest
import torch
from prodigyplus import ProdigyPlusScheduleFree

from diffsynth_edit.training.prodigy_batched import BatchedProdigyPlusScheduleFree

# Shapes of a LoRA and its neighbours: wide and tall factored matrices (the library reduces them differently),
# a matrix too small to factor, vectors, a scalar; several tensors per shape so that stacks form.
SHAPES = [(8, 48), (8, 48), (8, 48), (48, 8), (48, 8), (40, 40), (16, 4), (16, 4), (33,), (33,), ()]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(SHAPES):
        zero = i in (3, 4, 8)  # LoRA's B starts at zero: the library keeps a scalar p0 for those
        t = torch.zeros(shape) if zero else torch.randn(shape, generator=g) * 0.1
        params.append(torch.nn.Parameter(t.to(dtype)))
    return params


def set_grads(params: list[torch.nn.Parameter], step: int, skip: int | None = None) -> None:
    """A pull towards a fixed target plus noise: a consistent direction, so Prodigy's d grows."""
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        target = torch.full(p.shape, 1.0 + 0.1 * i)
        grad = p.detach().float() - target + 0.3 * torch.randn(p.shape, generator=g)
        p.grad = None if i == skip else grad.to(p.dtype)


def run(cls, dtype: torch.dtype, steps: int = 6, skip_at: dict | None = None, **kw):
    params = make_params(dtype)
    opt = cls([{"params": params}], **kw)
    for step in range(steps):
        set_grads(params, step, (skip_at or {}).get(step))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params, opt


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    a, b = a.double(), b.double()
    return bool(((a - b).abs() <= rtol * b.abs().max().clamp_min(1e-12)).all())


def assert_same_run(ref, got, rtol: float) -> None:
    (ref_params, ref_opt), (got_params, got_opt) = ref, got
    rg, gg = ref_opt.param_groups[0], got_opt.param_groups[0]
    assert gg["k"] == rg["k"]
    assert gg["d"] == pytest.approx(rg["d"], rel=rtol)
    assert gg["d"] > gg["d0"]  # d grew: Prodigy's sums were nonzero
    for i, (rp, gp) in enumerate(zip(ref_params, got_params)):
        assert close(gp.detach(), rp.detach(), rtol), f"param {i} {tuple(rp.shape)}"
        rs, gs = ref_opt.state[rp], got_opt.state[gp]
        assert rs.keys() == gs.keys(), i
        for key, value in rs.items():
            if isinstance(value, torch.Tensor):
                assert gs[key].shape == value.shape and gs[key].dtype == value.dtype, (i, key)
                assert close(gs[key], value, rtol), f"param {i} state {key}"
            else:
                assert gs[key] == value, (i, key)


def test_float32_equals_the_library_over_steps_with_weight_decay_and_a_missing_grad():
    kw = dict(lr=1.0, betas=(0.95, 0.99), weight_decay=0.01, d0=1e-4)
    skip = {2: 5}  # one tensor has no gradient at step 2: the library skips it, and so must the stack
    assert_same_run(run(ProdigyPlusScheduleFree, torch.float32, skip_at=skip, **kw),
                    run(BatchedProdigyPlusScheduleFree, torch.float32, skip_at=skip, **kw), rtol=2e-5)


def test_decay_not_scaled_by_lr_and_small_chunks_equal_the_library():
    kw = dict(lr=0.5, weight_decay=0.05, weight_decay_by_lr=False, d0=1e-3)
    assert_same_run(run(ProdigyPlusScheduleFree, torch.float32, **kw),
                    run(BatchedProdigyPlusScheduleFree, torch.float32, max_chunk_elements=100, **kw), rtol=2e-5)


def test_bfloat16_without_stochastic_rounding_equals_the_library():
    kw = dict(d0=1e-4, stochastic_rounding=False)
    # bfloat16 keeps 8 bits: a last-bit difference in d (float32 round-off in the sums) may flip a rounding
    assert_same_run(run(ProdigyPlusScheduleFree, torch.bfloat16, steps=4, **kw),
                    run(BatchedProdigyPlusScheduleFree, torch.bfloat16, steps=4, **kw), rtol=2e-2)


def test_bfloat16_stochastic_rounding_lands_on_a_neighbour_of_the_float32_result():
    params = [torch.nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16) * 0.1) for _ in range(3)]
    exact = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    opts = [cls([{"params": ps}], d0=1e-2, stochastic_rounding=sr)
            for cls, ps, sr in ((BatchedProdigyPlusScheduleFree, params, True),
                                (BatchedProdigyPlusScheduleFree, exact, False))]
    torch.manual_seed(0)
    grads = [torch.randn(64, 64) for _ in params]
    for p, e, g in zip(params, exact, grads):
        p.grad, e.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    for o in opts:
        o.step()
    for p, e in zip(params, exact):
        lo = e.detach().to(torch.bfloat16, copy=True)  # round to nearest, then the two bfloat16 neighbours
        below = torch.nextafter(lo, torch.full_like(lo, -float("inf")))
        above = torch.nextafter(lo, torch.full_like(lo, float("inf")))
        v = p.detach()
        assert bool(((v == lo) | (v == below) | (v == above)).all())
        assert not torch.equal(v, lo)  # rounding was stochastic, not to nearest


def test_schedule_free_eval_weights_equal_the_library():
    ref, got = run(ProdigyPlusScheduleFree, torch.float32, d0=1e-4), run(BatchedProdigyPlusScheduleFree,
                                                                          torch.float32, d0=1e-4)
    ref[1].eval()
    got[1].eval()
    for rp, gp in zip(ref[0], got[0]):
        assert close(gp.detach(), rp.detach(), 2e-5)


def test_the_stacked_step_does_not_call_the_per_tensor_step(monkeypatch):
    calls = []
    monkeypatch.setattr(ProdigyPlusScheduleFree, "step_param_schedulefree",
                        lambda self, p, group: calls.append(p))
    run(BatchedProdigyPlusScheduleFree, torch.float32, steps=2)
    assert calls == []
    run(BatchedProdigyPlusScheduleFree, torch.float32, steps=2, use_adopt=True)  # outside the batched path
    assert len(calls) == 2 * len(SHAPES)


def test_options_outside_the_batched_path_run_the_library_step_bit_for_bit():
    for kw in (dict(use_adopt=True), dict(use_schedulefree=False), dict(use_cautious=True),
               dict(eps=None), dict(prodigy_steps=2)):
        ref = run(ProdigyPlusScheduleFree, torch.float32, steps=4, d0=1e-3, **kw)
        got = run(BatchedProdigyPlusScheduleFree, torch.float32, steps=4, d0=1e-3, **kw)
        for rp, gp in zip(ref[0], got[0]):
            assert torch.equal(gp, rp), kw


def test_state_moves_between_the_library_and_the_batched_optimizer():
    """A library checkpoint resumes in the batched optimizer as it resumes in the library (torch's load_state_dict
    casts the bfloat16 p0/s states to the parameters' float32 in both)."""
    kw = dict(d0=1e-4, weight_decay=0.01)
    params, opt = run(ProdigyPlusScheduleFree, torch.float32, steps=3, **kw)
    resumed = []
    for cls in (ProdigyPlusScheduleFree, BatchedProdigyPlusScheduleFree):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        o = cls([{"params": ps}], **kw)
        o.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares tensors it need not cast
        for step in range(3, 6):
            set_grads(ps, step)
            o.step()
            o.zero_grad(set_to_none=True)
        resumed.append((ps, o))
    assert_same_run(*resumed, rtol=2e-5)
    assert resumed[1][1].param_groups[0]["k"] == 7


def test_a_strided_parameter_is_stacked_and_written_back_through_its_strides():
    """A transposed (non-contiguous) parameter and its z state: the stack reads them in logical order (as the
    library's ravel() does for p0 and the sliced sums) and `_foreach_copy_` writes back through the strides."""
    def params_with_a_transpose():
        ps = make_params(torch.float32)
        ps[5] = torch.nn.Parameter(ps[5].detach().t())  # (40, 40) transposed: strided
        assert not ps[5].is_contiguous()
        return ps

    runs = []
    for cls in (ProdigyPlusScheduleFree, BatchedProdigyPlusScheduleFree):
        ps = params_with_a_transpose()
        opt = cls([{"params": ps}], d0=1e-4)
        for step in range(4):
            set_grads(ps, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append((ps, opt))
    assert not runs[1][0][5].is_contiguous()
    assert_same_run(*runs, rtol=2e-5)
