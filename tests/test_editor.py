"""The editor on the tiny float32 pipeline: determinism, bridge/plain outputs, samplers, blending, batched CFG,
input conversions and refusals."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_edit.editing.editor import (Editor, EditInputError, EditRequest, EditSettings, fit_image, prepare_mask,
                                            to_rgb)
from numerics import assert_close_scaled

SAMPLE_REL = 1e-4  # float32, batch 2 vs 1 in every step, amplified by CFG (x4) over the steps

FAST = dict(steps=2, cfg_scale=2.0)
CHEAP = dict(steps=2, cfg_scale=1.0)  # one DiT call per step


def _image(w=64, h=64, seed=0, mode="RGB") -> Image.Image:
    arr = np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _mask(w=64, h=64, box=(18, 20, 50, 30)) -> Image.Image:
    """White rectangle [x1, x2) x [y1, y2) given as PIL box (x1, y1, x2, y2)."""
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


def _request(**kw) -> EditRequest:
    base = dict(image=_image(), prompt="turn the square red", mask=_mask())
    base.update(kw)
    return EditRequest(**base)


@pytest.fixture()
def bridge_editor(editor):
    editor.ste = editor.ste_template()
    return editor


# ---- determinism and outputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["plain", "bridge"])
def test_same_seed_same_bytes_other_seed_differs(editor, mode):
    if mode == "bridge":
        editor.ste = editor.ste_template()
    ra, rb, rc = (editor.edit(_request(), EditSettings(seed=s, **FAST)) for s in (7, 7, 8))
    (a, sa), (b, sb), (c, sc) = ra, rb, rc
    assert torch.isfinite(ra.latents).all()
    assert torch.equal(ra.latents, rb.latents) and not torch.equal(ra.latents, rc.latents)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    if mode == "bridge":
        assert sa.tobytes() == sb.tobytes() and sa.tobytes() != sc.tobytes()


def test_seed_does_not_depend_on_global_rng(editor):
    torch.manual_seed(1)
    a = editor.edit(_request(), EditSettings(seed=3, **FAST)).image
    torch.manual_seed(2)
    np.random.seed(2)
    b = editor.edit(_request(), EditSettings(seed=3, **FAST)).image
    assert a.tobytes() == b.tobytes()


def test_bridge_mode_returns_image_and_sub_image(bridge_editor):
    result = bridge_editor.edit(_request(), EditSettings(**FAST))
    image, sub_image = result
    assert isinstance(image, Image.Image) and image.size == (64, 64) and image.mode == "RGB"
    assert isinstance(sub_image, Image.Image)
    # mask pixels x in [18, 50), y in [20, 30) -> 16-aligned box x [16, 64), y [16, 32)
    assert sub_image.size == (48, 16)
    assert result.settings["mode"] == "bridge"
    assert result.settings["box"] == [1, 2, 1, 4]
    assert result.settings["zero_cond_t"] is True and result.settings["variant"] == "2511"


def test_plain_mode_returns_no_sub_image(editor):
    assert editor.ste is None and not editor.bridge
    image, sub_image = editor.edit(_request(), EditSettings(**FAST))
    assert image.size == (64, 64)
    assert sub_image is None


def test_forced_bridge_mode_without_ste(tiny_pipe):
    ed = Editor(tiny_pipe, variant="2511", mode="bridge")
    image, sub_image = ed.edit(_request(), EditSettings(**FAST))
    assert sub_image is not None and sub_image.size == (48, 16)


@pytest.mark.parametrize("box, size", [((0, 0, 1, 1), (16, 16)), ((15, 15, 17, 17), (32, 32)),
                                       ((0, 0, 64, 64), (64, 64)), ((40, 3, 64, 60), (32, 64))])
def test_sub_image_size_is_16_aligned_bbox(bridge_editor, box, size):
    _, sub_image = bridge_editor.edit(_request(mask=_mask(box=box)), EditSettings(**CHEAP))
    assert sub_image.size == size


def test_no_mask_means_whole_image(bridge_editor):
    _, sub_image = bridge_editor.edit(_request(mask=None, image=_image(96, 64)), EditSettings(**CHEAP))
    assert sub_image.size == (96, 64)


def test_soft_mask_binarised_at_127(bridge_editor):
    m = Image.new("L", (64, 64), 127)  # not above the threshold
    m.paste(128, (40, 40, 48, 48))
    prep = bridge_editor.prepare(_request(mask=m), EditSettings())
    assert prep.box.to_subyx() == (2, 3, 2, 3)


# ---- samplers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lbm_sampler_runs(bridge_editor, steps):
    calls = []
    result = bridge_editor.edit(_request(), EditSettings(sampler="lbm", steps=steps, cfg_scale=1.0),
                                progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, steps) for i in range(1, steps + 1)]
    assert result.image.size == (64, 64) and result.sub_image.size == (48, 16)
    assert torch.isfinite(result.latents).all() and torch.isfinite(result.sub_latents).all()


def test_lbm_plain_mode_runs(editor):
    image, sub_image = editor.edit(_request(), EditSettings(sampler="lbm", steps=2, cfg_scale=1.0))
    assert image.size == (64, 64) and sub_image is None


def test_flow_sampler_one_step_is_finite(editor):
    """EditSettings accepts flow steps=1, but `flow_sigmas(1, ...)` is [nan, 0] (the Qwen schedule's terminal
    shift divides by 1 − σ_last = 0 when the only σ is 1), so the one-step edit comes out NaN (a black image)."""
    from diffsynth_edit.editing.sampling import flow_sigmas

    EditSettings(steps=1).validate()  # accepted ...
    assert torch.isfinite(flow_sigmas(1, 64, 64)).all(), flow_sigmas(1, 64, 64)
    result = editor.edit(_request(), EditSettings(steps=1, cfg_scale=1.0))  # ... so it must work
    assert torch.isfinite(result.latents).all()


@pytest.mark.parametrize("steps", [2, 3, 40])
def test_flow_sigmas_finite_and_decreasing(steps):
    from diffsynth_edit.editing.sampling import flow_sigmas

    s = flow_sigmas(steps, 1024, 1024)
    assert s.shape == (steps + 1,) and torch.isfinite(s).all()
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())


def test_flow_sampler_step_count(editor):
    calls = []
    editor.edit(_request(), EditSettings(steps=3, cfg_scale=1.0), progress=lambda i, n: calls.append(i))
    assert calls == [1, 2, 3]


# ---- blending ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["flow", "lbm"])
@pytest.mark.parametrize("mode", ["plain", "bridge"])
def test_blend_alpha_one_keeps_outside_equal_to_source(editor, sampler, mode):
    if mode == "bridge":
        editor.ste = editor.ste_template()
    settings = EditSettings(sampler=sampler, steps=2, cfg_scale=2.0, blend_alpha=1.0)
    request = _request()
    prep = editor.prepare(request, settings)
    result = editor.edit(request, settings)
    assert torch.isfinite(result.latents).all()
    outside = (prep.mask_latent == 0).expand_as(result.latents)
    assert outside.any() and not outside.all()
    source = prep.edit_latents[0].float()
    assert torch.equal(result.latents[outside], source[outside])
    # without blending the outside is the model's own (random tiny model: far from the source)
    free = editor.edit(request, EditSettings(sampler=sampler, steps=2, cfg_scale=2.0, blend_alpha=0.0))
    assert not torch.equal(free.latents[outside], source[outside])


def test_blending_without_mask_is_a_no_op(editor):
    a = editor.edit(_request(mask=None), EditSettings(blend_alpha=1.0, **FAST))
    b = editor.edit(_request(mask=None), EditSettings(blend_alpha=0.0, **FAST))
    assert torch.equal(a.latents, b.latents)


# ---- CFG -----------------------------------------------------------------------------------------------------------
def _spy_batches(monkeypatch):
    import diffsynth_edit.editing.editor as editor_module

    sizes = []
    real = editor_module.bridge_forward

    def spy(dit, inputs, **kw):
        sizes.append(inputs.latents.shape[0])
        return real(dit, inputs, **kw)

    monkeypatch.setattr(editor_module, "bridge_forward", spy)
    return sizes


def _random_gate_ste(editor):
    ste = editor.ste_template()
    torch.manual_seed(0)
    for head in ste.heads:
        torch.nn.init.normal_(head.weight, std=0.05)
    return ste.eval()


@pytest.mark.parametrize("mode", ["plain", "bridge"])
def test_batched_cfg_equals_sequential_cfg(editor, monkeypatch, mode):
    """Equal prompt lengths: one batch-2 DiT call per step; it must equal the two batch-1 calls."""
    if mode == "bridge":
        editor.ste = _random_gate_ste(editor)
    prep = editor.prepare(_request(), EditSettings())
    g = torch.Generator().manual_seed(1)
    prep.nega_emb = torch.randn(prep.prompt_emb.shape, generator=g)  # another prompt of the same length
    prep.nega_mask = prep.prompt_mask.clone()
    sizes = _spy_batches(monkeypatch)
    a = editor.sample(prep, EditSettings(steps=2, cfg_scale=4.0, batch_cfg=True))
    assert sizes == [2, 2]
    sizes.clear()
    b = editor.sample(prep, EditSettings(steps=2, cfg_scale=4.0, batch_cfg=False))
    assert sizes == [1, 1, 1, 1]
    assert_close_scaled(a[0], b[0], SAMPLE_REL)
    if mode == "bridge":
        assert_close_scaled(a[1], b[1], SAMPLE_REL)


def test_cfg_with_prompts_of_different_lengths(editor, monkeypatch):
    """The usual case (empty negative prompt): batch_cfg on or off gives the same edit."""
    editor.ste = _random_gate_ste(editor)
    request = _request(prompt="a much longer instruction so that the two prompts differ in length")
    a = editor.edit(request, EditSettings(steps=2, cfg_scale=4.0, batch_cfg=True))
    b = editor.edit(request, EditSettings(steps=2, cfg_scale=4.0, batch_cfg=False))
    assert_close_scaled(a.latents, b.latents, SAMPLE_REL)
    assert_close_scaled(a.sub_latents, b.sub_latents, SAMPLE_REL)


def test_cfg_one_skips_negative(editor):
    prep = editor.prepare(_request(), EditSettings())
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v1, _ = editor.predict(prep, x, None, 500.0, 1.0)
        v2, _ = editor.predict(prep, x, None, 500.0, 1.0, batch_cfg=False)
        v4, _ = editor.predict(prep, x, None, 500.0, 4.0)
    assert torch.equal(v1, v2)
    assert not torch.allclose(v1, v4)


# ---- input conversions ---------------------------------------------------------------------------------------------
def test_no_image_refused(editor):
    with pytest.raises(EditInputError, match="no input image"):
        editor.edit(_request(image=None), EditSettings(**FAST))


def test_non_image_refused(editor):
    with pytest.raises(EditInputError, match="PIL image"):
        editor.edit(_request(image=np.zeros((64, 64, 3), np.uint8)), EditSettings(**FAST))


def test_empty_mask_refused(editor):
    with pytest.raises(EditInputError, match="mask is empty"):
        editor.edit(_request(mask=Image.new("L", (64, 64), 0)), EditSettings(**FAST))
    with pytest.raises(EditInputError, match="mask is empty"):
        editor.edit(_request(mask=Image.new("L", (64, 64), 127)), EditSettings(**FAST))


def test_mask_same_aspect_resized_with_notice(bridge_editor):
    result = bridge_editor.edit(_request(mask=_mask(32, 32, box=(9, 10, 25, 15))), EditSettings(**FAST))
    assert any("mask resized from 32x32 to 64x64" in n for n in result.notices), result.notices
    assert result.sub_image.size == (48, 16)


def test_mask_other_aspect_refused_naming_sizes(editor):
    with pytest.raises(EditInputError) as info:
        editor.edit(_request(mask=_mask(64, 32, box=(0, 0, 10, 10))), EditSettings(**FAST))
    assert "64x32" in str(info.value) and "64x64" in str(info.value)


def test_rgb_mask_and_rgba_mask_accepted():
    rgb = _mask().convert("RGB")
    m, note = prepare_mask(rgb, (64, 64))
    assert m.mode == "L" and note is None and np.asarray(m).max() == 255
    alpha = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    alpha.paste((0, 0, 0, 255), (0, 0, 16, 16))
    m, _ = prepare_mask(alpha, (64, 64))
    assert np.asarray(m)[:16, :16].all() and not np.asarray(m)[16:, 16:].any()


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 4, 8))
    out = to_rgb(rgba)
    assert out.mode == "RGB"
    assert out.getpixel((6, 2)) == (255, 255, 255)
    assert out.getpixel((1, 2)) == (0, 0, 255)


def test_greyscale_palette_and_16bit_converted():
    grey = Image.new("L", (8, 8), 100)
    assert to_rgb(grey).getpixel((0, 0)) == (100, 100, 100)
    pal = Image.new("RGB", (8, 8), (0, 204, 51)).convert("P")  # a web-palette colour, kept exactly
    assert pal.mode == "P" and to_rgb(pal).getpixel((0, 0)) == (0, 204, 51)
    pal_t = pal.copy()
    pal_t.info["transparency"] = pal_t.getpixel((0, 0))
    assert to_rgb(pal_t).getpixel((0, 0)) == (255, 255, 255)
    arr16 = np.full((8, 8), 65535, dtype=np.uint16)
    arr16[:, :4] = 32768
    im16 = Image.fromarray(arr16)
    assert im16.mode.startswith("I;16")
    out = to_rgb(im16)
    assert out.mode == "RGB" and out.getpixel((6, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((0, 0))
    assert r == g == b and abs(r - 128) <= 1  # 16-bit scaled to 8-bit (v * 255 / 65535)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "I;16", "CMYK"])
def test_edit_accepts_other_image_modes(editor, mode):
    if mode == "I;16":
        img = Image.fromarray((np.random.RandomState(0).rand(64, 64) * 65535).astype(np.uint16))
    else:
        img = _image(mode=mode)
    image, _ = editor.edit(_request(image=img), EditSettings(**CHEAP))
    assert image.mode == "RGB" and image.size == (64, 64)


def test_very_wide_image_scaled_with_notice(editor):
    wide = Image.new("RGB", (10000, 800), (30, 60, 90))
    result = editor.edit(_request(image=wide, mask=None), EditSettings(**CHEAP, max_pixels=16384))
    w, h = result.image.size
    assert w * h <= 16384 and w % 16 == 0 and h % 16 == 0
    assert (w, h) == (448, 32)
    assert any("10000x800" in n and "448x32" in n for n in result.notices), result.notices


def test_very_wide_image_with_its_own_mask(editor):
    """A mask of exactly the input image's size must follow the image when it is scaled down. 16-px flooring
    changes the aspect ratio (10000x800 -> 448x32 is 12.5 -> 14), so the mask must be checked against the
    original image size, not against the already-resized one."""
    wide = Image.new("RGB", (10000, 800), (30, 60, 90))
    mask = Image.new("L", (10000, 800), 0)
    mask.paste(255, (5000, 100, 6000, 700))
    result = editor.edit(_request(image=wide, mask=mask), EditSettings(**CHEAP, max_pixels=16384))
    assert result.image.size == (448, 32)
    assert any("10000x800" in n for n in result.notices), result.notices


def test_large_image_default_limit(editor):
    img, note = fit_image(Image.new("RGB", (2048, 1536)), 1024 * 1024)
    assert img.size[0] * img.size[1] <= 1024 * 1024 and img.size[0] % 16 == 0 and img.size[1] % 16 == 0
    assert "2048x1536" in note
    same, note = fit_image(Image.new("RGB", (64, 48)), 1024 * 1024)
    assert same.size == (64, 48) and note is None


def test_unaligned_small_image_is_floored_to_16(editor):
    result = editor.edit(_request(image=_image(70, 50), mask=None), EditSettings(**CHEAP))
    assert result.image.size == (64, 48)


@pytest.mark.parametrize("size", [(1700, 100), (100, 1700)])
def test_extreme_aspect_ratio_refused(editor, size):
    with pytest.raises(EditInputError, match="aspect ratio"):
        editor.edit(_request(image=Image.new("RGB", size), mask=None), EditSettings(**FAST))


# ---- settings ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps"),
    (dict(steps=-3), "steps"),
    (dict(sampler="ddim"), "sampler"),
    (dict(cfg_scale=0.5), "cfg_scale"),
    (dict(sampler="lbm", steps=9), "steps"),
    (dict(blend_alpha=1.5), "blend_alpha"),
    (dict(blend_alpha=-0.1), "blend_alpha"),
    (dict(max_pixels=100), "max_pixels"),
])
def test_bad_settings_refused(editor, kw, match):
    with pytest.raises(EditInputError, match=match):
        EditSettings(**kw).validate()
    with pytest.raises(EditInputError, match=match):
        editor.edit(_request(), EditSettings(**kw))


def test_default_settings_valid():
    EditSettings().validate()
    s = EditSettings()
    assert s.sampler == "flow" and s.steps == 40 and s.cfg_scale == 4.0 and s.blend_alpha == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the VAE's side stream exists on CUDA only")
def test_cuda_side_stream_vae_gives_the_same_edit(tiny_sources):
    """On CUDA the VAE encode runs on a second stream beside the text encoder: the prepared latents and a bridge LBM
    edit must equal the same editor's run without the side stream (same kernels), repeatedly (no read of freed or
    unfinished memory), and agree with the CPU run up to TF32/kernel differences."""
    from diffsynth_edit.loading import load_pipeline

    cpu = Editor(load_pipeline(tiny_sources, torch_dtype=torch.float32), variant="2511")
    gpu = Editor(load_pipeline(tiny_sources, device="cuda", torch_dtype=torch.float32), variant="2511")
    cpu.ste = cpu.ste_template()
    gpu.ste = copy.deepcopy(cpu.ste).cuda()
    settings = EditSettings(sampler="lbm", steps=2, cfg_scale=1.0)
    side = [gpu.edit(_request(), settings).latents.cpu() for _ in range(3)]
    assert gpu._vae_stream() is not None
    gpu._vae_stream = lambda: None
    plain = gpu.edit(_request(), settings).latents.cpu()
    for latents in side:
        torch.testing.assert_close(latents, plain, rtol=1e-6, atol=1e-6)
    want = cpu.edit(_request(), settings).latents
    torch.testing.assert_close(plain, want, rtol=2e-2, atol=2e-2)


def test_speed_up_compiles_each_block_and_resets_a_training_budget(tiny_sources):
    """`speed_up(compile_blocks=True)` compiles through `speedups.compile_blocks`: every DiT block, and the
    partitioner's memory budget a training run may have set in this process goes back to 1 (keep what is needed)."""
    from diffsynth_edit.loading import load_pipeline

    ed = Editor(load_pipeline(tiny_sources, torch_dtype=torch.float32), variant="2511")
    with torch._functorch.config.patch(activation_memory_budget=0.3):  # pytest's monkeypatch deletes config entries
        ed.speed_up(compile_blocks=True)
        budget = torch._functorch.config.activation_memory_budget
    assert ed.compiled and all(b._compiled_call_impl is not None for b in ed.pipe.dit.transformer_blocks)
    assert budget == 1.0


