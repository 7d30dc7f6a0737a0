"""The embedded demo's parts (issue 17): the analytic tiny VAE, the "fill" synthetic family, the zero output
projection (an untrained LBM edit is the identity), the evaluation's reference rows and the evaluation curve."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


def _blocks(n: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] made of flat 8×8 blocks."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, size // 8, size // 8, generator=g, dtype=torch.float64)
                                           * 2 - 1, scale_factor=8, mode="nearest")


def test_analytic_vae_loaded_from_the_tree_is_the_patch_colour_codec(tiny_pipe):
    """Loaded through the real loader: z = LATENT_SCALE · Q · (8×8 patch mean), and the decoder repeats the colour."""
    from diffsynth_edit.tiny_vae import LATENT_SCALE, hadamard_embedding

    vae = tiny_pipe.vae
    assert vae.z_dim == 16 and type(vae).__name__ == "TinyQwenImageVAE"
    x = _blocks() + 0.05 * torch.sin(torch.arange(64, dtype=torch.float64))  # not flat inside the blocks
    with torch.no_grad():
        z = vae.encode(x.float()).double()
        y = vae.decode(vae.encode(_blocks().float())).double()
    assert z.shape == (3, 16, 8, 8)
    f = torch.nn.functional.avg_pool2d(x, 8)
    want = LATENT_SCALE * torch.einsum("zc,bchw->bzhw", hadamard_embedding(), f)
    # float32 VAE, values of order LATENT_SCALE: a few float32 ulps of that scale
    assert torch.allclose(z, want, atol=1e-5 * LATENT_SCALE, rtol=0), (z - want).abs().max()
    assert torch.allclose(y, _blocks(), atol=1e-5, rtol=0), (y - _blocks()).abs().max()


def test_hadamard_embedding_is_orthonormal_and_exact():
    from diffsynth_edit.tiny_vae import hadamard_embedding

    q = hadamard_embedding()
    assert q.shape == (16, 3) and torch.equal(q.T @ q, torch.eye(3, dtype=torch.float64))
    assert set(q.abs().flatten().tolist()) == {0.25}


@pytest.mark.parametrize("size", [32, 64, 96])
def test_fill_family_is_on_the_vae_grid_and_untouched_outside(size):
    from diffsynth_edit.dataset.synthetic import COLORS
    from diffsynth_edit.dataset.synthetic_fill import WHITE, make_fill_pair

    for i in range(6):
        p = make_fill_pair(np.random.default_rng([5, i]), size)
        src, tgt = np.asarray(p.source, np.int16), np.asarray(p.target, np.int16)
        mask = np.asarray(p.mask) > 127
        ys, xs = np.nonzero(mask)
        assert ys.min() % 16 == 0 and xs.min() % 16 == 0 and (ys.max() + 1) % 16 == 0 and (xs.max() + 1) % 16 == 0
        assert mask.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # a full box
        assert 0.10 <= mask.mean() <= 0.40
        assert np.array_equal(src[~mask], tgt[~mask])
        colour = p.instruction.removeprefix("Fill the white box with ").removesuffix(".")
        # inside: white vs the named colour, up to the shared grain (σ 4, clipped at 0/255)
        assert abs(src[mask].mean(0) - np.array(WHITE)).max() < 3
        assert abs(tgt[mask].mean(0) - np.array(COLORS[colour])).max() < 3
        assert p.edit_type == "fill"


def test_fill_family_round_trip_is_above_28_db(tiny_pipe):
    from diffsynth_edit.dataset.synthetic_fill import make_fill_pair
    from diffsynth_edit.editing.eval_reference import vae_roundtrip
    from diffsynth_edit.editing.evaluate import psnr

    for i in range(4):
        p = make_fill_pair(np.random.default_rng([0, i]), 64)
        assert psnr(vae_roundtrip(tiny_pipe, p.target), p.target) >= 34.0  # σ-4 grain: ≈ 36 dB


def test_untrained_lbm_edit_returns_the_source(tmp_path):
    """With the default zero `proj_out`, a 1-step LBM edit's latents are the source's, bit for bit."""
    from diffsynth_edit.editing.editor import Editor, EditRequest, EditSettings
    from diffsynth_edit.encoding import vae_encode
    from diffsynth_edit.loading import ModelSources, load_pipeline
    from diffsynth_edit.tiny import write_tiny_model
    from safetensors.torch import load_file

    root = write_tiny_model(tmp_path / "tiny")
    sd = load_file(str(root / "Qwen/Qwen-Image-Edit-2511/transformer/diffusion_pytorch_model.safetensors"))
    assert not sd["proj_out.weight"].any() and not sd["proj_out.bias"].any()
    pipe = load_pipeline(ModelSources(variant="2511", model_root=root), torch_dtype=torch.float32)
    source = Image.fromarray(((_blocks(1)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = Editor(pipe, variant="2511", mode="bridge").edit(
        EditRequest(image=source, prompt="Fill the white box with red.", mask=mask),
        EditSettings(sampler="lbm", steps=1, cfg_scale=1.0))
    assert torch.equal(result.latents, vae_encode(pipe, [source])[0])
    assert np.array_equal(np.asarray(result.image), np.asarray(source))  # 8-px blocks: exact round trip


def test_reference_metrics_identity_and_round_trip():
    from diffsynth_edit.editing.eval_reference import format_table, psnr_table, reference_metrics, tile_caption
    from diffsynth_edit.editing.evaluate import PSNR_CAP_DB

    target = np.full((32, 32, 3), 100, np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    source = target.copy()
    source[mask] = 100 + 51  # 0.2 off inside: MSE 0.04 -> 13.98 dB
    roundtrip = target.copy()
    roundtrip[0, 0] = 100 + 255 // 5  # one pixel 0.2 off, outside the mask
    m = reference_metrics(Image.fromarray(source), Image.fromarray(target), mask, Image.fromarray(roundtrip))
    assert m["identity_psnr_in"] == pytest.approx(10 * np.log10(1 / 0.04))
    assert m["identity_psnr_out"] == PSNR_CAP_DB
    assert m["vae_psnr_in"] == PSNR_CAP_DB
    assert m["vae_psnr_out"] == pytest.approx(10 * np.log10((32 * 32 - 16 * 16) / 0.04))
    assert reference_metrics(Image.fromarray(source), Image.fromarray(target), None, None)["vae_psnr"] is None
    table = psnr_table({"psnr_in": 20.0, "psnr_out": 30.0, **m})
    assert table["identity"]["in"] == m["identity_psnr_in"] and table["edit"]["out"] == 30.0
    assert "edit 20.00/30.00" in format_table(table) and "identity edit 13.98/100.00" in format_table(table)
    assert tile_caption({"psnr_in": 20.04, "psnr_out": None}) == "in 20.0 / out - dB"


def test_grid_captions_add_a_text_line_under_each_row():
    from diffsynth_edit.imagegrid import make_grid

    im = Image.new("RGB", (16, 16), "red")
    plain = make_grid([[im, im]], cell=32)
    captioned = make_grid([[im, im]], cell=32, captions=[[None, "in 1.0 / out 2.0 dB"]])
    assert captioned.size == (plain.width, plain.height + 14)
    band = np.asarray(captioned)[4 + 32:4 + 32 + 14]
    assert (band[:, 4 + 32 + 4:] < 128).any() and not (band[:, :4 + 32] < 128).any()  # text under cell 2 only


def test_eval_curve_rows_are_replaced_from_a_resumed_step(tmp_path):
    from diffsynth_edit.training.eval_curve import latent_mask, record

    for step, v in ((10, 5.0), (20, 6.0), (30, 7.0), (20, 8.0)):  # the last: a run resumed at step 10
        png = record(tmp_path, step, {"psnr_in": v, "psnr_out": 30.0, "samples": 4})
    rows = (tmp_path / "eval_metrics.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in rows[1:]] == [["10", "", "5.0"], ["20", "", "8.0"]]
    assert png.is_file() and png.name == "eval_curve.png"
    m = torch.zeros(1, 4, 4)
    m[0, 1:3, 2] = 1.0
    m[0, 3, 3] = 0.25  # less than half covered: outside
    got = latent_mask(m, (32, 32))
    assert got.shape == (32, 32) and got.sum() == 2 * 64 and got[8:24, 16:24].all()
    assert latent_mask(torch.ones(1, 4, 4), (32, 32)) is None


def test_tiny_tokenizer_keeps_each_template_word_whole():
    """Every letters-only word of the tiny vocabulary is one token (the prefix-only merges left e.g. green as
    g·re·e·n and cyan as c·y·an, pieces shared with other words)."""
    from diffsynth_edit.tiny import TEMPLATE_WORDS, build_tokenizer

    tok = build_tokenizer()
    assert [w for w in TEMPLATE_WORDS if w.isalpha() and len(tok(w)["input_ids"]) != 1] == []


def test_tiny_text_encoder_rows_carry_their_token(tiny_pipe):
    """The row of the colour word in the text encoder's output depends on the colour, hardly on the image, and the
    rows after it hardly on the image either (token embeddings at unit scale). Measured on these two noise images:
    colour row red-vs-blue 11.1, image-vs-image 0.018 (RMS-normed rows); at transformers' std 0.02 it was 9.4 vs 0.70,
    and the last row 0.08 vs 0.63, i.e. every row carried the image."""
    from diffsynth_edit.encoding import encode_prompt

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    rows = {(c, i): encode_prompt(tiny_pipe, f"Fill the white box with {c}.", [im])[0][0].float()
            for c in ("red", "blue") for i, im in enumerate(images)}
    assert rows["red", 0].shape == rows["blue", 0].shape
    differs = ((rows["red", 0] - rows["blue", 0]).abs().amax(1) > 0).nonzero().flatten()
    k = int(differs[0])  # the colour word's row (rows before it cannot see it: causal encoder)

    def unit(r):
        return r / r.pow(2).mean().sqrt()

    between = (unit(rows["red", 0][k]) - unit(rows["blue", 0][k])).norm()
    within = (unit(rows["red", 0][k]) - unit(rows["red", 1][k])).norm()
    assert between > 100 * within, (float(between), float(within))
    last_image = (unit(rows["red", 0][-1]) - unit(rows["red", 1][-1])).norm()
    assert last_image < 0.1, float(last_image)
