"""Speed-ups that keep diffsynth's modules, weights and checkpoint keys.

- `single_frame_vae`: Qwen-Image's VAE is Wan's causal 3D VAE. On one frame without a feature cache (every image
  encode/decode) each causal conv pads two zero frames in front of the image, so only the kernel's last time slice
  ever touches data. Running that slice as a `conv2d` gives the same numbers with a third of the FLOPs and cuDNN's
  2D kernels. Exact; applied by `load_pipeline`.
- `real_rope`: the blocks accept real (cos, sin) frequency tables (what `bridge_forward` passes: the STE blends
  them per token). Eager, they are viewed back as complex and rotate with upstream's complex multiply: one kernel,
  and upstream's rounding (on an H200 the real-arithmetic rotation was slower and moved the bf16 output by up to 0.09;
  bench/RESULTS.md). Under `torch.compile` the rotation is real arithmetic, which inductor fuses (it does not fuse
  complex ops).
- `single_call_vision_attention`: the text encoder's vision tower (Qwen2.5-VL) runs its windowed attention as one
  SDPA call per window, with a host sync per layer (`lengths.tolist()`); here the windows (or whole images) of one
  length form one batched SDPA call (typically 1-3 calls per layer) and the grouping is computed once per forward.
  Same attention, a few launches instead of hundreds, and no quadratic mask when many images share one call (the
  cache encodes 2 images x batch size at once).
- `sdpa_any_length`: attention without per-shape plans, around every text-encoder call (see its docstring).
- `quantize_dit_fp8`: opt-in inference mode. The transformer blocks' linears run as fp8 (e4m3) matmuls with
  per-output-channel weight scales and per-token activation scales (`torch._scaled_mm`); a hot-loaded LoRA still
  adds its bf16 branch. Not exact: an approximation users choose (as in ComfyUI / diffsynth's fp8 modes).
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

FP8_MAX = 448.0


# ---- VAE: single frame convs as 2D ----------------------------------------------------------------------------
def _single_frame_conv(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[2] != 1 or cache_x is not None:
        return type(self).forward(self, x, cache_x)
    pad_w, _, pad_h, _ = self._padding[:4]
    y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (pad_h, pad_w))
    return y.unsqueeze(2)


def single_frame_vae(vae: torch.nn.Module) -> int:
    """Patch every causal conv whose time padding puts one output frame on the kernel's last tap; returns how many."""
    from diffsynth.models.qwen_image_vae import QwenImageCausalConv3d

    patched = 0
    for module in vae.modules():
        if not isinstance(module, QwenImageCausalConv3d):
            continue
        kt, st = module.kernel_size[0], module.stride[0]
        if module._padding[4] != kt - 1 or module._padding[5] != 0 or st != 1:
            continue  # temporal resampling convs: only ever called with a feature cache (video)
        module.forward = types.MethodType(_single_frame_conv, module)
        patched += 1
    return patched


# ---- RoPE as real arithmetic ----------------------------------------------------------------------------------
_original_rotary = None