def test_speed_up_fp8_fast_accum_reaches_every_fp8_linear(tiny_sources, monkeypatch):
    """`speed_up(fp8=True, fp8_fast_accum=True)` quantises the blocks with fast accumulation on; a later call that
    names only `compile_blocks` leaves it as it is; `fp8_fast_accum=False` turns it off; fast accumulation without
    fp8 is refused. (fp8 quantisation checks for an fp8 GPU: the check is stood in for; the weights are quantised
    for real, on the CPU.)"""
    from diffsynth_edit.loading import load_pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    ed = Editor(load_pipeline(tiny_sources, torch_dtype=torch.float32), variant="2511")
    with pytest.raises(ValueError, match="needs fp8=True"):
        ed.speed_up(fp8_fast_accum=True)
    assert not ed.fp8 and not ed.fp8_fast_accum

    def flags():
        return [m.fp8_fast_accum for m in ed.pipe.dit.modules() if hasattr(m, "fp8_weight")]

    ed.speed_up(fp8=True, fp8_fast_accum=True)
    assert ed.fp8 and ed.fp8_fast_accum and len(flags()) > 0 and all(flags())
    monkeypatch.setattr(Editor, "_compile_ste", lambda self: None)
    monkeypatch.setattr("diffsynth_edit.editing.editor.compile_dit_blocks", lambda dit, ste: None)
    ed.speed_up(compile_blocks=True)
    assert ed.compiled and ed.fp8_fast_accum and all(flags())
    ed.speed_up(fp8_fast_accum=False)
    assert not ed.fp8_fast_accum and not any(flags())


