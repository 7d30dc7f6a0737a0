"""`fp8_matmuls` on CPU (torch's `_scaled_mm` runs there too): each GEMM equals the product of its two e4m3-rounded
operands up to fp32 accumulation, the backward uses W quantised per input channel, the tiny DiT's LoRA gradients stay
within fp8's rounding of the unquantised ones, and the trainer runs with it (eager and compiled)."""
from __future__ import annotations

import copy
import csv

import pytest
import torch

from diffsynth_edit.config import ConfigError
from diffsynth_edit.fp8_base import fp8_matmul_blocks, quantise_frozen_blocks, to_fp8_matmul_linear
from diffsynth_edit.speedups import rowwise_fp8
from test_lowmem import _loss_and_grads, _tiny_dit, _with_lora
from test_training import cache_dir, make_cfg, run  # noqa: F401  (module fixture reused)

F32_ACC = 2e-6  # fp32 accumulation: relative to the sum of |terms| (K ≤ 64 terms here)


def _deq(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.double() * scale.double()


def _assert_product(out: torch.Tensor, a_rows: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor) -> None:
    """out == rowwise-e4m3(a) @ (b_fp8 [K, N] * b_scale [1, N]) exactly, up to fp32 accumulation of the terms."""
    aq, a_scale = rowwise_fp8(a_rows)
    a_deq, b_deq = _deq(aq, a_scale), _deq(b_fp8, b_scale)
    ref = a_deq @ b_deq
    bound = F32_ACC * (a_deq.abs() @ b_deq.abs()) + 1e-30
    assert bool(((out.double() - ref).abs() <= bound).all()), float(((out.double() - ref).abs() / bound).max())


def test_fp8_matmul_linear_is_the_product_of_the_rounded_operands():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).requires_grad_(False)
    with torch.no_grad():  # input channels of very different size: per-input-channel scales matter for grad_x
        lin.weight.mul_(torch.logspace(-3, 0, 64))
    w = lin.weight.detach().clone()
    bias = lin.bias.detach().clone()
    to_fp8_matmul_linear(lin)
    fwd, bwd = lin.fp8_fwd_operand, lin.fp8_bwd_operand
    assert fwd.dtype == bwd.dtype == torch.float8_e4m3fn and lin.weight.numel() == 0
    assert fwd.shape == (64, 48) and fwd.stride() == (1, 64)  # W^T, column-major (what _scaled_mm takes)
    assert bwd.shape == (48, 64) and bwd.stride() == (1, 48)  # W, column-major, quantised per input channel
    assert lin.fp8_fwd_scale.shape == (1, 48) and lin.fp8_bwd_scale.shape == (1, 64)
    x = torch.randn(3, 7, 64, requires_grad=True)
    y = lin(x)
    assert y.shape == (3, 7, 48) and y.dtype == torch.float32
    _assert_product((y - bias).detach().reshape(-1, 48), x.detach().reshape(-1, 64), fwd, lin.fp8_fwd_scale)
    g = torch.randn_like(y)
    y.backward(g)
    _assert_product(x.grad.reshape(-1, 64), g.reshape(-1, 48), bwd, lin.fp8_bwd_scale)
    assert lin.weight.grad is None and lin.bias.grad is None
    # against the exact fp32 layer: within e4m3's rounding of both operands (≤ 2^-4 relative each, and the
    # subnormal floor of the scaled rows), summed over the terms
    exact_gx = (g.double().reshape(-1, 48) @ w.double()).reshape(x.shape)
    terms = (g.double().abs().reshape(-1, 48) @ w.double().abs()).reshape(x.shape)
    assert bool(((x.grad.double() - exact_gx).abs() <= 0.14 * terms + 1e-6).all())
    # per input channel: the smallest columns of W (1e-3 of the largest) keep their relative accuracy
    small = slice(0, 8)
    rel = (x.grad.double() - exact_gx)[..., small].norm() / exact_gx[..., small].norm()
    assert rel < 0.1, rel


