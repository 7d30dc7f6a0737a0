"""Batched / prefix-shared prompt encoding and uint8 VAE input equal the editor's separate calls (tiny model, fp32)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from numerics import FP32_REL, assert_close_scaled


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(48, 64), (80, 40), (32, 32)][:n]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


PROMPTS = ["Picture 1 is the image to modify. Paint the box red.", ""]


@pytest.mark.parametrize("n_images", [1, 2])
def test_negative_shares_the_prompt_prefix(tiny_pipe, n_images):
    """Full encodings of prompt and empty prompt agree on the common token prefix (causal encoder); the prefix length
    comes from the token ids, not from comparing floats."""
    from diffsynth_edit.encoding import DROP_IDX, common_prefix_len, encode_prompt, prompt_inputs

    images = _images(n_images)
    (emb, _), (nemb, _) = (encode_prompt(tiny_pipe, p, images) for p in PROMPTS)
    ids, _, _ = prompt_inputs(tiny_pipe, PROMPTS, images)
    prefix = common_prefix_len(ids[0], ids[1]) - DROP_IDX
    assert 0 < prefix < nemb.shape[1] < emb.shape[1]
    assert nemb.shape[1] - prefix < 32  # only the closing template tokens are not shared
    assert_close_scaled(nemb[:, :prefix], emb[:, :prefix], FP32_REL)
    assert not torch.allclose(nemb[:, prefix], emb[:, prefix])  # they do differ after it


@pytest.mark.parametrize("n_images", [1, 2])
def test_encode_prompts_equals_separate_calls(tiny_pipe, n_images):
    from diffsynth_edit.encoding import encode_prompt, encode_prompts

    images = _images(n_images)
    prompts = [*PROMPTS, "a much longer prompt " * 5]
    got = encode_prompts(tiny_pipe, prompts, images)
    for p, (emb, mask) in zip(prompts, got):
        want, wmask = encode_prompt(tiny_pipe, p, images)
        assert emb.shape == want.shape and emb.dtype == want.dtype
        assert_close_scaled(emb, want, FP32_REL)
        assert torch.equal(mask, wmask)


@pytest.mark.parametrize("prompt,negative", [(PROMPTS[0], ""), ("", ""), ("abc", "abd"), ("x", "a longer negative")])
def test_encode_prompt_pair_equals_separate_calls(tiny_pipe, prompt, negative):
    from diffsynth_edit.encoding import encode_prompt, encode_prompt_pair

    images = _images(2)
    pair = encode_prompt_pair(tiny_pipe, prompt, images, negative)
    emb, mask = encode_prompt(tiny_pipe, prompt, images)
    nemb, nmask = encode_prompt(tiny_pipe, negative, images)
    assert_close_scaled(pair.emb, emb, FP32_REL)
    assert torch.equal(pair.mask, mask)
    assert pair.nega_emb.shape == nemb.shape
    assert_close_scaled(pair.nega_emb, nemb, FP32_REL)
    assert torch.equal(pair.nega_mask, nmask)
    assert pair.nega_tail.shape[1] < 32 and pair.nega_prefix > 0


def test_vae_encode_uint8_equals_vae_encode(tiny_pipe):
    from diffsynth_edit.encoding import image_to_uint8, vae_encode, vae_encode_uint8

    images = [_images(1)[0]] * 2
    want = torch.cat(vae_encode(tiny_pipe, images))
    got = vae_encode_uint8(tiny_pipe, [image_to_uint8(im) for im in images])
    assert_close_scaled(got, want, FP32_REL)


def test_encode_prompt_pairs_batches_samples_with_their_own_images(tiny_pipe):
    """Several samples (different prompts, image counts and sizes) in one call equal each sample's separate
    `encode_prompt` calls; each sample's images land in its own rows."""
    from diffsynth_edit.encoding import encode_prompt, encode_prompt_pairs, prompt_inputs

    images = _images(3)
    samples = [(PROMPTS[0], images[:1]), ("turn the sky green " * 4, images[1:3]), ("x", images[2:3])]
    pairs = encode_prompt_pairs(tiny_pipe, [prompt_inputs(tiny_pipe, [p, ""], ims) for p, ims in samples])
    assert len(pairs) == len(samples)
    for (prompt, ims), pair in zip(samples, pairs):
        emb, mask = encode_prompt(tiny_pipe, prompt, ims)
        nemb, nmask = encode_prompt(tiny_pipe, "", ims)
        assert pair.emb.shape == emb.shape and torch.equal(pair.mask, mask)
        assert_close_scaled(pair.emb, emb, FP32_REL)
        assert pair.nega_prefix > 0 and pair.nega_tail.shape[1] < 32
        assert pair.nega_emb.shape == nemb.shape and torch.equal(pair.nega_mask, nmask)
        assert_close_scaled(pair.nega_emb, nemb, FP32_REL)
    # the first sample alone gives the same result: batching does not leak other samples' images into its rows
    alone = encode_prompt_pairs(tiny_pipe, [prompt_inputs(tiny_pipe, [samples[0][0], ""], samples[0][1])])[0]
    assert_close_scaled(alone.emb, pairs[0].emb, FP32_REL)


def test_text_encoder_runs_attention_without_cudnn(tiny_pipe, monkeypatch):
    """Every prompt-encoding path (one prompt, a pair on a KV cache, a batch of prompts, a padded batch of pairs)
    runs the text encoder with cuDNN's attention switched off (it builds a plan per new length); the backends are
    as before once the call returns, also after an error."""
    from diffsynth_edit.encoding import (encode_prompt, encode_prompt_pair, encode_prompt_pairs, encode_prompts,
                                         prompt_inputs)

    model, seen = tiny_pipe.text_encoder.model, []
    real_forward = model.forward

    def recording(*a, **kw):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real_forward(*a, **kw)

    monkeypatch.setattr(model, "forward", recording)
    ims = _images(1)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    encode_prompt(tiny_pipe, "one prompt", ims)
    encode_prompt_pair(tiny_pipe, "a prompt and its negative", ims)
    encode_prompts(tiny_pipe, ["same", "same"], ims)
    encode_prompt_pairs(tiny_pipe, [prompt_inputs(tiny_pipe, ["a long prompt " * 5, ""], ims)])
    assert len(seen) >= 4 and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setattr(model, "forward", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        encode_prompt(tiny_pipe, "one prompt", ims)
    assert torch.backends.cuda.cudnn_sdp_enabled()
