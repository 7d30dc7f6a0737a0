"""Speed-ups that must not change results: the single-frame VAE convs, real-valued RoPE; fp8 (CUDA only) close."""
from __future__ import annotations

import types

import pytest
import torch
from diffsynth.models import qwen_image_dit
from diffsynth.models.qwen_image_vae import QwenImageCausalConv3d, QwenImageVAE

from diffsynth_edit import speedups
from numerics import FP32_REL, assert_close_scaled

VAE_REL = 1e-4  # float32 through a dozen conv layers, 2D vs 3D kernels


def _vae_pair():
    torch.manual_seed(0)
    ref = QwenImageVAE(base_dim=16, num_res_blocks=1).eval()
    fast = QwenImageVAE(base_dim=16, num_res_blocks=1).eval()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def test_single_frame_vae_matches_conv3d_encode_and_decode():
    ref, fast = _vae_pair()
    n = speedups.single_frame_vae(fast)
    convs = [m for m in fast.modules() if isinstance(m, QwenImageCausalConv3d)]
    # every conv but the temporal resampling ones (used only with a video feature cache) is patched
    assert n == sum(1 for m in convs if m.stride[0] == 1 and m._padding[4] == m.kernel_size[0] - 1) > 10
    assert n < len(convs)
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        lat_ref, lat_fast = ref.encode(x), fast.encode(x)
        assert lat_fast.shape == (2, 16, 8, 12)
        assert_close_scaled(lat_fast, lat_ref, VAE_REL)
        img_ref, img_fast = ref.decode(lat_ref), fast.decode(lat_ref)
        assert img_fast.shape == (2, 3, 64, 96)
        assert_close_scaled(img_fast, img_ref, VAE_REL)


def test_single_frame_vae_keeps_the_3d_path_for_videos():
    ref, fast = _vae_pair()
    speedups.single_frame_vae(fast)
    calls = []
    for m in fast.modules():
        if isinstance(m, QwenImageCausalConv3d) and isinstance(m.forward, types.MethodType) \
                and m.forward.__func__ is speedups._single_frame_conv:
            m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[2]))
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        assert_close_scaled(fast.encode_video(video), ref.encode_video(video), VAE_REL)
    assert calls and any(t > 1 for t in calls)  # multi-frame chunks went through the patched modules unchanged


def test_vision_attention_in_one_call_equals_per_window(tiny_sources):
    from PIL import Image
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    from diffsynth_edit import encoding
    from diffsynth_edit.loading import load_pipeline

    pipe = load_pipeline(tiny_sources, components=("text_encoder", "tokenizer", "processor"), device="cpu",
                         torch_dtype=torch.float32)
    model = pipe.text_encoder.model
    attn = [m for m in model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)]
    assert attn and all(m.forward.__func__ is speedups._vision_attention for m in attn)  # applied by the loader
    # two images of different grids: several windows per image, and a full-attention layer (per image)
    images = [Image.effect_noise((300, 200), 60).convert("RGB"), Image.effect_noise((256, 256), 40).convert("RGB"),
              Image.effect_noise((256, 256), 50).convert("RGB")]
    _, pv, grid = encoding.prompt_inputs(pipe, ["make it red"], images)
    with torch.no_grad():
        fast = encoding._image_embeds(model, pv, grid)
        for m in attn:
            del m.forward  # back to transformers' per-window loop
        reference = encoding._image_embeds(model, pv, grid)
    assert fast.shape == reference.shape and fast.shape[0] == int(grid.prod(dim=1).sum()) // 4
    assert_close_scaled(fast, reference, FP32_REL)


def test_vision_segment_plan_groups_by_length_once_per_tensor():
    cu = torch.tensor([0, 4, 8, 10, 14, 14], dtype=torch.int32)  # segments 4, 4, 2, 4 and an empty one
    plan = speedups._segment_plan(cu)
    assert speedups._segment_plan(cu) is plan  # kept on the tensor: no second host sync
    by_len = {length: (count, index.tolist()) for length, count, index in plan}
    assert by_len == {4: (3, [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 13]), 2: (1, [8, 9])}
    tiled = speedups._segment_plan(torch.tensor([0, 3, 6, 9]))
    assert tiled == [(3, 3, None)]  # equal segments covering everything: a reshape


def test_real_rope_equals_complex_rope():
    speedups.real_rope()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50, 16, dtype=torch.bfloat16)
    freqs = torch.polar(torch.ones(50, 8), torch.randn(50, 8))
    expected = speedups._original_rotary(x, freqs)
    assert torch.equal(qwen_image_dit.apply_rotary_emb_qwen(x, torch.view_as_real(freqs)), expected)
    assert torch.equal(qwen_image_dit.apply_rotary_emb_qwen(x, freqs), expected)  # complex: upstream's code
    assert torch.equal(speedups._real_rotary(x, torch.view_as_real(freqs)), expected)  # the compiled path's formula