def test_gradient_rows_of_any_size_are_quantised():
    """An all-zero gradient row stays zero and a row at 1e-25 keeps its relative accuracy (a floor of 1e-12 on the
    row maximum, as the quantiser once had, would flush it)."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 16).requires_grad_(False)
    to_fp8_matmul_linear(lin)
    x = torch.randn(3, 32, requires_grad=True)
    g = torch.randn(3, 16)
    g[0] = 0
    g[1] *= 1e-25
    lin(x).backward(g)
    assert torch.equal(x.grad[0], torch.zeros(32))
    w = _deq(lin.fp8_bwd_operand, lin.fp8_bwd_scale)  # W [out, in] as the backward uses it
    exact = g.double() @ w
    assert float((x.grad[1].double() - exact[1]).norm() / exact[1].norm()) < 0.1


def test_fp8_matmul_refuses_a_trainable_linear():
    with pytest.raises(ValueError, match="frozen linears only"):
        to_fp8_matmul_linear(torch.nn.Linear(16, 16))


def _rel(grads, ref_grads) -> float:
    cat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    return float((cat(grads) - cat(ref_grads)).norm() / cat(ref_grads).norm())


def test_lora_gradients_through_fp8_blocks_err_no_more_than_fp8_storage():
    """The tiny DiT (4 blocks, random weights of std 0.2) under LoRA: token linears in fp8, modulation and LoRA
    untouched. Against the fp32 model, the LoRA gradients of fp8 matmuls (inputs and grad_out rounded too) are no
    further off than those of fp8 weight storage (`fp8_base`, only the weights rounded: the shipped low-memory tier),
    and not equal (the fp8 path ran). Per tensor they are 6-18 % off here: e4m3 gives ~5 % per product and the
    random tiny blocks amplify it."""
    dit = _tiny_dit(torch.float32)
    _with_lora(dit)
    dit.float()
    ref, stored = copy.deepcopy(dit), copy.deepcopy(dit)
    n = fp8_matmul_blocks(dit)
    quantise_frozen_blocks(stored)
    assert n == 4 * 12  # per block: 8 attention projections, 2 x 2 MLP linears; not the 2 modulation linears
    converted = {name for name, m in dit.transformer_blocks.named_modules() if hasattr(m, "fp8_bwd_operand")}
    assert not any("_mod" in name or "lora_" in name for name in converted)
    assert "0.attn.to_q.base_layer" in converted  # peft's base layer under the LoRA on to_q
    lora = lambda m: [p for name, p in m.named_parameters() if "lora_" in name]  # noqa: E731
    loss, grads = _loss_and_grads(dit, lora(dit), dtype=torch.float32)
    ref_loss, ref_grads = _loss_and_grads(ref, lora(ref), dtype=torch.float32)
    _, stored_grads = _loss_and_grads(stored, lora(stored), dtype=torch.float32)
    assert abs(loss - ref_loss) <= 0.05 * abs(ref_loss)
    assert 0 < _rel(grads, ref_grads) <= _rel(stored_grads, ref_grads)
    assert all(not p.requires_grad for name, p in dit.named_parameters() if "lora_" not in name)


@pytest.mark.slow
@pytest.mark.parametrize("compiled, budget", [(False, None), (True, None), (True, 0.3)])
def test_trainer_with_fp8_matmuls_tracks_the_plain_run(cache_dir, tiny_root, tmp_path, compiled,  # noqa: F811
                                                       budget):
    """Eager, compiled with block checkpointing, and compiled with the partitioner's recompute budget."""
    kw = dict(mode="bridge", max_steps=3, gradient_checkpointing=True, compile_blocks=compiled,
              recompute_budget=budget)
    run(make_cfg(cache_dir, tiny_root, tmp_path / "plain", **kw))
    trainer, _ = run(make_cfg(cache_dir, tiny_root, tmp_path / "fp8", fp8_matmuls=True, **kw))
    dit = trainer.unwrapped().dit
    assert sum(hasattr(m, "fp8_bwd_operand") for m in dit.modules()) == 12 * len(dit.transformer_blocks)
    losses = {}
    for name in ("plain", "fp8"):
        with open(tmp_path / name / "run" / "metrics.csv") as f:
            losses[name] = [float(r["loss"]) for r in csv.DictReader(f)]
    assert len(losses["fp8"]) == 3
    for a, b in zip(losses["fp8"], losses["plain"]):
        assert abs(a - b) <= 0.05 * abs(b), losses
    assert losses["fp8"] != losses["plain"]


@pytest.mark.parametrize("kw", [dict(fp8_base=True), dict(blocks_to_swap=2)])
def test_fp8_matmuls_refuse_the_low_memory_flags(kw):
    from diffsynth_edit.training.config import TrainConfig

    with pytest.raises(ConfigError, match="--fp8-matmuls .* does not combine with the low-memory tier"):
        TrainConfig(fp8_matmuls=True, **kw).validate()


def test_fp8_matmuls_refuse_zero3():
    from diffsynth_edit.training.faults import TrainingError
    from diffsynth_edit.training.model import check_fp8_matmuls

    with pytest.raises(TrainingError, match="--fp8-matmuls is a single-process mode"):
        check_fp8_matmuls(torch.device("cpu"), zero3=True)
    check_fp8_matmuls(torch.device("cpu"), zero3=False)  # CPU, one process: allowed


def test_fp8_matmuls_refuse_a_gpu_without_fp8_tensor_cores(monkeypatch):
    """The card's capability decides (no GPU needed here: the two queries are what the check reads)."""
    from diffsynth_edit.training.faults import TrainingError
    from diffsynth_edit.training.model import check_fp8_matmuls

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(TrainingError, match=r"--fp8-matmuls needs a GPU with fp8 tensor cores .*NVIDIA A100"):
        check_fp8_matmuls(torch.device("cuda"), zero3=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # Hopper: allowed
    check_fp8_matmuls(torch.device("cuda"), zero3=False)


def test_bf16_layer_as_on_the_gpu():
    """The GPU path's dtypes: bf16 weights, input, bias and output. The output is the fp32 product of the rounded
    operands plus the bias, rounded once to bf16 (2^-8 relative); the input gradient likewise."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 32).to(torch.bfloat16).requires_grad_(False)
    bias = lin.bias.detach().double()
    to_fp8_matmul_linear(lin)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    aq, a_scale = rowwise_fp8(x.detach())
    ref = _deq(aq, a_scale) @ _deq(lin.fp8_fwd_operand, lin.fp8_fwd_scale) + bias
    assert bool(((y.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-6).all())
    g = torch.randn(5, 32, dtype=torch.bfloat16)
    y.backward(g)
    assert x.grad.dtype == torch.bfloat16
    gq, g_scale = rowwise_fp8(g)
    ref_gx = _deq(gq, g_scale) @ _deq(lin.fp8_bwd_operand, lin.fp8_bwd_scale)
    assert bool(((x.grad.double() - ref_gx).abs() <= 2 ** -8 * ref_gx.abs() + 1e-6).all())
