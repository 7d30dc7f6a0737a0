"""Regional compilation of the DiT blocks in training (`compile_blocks`): same weights as eager, shapes that vary."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_training import cache_dir, make_cfg, run  # noqa: F401  (module fixture reused)


@pytest.mark.slow
@pytest.mark.parametrize("budget, save_attention", [(None, False), (0.3, False), (0.3, True)])
def test_compiled_blocks_train_like_eager(cache_dir, tiny_root, tmp_path, budget, save_attention,  # noqa: F811
                                          monkeypatch, request):
    """Three bridge-mode steps over samples whose sub boxes and prompts differ in size (so the compiled block sees
    new sequence lengths): the saved LoRA/STE weights equal the eager run's to float32 reordering error. With a
    recompute budget the blocks are not checkpointed; the partitioner recomputes inside each compiled block."""
    kw = dict(mode="bridge", max_steps=3, batch_size=1, gradient_accumulation=1, gradient_checkpointing=True)
    _, eager = run(make_cfg(cache_dir, tiny_root, tmp_path / "eager", **kw))
    import diffsynth_edit.bridge_dit as bridge_dit

    checkpointed = []
    plain_checkpoint = bridge_dit.checkpoint
    monkeypatch.setattr(bridge_dit, "checkpoint", lambda *a, **k: checkpointed.append(1) or plain_checkpoint(*a, **k))
    trainer, compiled = run(make_cfg(cache_dir, tiny_root, tmp_path / "compiled", compile_blocks=True,
                                     recompute_budget=budget, save_attention=save_attention, **kw))
    assert (len(checkpointed) > 0) == (budget is None)  # the budget replaces block checkpointing
    import torch._functorch.partitioners as partitioners
    from diffsynth_edit.speedups import keep_attention_outputs

    request.addfinalizer(lambda: keep_attention_outputs(False))  # process-wide: not for the tests after this one
    assert hasattr(partitioners.get_default_op_list, "_without_attention") == save_attention
    dit = trainer.unwrapped().dit
    assert all(b._compiled_call_impl is not None for b in dit.transformer_blocks)
    assert torch._functorch.config.activation_memory_budget == (1.0 if budget is None else budget)
    se, sc = load_file(str(eager)), load_file(str(compiled))
    assert se.keys() == sc.keys()
    moved = 0
    for k in se:
        scale = se[k].abs().max().item() + 1e-12
        diff = (se[k] - sc[k]).abs().max().item()
        # AdamW divides by sqrt(v): where a gradient is ~0 a reordering-sized change moves the update visibly, so
        # the bound is 0.1 % of the tensor's largest weight (the differences seen are ~1e-4 of it)
        assert diff <= 1e-3 * scale, (k, diff, scale)
        moved += not torch.equal(se[k], sc[k])
    # the compiled run is a different program (fused kernels): if every tensor were bit-equal, compile did not run
    assert moved > 0



def _attention_loss(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    q, k, v = [(x @ w).view(1, 32, 2, 32).transpose(1, 2) for w in weights]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return (out.transpose(1, 2).reshape(1, 32, 64).sin() * 2).sum()


def _backward_attention_forwards(save_attention: bool) -> tuple[int, list[torch.Tensor]]:
    """Compile `_attention_loss` at recompute budget 0.3 and run its backward under the profiler: how many attention
    forwards the backward ran (a recompute), and the gradients."""
    from diffsynth_edit.speedups import keep_attention_outputs

    torch._dynamo.reset()
    torch.manual_seed(0)
    weights = [torch.randn(64, 64, requires_grad=True) for _ in range(3)]
    x = torch.randn(1, 32, 64, requires_grad=True)
    torch._functorch.config.activation_memory_budget = 0.3
    keep_attention_outputs(save_attention)
    try:
        compiled = torch.compile(_attention_loss)
        compiled(x, weights).backward()  # compiles the backward (compiling may run ops itself: not profiled)
        for t in (x, *weights):
            t.grad = None
        loss = compiled(x, weights)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss.backward()
    finally:
        keep_attention_outputs(False)
        torch._dynamo.reset()
    forwards = sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_dot_product_flash_attention_for_cpu")
    return forwards, [x.grad, *(w.grad for w in weights)]


def test_save_attention_keeps_the_attention_output_for_the_backward():
    """Below a memory budget torch's partitioner takes an attention kernel it does not list as compute-intensive
    (cuDNN's on the GPU, the flash kernel on the CPU) as free to recompute: the backward runs the attention forward
    again. `keep_attention_outputs` lists it, so the partitioner weighs its cost: at budget 0.3 this graph keeps
    it, and the gradients stay the same. Switching off restores torch's own list and its autograd cache setting."""
    import torch._functorch.partitioners as partitioners

    # torch's own patch(): pytest's monkeypatch deletes a torch config entry when it undoes
    with torch._functorch.config.patch(activation_memory_budget=1.0, enable_autograd_cache=False,
                                       activation_memory_budget_runtime_estimator="flops"):
        torch_op_list = partitioners.get_default_op_list
        recomputed, grads = _backward_attention_forwards(save_attention=False)
        kept, grads_kept = _backward_attention_forwards(save_attention=True)
        cache_after = torch._functorch.config.enable_autograd_cache
    assert recomputed == 1 and kept == 0
    for a, b in zip(grads, grads_kept):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    assert partitioners.get_default_op_list is torch_op_list
    assert cache_after is False


def test_save_attention_needs_a_recompute_budget(tiny_root, tmp_path):
    from diffsynth_edit.config import ConfigError
    from diffsynth_edit.speedups import compile_blocks

    with pytest.raises(ValueError, match="give recompute_budget"):
        compile_blocks(torch.nn.Module(), save_attention=True)
    with pytest.raises(ConfigError, match="--save-attention .* give --recompute-budget"):
        make_cfg(tmp_path, tiny_root, tmp_path / "o", compile_blocks=True, save_attention=True)


def test_keep_attention_outputs_twice_installs_one_wrapper_and_off_restores_torch():
    import torch._functorch.partitioners as partitioners
    from diffsynth_edit.speedups import keep_attention_outputs

    with torch._functorch.config.patch(enable_autograd_cache=True):
        torch_op_list = partitioners.get_default_op_list
        keep_attention_outputs(True)
        try:
            wrapper = partitioners.get_default_op_list
            keep_attention_outputs(True)
            assert partitioners.get_default_op_list is wrapper and wrapper._without_attention is torch_op_list
            assert torch._functorch.config.enable_autograd_cache is False
            assert torch.ops.aten._scaled_dot_product_cudnn_attention in wrapper().compute_intensive_ops
            assert torch.ops.aten._scaled_dot_product_cudnn_attention not in torch_op_list().compute_intensive_ops
        finally:
            keep_attention_outputs(False)
        keep_attention_outputs(False)
        assert partitioners.get_default_op_list is torch_op_list
        assert torch._functorch.config.enable_autograd_cache is True