def _rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`x` [B, H, L, D]; `freqs` complex [..., L, D/2] (upstream) or real [..., L, D/2, 2] (cos, sin)."""
    if freqs.is_complex():
        return _original_rotary(x, freqs)
    if not torch.compiler.is_compiling():  # eager: upstream's complex multiply, bit for bit
        return _original_rotary(x, torch.view_as_complex(freqs.contiguous()))
    return _real_rotary(x, freqs)


def _real_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The rotation as real arithmetic on (cos, sin): what inductor can fuse."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = freqs[..., 0], freqs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def real_rope() -> None:
    """Let diffsynth's attention accept real (cos, sin) tables (eager: rotated by upstream's code)."""
    global _original_rotary
    from diffsynth.models import qwen_image_dit

    if _original_rotary is None:
        _original_rotary = qwen_image_dit.apply_rotary_emb_qwen
        qwen_image_dit.apply_rotary_emb_qwen = _rotary


# ---- vision tower: windowed attention in one call per segment length ----------------------------------------
def _segment_plan(cu_seqlens: torch.Tensor) -> list[tuple[int, int, torch.Tensor | None]]:
    """[(length, count, token index [count * length] or None for 'all tokens in order')] grouping the segments of
    `cu_seqlens` by length. The vision tower passes the same two tensors (windows, whole images) to all 32 layers,
    so the plan is kept on the tensor: one host sync per tensor, not one per layer."""
    plan = getattr(cu_seqlens, "_segment_plan", None)
    if plan is not None:
        return plan
    bounds = cu_seqlens.tolist()
    starts: dict[int, list[int]] = {}
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            starts.setdefault(b - a, []).append(a)
    plan = []
    for length, firsts in starts.items():
        if len(starts) == 1 and bounds[0] == 0:  # equal segments tile the sequence: a reshape, no gather
            plan.append((length, len(firsts), None))
        else:
            index = torch.tensor(firsts, device=cu_seqlens.device)[:, None] + torch.arange(length, device=cu_seqlens.device)
            plan.append((length, len(firsts), index.reshape(-1)))
    cu_seqlens._segment_plan = plan
    return plan


def _vision_attention(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, max_seqlen=None,
                      **kwargs) -> torch.Tensor:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = None
    for seg, count, index in _segment_plan(cu_seqlens):
        # segments of one length as a batch [count, H, seg, D]: no mask, no cross-segment scores
        qs, ks, vs = ((t if index is None else t[index]).view(count, seg, *t.shape[1:]).transpose(1, 2)
                      for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=self.scaling).transpose(1, 2).reshape(-1, *q.shape[1:])
        if index is None:
            out = o
        else:
            out = torch.empty_like(q) if out is None else out
            out[index] = o
    return self.proj(out.reshape(length, -1))


def single_call_vision_attention(text_encoder: torch.nn.Module) -> int:
    """Patch the Qwen2.5-VL vision attention modules (not under flash-attention-2, which already runs varlen)."""
    try:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention
    except ImportError:
        return 0
    patched = 0
    for module in text_encoder.modules():
        if isinstance(module, Qwen2_5_VLVisionAttention) and "flash" not in str(module.config._attn_implementation):
            module.forward = types.MethodType(_vision_attention, module)
            patched += 1
    return patched


@contextlib.contextmanager
def sdpa_any_length() -> Iterator[None]:
    """SDPA restricted to the backends that serve any sequence length as is (flash, memory-efficient, math).

    On Hopper torch prefers cuDNN's fused attention, and cuDNN builds an execution graph for every new shape (H100,
    torch 2.11, `bench/bench_new_shapes.py`): at the text encoder's shape 56 ms per new length for one causal
    prompt and 440 ms per new length for a padded batch, against 0.1-0.5 ms per call at any length without cuDNN.
    Prompt lengths change with nearly every call, so every text-encoder call runs inside this (`encoding`). The DiT
    keeps cuDNN: 2x faster than flash per call at its sizes (whether that outweighs its per-shape cost when sub-crop
    sizes vary from step to step is not measured). The switch is process-wide while active
    (torch's backend flags are global)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def exact_speedups(pipe) -> None:
    """The loader's patches (single-frame VAE, one-call vision attention) on a pipeline built elsewhere."""
    if getattr(pipe, "vae", None) is not None:
        single_frame_vae(pipe.vae)
    if getattr(pipe, "text_encoder", None) is not None:
        single_call_vision_attention(pipe.text_encoder)


# ---- compiled VAE ----------------------------------------------------------------------------------------------
def compile_vae(vae: torch.nn.Module, encoder: bool = True, decoder: bool = False) -> None:
    """torch.compile the VAE's encoder and/or decoder in place (dynamic shapes). Inductor fuses the norms,
    activations and residual adds around cuDNN's convolutions: a 1024² encode 2.2x faster on an H100
    (bench/RESULTS.md); numbers differ at bf16 rounding level. `uncompile_vae` undoes it.

    Caveat (measured): dynamic shapes do not make one graph serve all sizes. The down-sampling stages guard on the
    sizes' divisibility, so most new image sizes compile again (10 sizes gave 7 graphs in a CPU check; seconds
    each, and eager after torch's recompile limit). Worth it only where few image sizes recur."""
    for on, module in ((encoder, vae.encoder), (decoder, vae.decoder)):
        if on:
            module.compile(dynamic=True)


def uncompile_vae(vae: torch.nn.Module) -> None:
    for module in (vae.encoder, vae.decoder):
        module._compiled_call_impl = None  # what nn.Module.compile set


# ---- fp8 linears ----------------------------------------------------------------------------------------------
# The smallest row maximum given its own scale: below it the scale would leave float32's normal range (the scale of an
# all-zero row is this floor too; its quantised values are 0 either way).
_AMAX_FLOOR = FP8_MAX * torch.finfo(torch.float32).tiny


def rowwise_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 scale [rows, 1]) with each row's largest magnitude mapped to the fp8 maximum. Rows of any
    magnitude keep their relative precision (gradient rows can be far below 1e-12)."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=_AMAX_FLOOR) / FP8_MAX
    return (t.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_matmul(a: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None = None,
               fast_accum: bool = False) -> torch.Tensor:
    """a[..., K] @ (b_fp8[K, N] * b_scale[1, N]) (+ bias) in a's dtype, `a` quantised per row (per token) on the fly.
    `b_fp8` must be column-major (`_scaled_mm`'s layout: a `.t()` of a row-major [N, K] weight)."""
    shape = a.shape
    aq, a_scale = rowwise_fp8(a.reshape(-1, shape[-1]).contiguous())  # _scaled_mm: `a` row-major
    out = torch._scaled_mm(aq, b_fp8, scale_a=a_scale, scale_b=b_scale,
                           bias=None if bias is None else bias.to(a.dtype), out_dtype=a.dtype,
                           use_fast_accum=fast_accum)
    return out.reshape(*shape[:-1], -1)


def _fp8_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    out = fp8_matmul(x, self.fp8_weight.t(), self.fp8_scale, self.bias, self.fp8_fast_accum)
    if getattr(self, "lora_A_weights", None):
        out = self.lora_forward(x, out)
    return out


def quantize_linear_fp8(linear: torch.nn.Linear, fast_accum: bool = False) -> None:
    """In place: fp8 weight + per-row scale buffers; the bf16 weight is released. `fast_accum`: Hopper's fast fp8
    accumulation (`_scaled_mm(use_fast_accum=True)`: partial sums not promoted to fp32 as often; faster, less
    exact)."""
    w = linear.weight.detach()
    wq, scale = rowwise_fp8(w)  # per output channel
    linear.register_buffer("fp8_weight", wq, persistent=False)
    linear.register_buffer("fp8_scale", scale.t().contiguous(), persistent=False)  # [1, out]
    linear.weight = torch.nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)
    linear.fp8_fast_accum = bool(fast_accum)
    linear.forward = types.MethodType(_fp8_forward, linear)


