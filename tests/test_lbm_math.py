"""Latent Bridge Matching: interpolant, target, grid sampling and the sampler, checked exactly or statistically."""
import math

import pytest
import torch

from diffsynth_edit.editing.sampling import euler_step, lbm_grid
from diffsynth_edit.training.losses import (bridge_interpolate, draw_from_grid, lbm_predicted_target, lbm_target,
                                            make_lbm_inputs)


@pytest.mark.parametrize("sigma_b", [0.0, 0.01, 0.5, 2.0])
def test_bridge_endpoints_exact(sigma_b):
    g = torch.Generator().manual_seed(0)
    src, tgt, eps = (torch.randn(2, 16, 8, 8, generator=g) for _ in range(3))
    assert torch.equal(bridge_interpolate(src, tgt, torch.ones(2), sigma_b, eps), src)
    assert torch.equal(bridge_interpolate(src, tgt, torch.zeros(2), sigma_b, eps), tgt)


def test_bridge_marginal_mean_and_variance():
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    s, sigma_b, n = 0.3, 0.5, 20000
    eps = torch.randn(n, 4, 4, 4, generator=g)
    x = bridge_interpolate(src.expand(n, -1, -1, -1), tgt.expand(n, -1, -1, -1), torch.full((n,), s), sigma_b, eps)
    mean = s * src + (1 - s) * tgt
    var = sigma_b ** 2 * s * (1 - s)
    assert torch.allclose(x.mean(0), mean[0], atol=4 * math.sqrt(var / n) + 1e-6)
    assert abs(float(x.var(0).mean()) - var) < 0.03 * var


def test_target_and_reconstruction():
    g = torch.Generator().manual_seed(2)
    src, tgt, eps = (torch.randn(3, 16, 4, 4, generator=g) for _ in range(3))
    s = torch.tensor([0.25, 0.5, 1.0])
    x = bridge_interpolate(src, tgt, s, 0.1, eps)
    v = lbm_target(src, tgt)
    assert torch.equal(v, src - tgt)
    noise_term = 0.1 * torch.sqrt(s * (1 - s)).view(-1, 1, 1, 1) * eps
    assert torch.allclose(lbm_predicted_target(x, v, s), tgt + noise_term, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_oracle_predictor_reaches_target(steps):
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    grid = lbm_grid(steps).tolist()
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == steps + 1
    x = src.clone()
    for s, s_next in zip(grid[:-1], grid[1:]):
        x = euler_step(x, src - tgt, s, s_next)  # oracle v = source − target
    assert torch.allclose(x, tgt, atol=1e-5)


def test_grid_is_unshifted_training_grid():
    assert lbm_grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_grid_sampler_follows_probabilities():
    grid, probs, n = [1.0, 0.75, 0.5, 0.25], [0.7, 0.1, 0.1, 0.1], 8000
    g = torch.Generator().manual_seed(4)
    draws = [draw_from_grid(grid, probs, g) for _ in range(n)]
    counts = [draws.count(v) for v in grid]
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))
    assert chi2 < 16.27  # p = 0.001 for 3 degrees of freedom
    assert set(draws) <= set(grid)


def test_dit_receives_1000_s_and_sub_bridge_from_white():
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    batch = {"input_latents": torch.randn(2, 16, 8, 8), "edit_latents": [torch.randn(2, 16, 8, 8)],
             "sub_input_latents": torch.randn(2, 16, 4, 4), "sub_noise": torch.randn(2, 16, 4, 4), "ids": ["a", "b"]}
    nb = make_lbm_inputs(batch, gens, True, [1.0, 0.5], None, 0.0)
    assert torch.allclose(nb.timestep, 1000 * nb.s)
    for i, s in enumerate(nb.s.tolist()):
        expect_main = s * batch["edit_latents"][0][i] + (1 - s) * batch["input_latents"][i]
        expect_sub = s * batch["sub_noise"][i] + (1 - s) * batch["sub_input_latents"][i]
        assert torch.allclose(nb.latents[i], expect_main, atol=1e-6)
        assert torch.allclose(nb.sub_latents[i], expect_sub, atol=1e-6)
    assert torch.allclose(nb.target, batch["edit_latents"][0] - batch["input_latents"])
    assert torch.allclose(nb.sub_target, batch["sub_noise"] - batch["sub_input_latents"])


def test_lbm_refuses_source_of_other_size():
    gens = [torch.Generator().manual_seed(0)]
    batch = {"input_latents": torch.randn(1, 16, 8, 8), "edit_latents": [torch.randn(1, 16, 8, 6)],
             "sub_input_latents": torch.randn(1, 16, 4, 4), "sub_noise": torch.randn(1, 16, 4, 4), "ids": ["x"]}
    with pytest.raises(ValueError, match="same size"):
        make_lbm_inputs(batch, gens, True, [1.0], None, 0.0)