def test_speed_up_fp8_keep_bf16_leaves_the_named_linears_in_bf16(tiny_sources, monkeypatch):
    """`fp8_keep_bf16` leaves the named block linears as they were in every block, quantises the other token
    linears, and is recorded in the edit's info; it needs fp8, names must be block linears, and an fp8 editor cannot
    change it. (The fp8 GPU check is stood in for; the weights are quantised for real, on the CPU.)"""
    from diffsynth_edit.loading import load_pipeline
    from diffsynth_edit.speedups import DIT_TOKEN_LINEARS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    ed = Editor(load_pipeline(tiny_sources, torch_dtype=torch.float32), variant="2511")
    blocks = ed.pipe.dit.transformer_blocks
    kept = ["img_mlp.net.0.proj", "attn.to_q"]
    weights = [b.get_submodule(n).weight.clone() for b in blocks for n in kept]
    with pytest.raises(ValueError, match="needs fp8=True"):
        ed.speed_up(fp8_keep_bf16=kept)
    with pytest.raises(ValueError, match="'img_mlp.net.0' is not a token linear"):
        ed.speed_up(fp8=True, fp8_keep_bf16=["img_mlp.net.0"])
    assert not ed.fp8 and not any(hasattr(m, "fp8_weight") for m in ed.pipe.dit.modules())
    ed.speed_up(fp8=True, fp8_keep_bf16=kept)
    assert ed.fp8 and ed.fp8_keep_bf16 == tuple(kept)
    for b in blocks:
        for n in DIT_TOKEN_LINEARS:
            assert hasattr(b.get_submodule(n), "fp8_weight") == (n not in kept), n
    assert all(torch.equal(w, b.get_submodule(n).weight) for w, (b, n) in
               zip(weights, [(b, n) for b in blocks for n in kept]))
    assert ed.edit(_request(), EditSettings(**FAST)).settings["fp8_keep_bf16"] == kept
    ed.speed_up(fp8=True, fp8_keep_bf16=kept)  # the same again: nothing to do
    with pytest.raises(ValueError, match="cannot change: build a new editor"):
        ed.speed_up(fp8=True)