def test_eager_rope_rotates_real_tables_with_upstreams_complex_code(monkeypatch):
    """On the GPU the real-arithmetic rotation rounds differently from upstream's complex multiply (bf16 output off by
    up to 0.09 over 60 blocks, bench/RESULTS.md); eager, the real tables go to upstream's code as complex numbers."""
    speedups.real_rope()
    seen = []
    original = speedups._original_rotary
    monkeypatch.setattr(speedups, "_original_rotary", lambda x, f: seen.append(f) or original(x, f))
    freqs = torch.polar(torch.ones(1, 1, 50, 8), torch.randn(1, 1, 50, 8))
    x = torch.randn(2, 3, 50, 16)
    qwen_image_dit.apply_rotary_emb_qwen(x, torch.view_as_real(freqs))
    assert len(seen) == 1 and seen[0].is_complex() and torch.equal(seen[0], freqs)


def test_rope_gradients_agree_between_the_eager_and_the_compiled_formula():
    """The STE blends the tables with a trainable gate, so the rotation's gradient reaches the tables: the complex
    (eager) and the real (compiled) formula give the same gradients (float64 tables; x is rotated in fp32)."""
    speedups.real_rope()
    torch.manual_seed(0)
    grads = []
    weights = torch.randn(2, 3, 50, 16, dtype=torch.float64)
    for fn in (speedups._rotary, speedups._real_rotary):
        x = torch.randn(2, 3, 50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        angles = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        f = torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).clone().requires_grad_()
        (fn(x, f) * weights).sum().backward()
        grads.append((x.grad, f.grad))
    (gx_eager, gf_eager), (gx_real, gf_real) = grads
    assert torch.allclose(gf_eager, gf_real, rtol=0, atol=1e-12 * gf_real.abs().max().item())
    assert torch.allclose(gx_eager, gx_real, rtol=0, atol=1e-6 * gx_real.abs().max().item())  # fp32 rounding of x


def test_fp8_refuses_without_a_capable_gpu():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has fp8 tensor cores")
    with pytest.raises(RuntimeError, match="fp8"):
        speedups.quantize_dit_fp8(torch.nn.Module())


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="fp8 matmuls need Ada/Hopper")
def test_fp8_linear_is_close_and_keeps_hot_loaded_lora():
    from diffsynth.core.vram.layers import LoRAHotLoadMixin

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 512).cuda().bfloat16()
    x = torch.randn(3, 7, 256, device="cuda", dtype=torch.bfloat16)
    ref = lin(x).float()
    speedups.quantize_linear_fp8(lin)
    out = lin(x).float()
    assert out.shape == (3, 7, 512) and lin.weight.numel() == 0
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    lin.lora_A_weights = [torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)]
    lin.lora_B_weights = [torch.randn(512, 4, device="cuda", dtype=torch.bfloat16)]
    lin.lora_merger = None
    lin.lora_forward = types.MethodType(LoRAHotLoadMixin.lora_forward, lin)
    delta = (x @ lin.lora_A_weights[0].T @ lin.lora_B_weights[0].T).float()
    torch.testing.assert_close(lin(x).float() - out, delta, rtol=0.02, atol=0.05)


def test_the_token_linear_names_are_the_dit_blocks():
    """`DIT_TOKEN_LINEARS` (what the front ends check `--fp8-keep-bf16` against before a model loads) is what
    `quantize_dit_fp8` finds in a block of the real block class."""
    from diffsynth_edit.tiny import TinyQwenImageDiT

    assert tuple(speedups.token_linear_names(TinyQwenImageDiT())) == speedups.DIT_TOKEN_LINEARS
    speedups.check_keep_bf16(["img_mlp.net.0.proj", "attn.to_q"])
    with pytest.raises(ValueError, match=r"'attn.to_out' is not a token linear of a DiT block; choose from attn.to_q"):
        speedups.check_keep_bf16(["attn.to_q", "attn.to_out"])


def test_fp8_fast_accumulation_reaches_the_matmul(monkeypatch):
    """The fast-accumulation switch is what `_scaled_mm` receives (the kernel itself needs Hopper: the call is
    recorded here, and the GPU bench measures its speed and error)."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
    for lin in block:
        speedups.quantize_linear_fp8(lin)
    seen = []
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, **kw: seen.append(kw["use_fast_accum"]) or
                        torch.zeros(a.shape[0], b.shape[1]))
    x = torch.randn(5, 32)
    block[0](x)
    assert seen == [False]
    assert speedups.set_fp8_fast_accum(block, True) == 2
    block[0](x), block[1](torch.randn(5, 16))
    assert seen == [False, True, True]
    assert speedups.set_fp8_fast_accum(torch.nn.Linear(4, 4), True) == 0  # a plain linear is left alone