def set_fp8_fast_accum(dit: torch.nn.Module, on: bool) -> int:
    """Switch fast fp8 accumulation on or off in every fp8 linear of `dit` (compiled blocks recompile on the next
    call: the flag is guarded). Returns how many linears."""
    linears = [m for m in dit.modules() if getattr(m, "fp8_fast_accum", None) is not None]
    for m in linears:
        m.fp8_fast_accum = bool(on)
    return len(linears)


# The token linears of a Qwen-Image DiT block (`token_linear_names` of the released architecture; a test holds the two
# equal), for checking a `keep_bf16` list before any model is loaded.
DIT_TOKEN_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                     "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                     "txt_mlp.net.2")


def check_keep_bf16(keep_bf16: Sequence[str], names: Sequence[str] = DIT_TOKEN_LINEARS) -> None:
    unknown = [n for n in keep_bf16 if n not in names]
    if unknown:
        raise ValueError(f"fp8 keep-bf16: {', '.join(map(repr, unknown))} is not a token linear of a DiT block; "
                         f"choose from {', '.join(names)}")


def token_linear_names(dit: torch.nn.Module) -> list[str]:
    """The names, within one DiT block, of the linears `quantize_dit_fp8` turns to fp8 (attention projections and
    MLPs; not modulation): what `keep_bf16` may name."""
    block = dit.transformer_blocks[0]
    return [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and "_mod" not in n]


def quantize_dit_fp8(dit: torch.nn.Module, fast_accum: bool = False, keep_bf16: Sequence[str] = ()) -> int:
    """fp8 for the blocks' token linears (attention projections and MLPs; not modulation, not in/out layers), except
    those `keep_bf16` names (block-relative, e.g. "img_mlp.net.0.proj": of the kinds of linear, the image MLP's two
    carry most of fp8's error, bench/RESULTS.md). Returns how many linears were quantised."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError("fp8 inference needs a CUDA GPU with fp8 tensor cores (Ada or Hopper)")
    names = token_linear_names(dit)
    check_keep_bf16(keep_bf16, names)
    count = 0
    for block in dit.transformer_blocks:
        for name, module in block.named_modules():
            if name in names and name not in keep_bf16 and not hasattr(module, "fp8_weight"):
                quantize_linear_fp8(module, fast_accum)
                count += 1
    return count


# ---- regional compile ------------------------------------------------------------------------------------------
# Attention kernels that torch's partitioner (2.11 to 2.14) leaves out of its compute-intensive ops: below a memory
# budget it may recompute them like an add, so each block runs its attention forward again in the backward (the
# H100 profile of the r32 step: 120 cuDNN attention forwards for 60 blocks at budget 0.1, bench/RESULTS.md).
_UNLISTED_ATTENTION_OPS = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")


def keep_attention_outputs(on: bool) -> None:
    """Process-wide, read when a graph compiles: with `on`, torch's partitioner counts the attention kernels above as
    compute-intensive, so under `recompute_budget` it weighs their runtime before recomputing them (as it does for
    flash/efficient attention and the GEMMs) instead of taking them as free. The AOT autograd cache is off
    meanwhile (its key does not see this switch, and a cached partition made without it would come back)."""
    import torch._functorch.partitioners as partitioners
    from torch.utils._ordered_set import OrderedSet

    current = partitioners.get_default_op_list
    if on == hasattr(current, "_without_attention"):
        return  # already as asked
    if not on:  # the wrapper below holds what it replaced
        partitioners.get_default_op_list = current._without_attention
        torch._functorch.config.enable_autograd_cache = current._autograd_cache
        return
    attention = OrderedSet(getattr(torch.ops.aten, n) for n in _UNLISTED_ATTENTION_OPS if hasattr(torch.ops.aten, n))
    _count_cpu_attention_flops()

    def op_list_with_attention():
        ops = current()
        ops.compute_intensive_ops = ops.compute_intensive_ops | attention
        return ops

    op_list_with_attention._without_attention = current
    op_list_with_attention._autograd_cache = torch._functorch.config.enable_autograd_cache
    torch._functorch.config.enable_autograd_cache = False
    partitioners.get_default_op_list = op_list_with_attention


def _count_cpu_attention_flops() -> None:
    """The partitioner prices a recompute by its FLOPs (torch.utils.flop_counter); the cuDNN attention has a formula,
    the CPU flash kernel none (so it would look free): give it the same one, so that the CPU decides as the GPU."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def compile_blocks(dit: torch.nn.Module, ste: torch.nn.Module | None = None,
                   recompute_budget: float | None = None, save_attention: bool = False) -> None:
    """torch.compile each DiT transformer block (and each STE block) in place: regional compilation, one graph
    shared by all 60 blocks (the blocks' weights are graph inputs), so the first step compiles once (~25 s for the
    full model on an H200) instead of once per block. Inductor fuses the modulation, norms, RoPE, gates and LoRA
    glue around the GEMMs and attention. A new sequence length (prompt or sub box) recompiles once, after which the
    graph is dynamic in it. Works under gradient checkpointing (the recompute replays the compiled block).
    `recompute_budget` (training without block checkpointing): the fraction of its activations each compiled
    block's forward/backward partition keeps (torch._functorch.config.activation_memory_budget, process-wide, read
    when a graph compiles; None = 1, keep what the backward reads). `save_attention` (with `recompute_budget`):
    `keep_attention_outputs` for these graphs. `uncompile_blocks` undoes the compile."""
    if save_attention and recompute_budget is None:
        raise ValueError("save_attention applies to the partitioner's recompute budget: give recompute_budget")
    torch._functorch.config.activation_memory_budget = 1.0 if recompute_budget is None else float(recompute_budget)
    keep_attention_outputs(save_attention)
    for block in dit.transformer_blocks:
        block.compile()
    if ste is not None:
        for block in ste.ste_blocks:
            block.compile()


def uncompile_blocks(dit: torch.nn.Module, ste: torch.nn.Module | None = None) -> None:
    modules = list(dit.transformer_blocks) + (list(ste.ste_blocks) if ste is not None else [])
    for block in modules:
        block._compiled_call_impl = None  # what nn.Module.compile set
