"""The quickstart's method works (issue 17), on a smaller budget: the embedded tiny model (analytic VAE, zero output
projection) learns the synthetic "fill" edit, judged on held-out samples against the evaluation's reference rows.

Targets (blending off): the 1-step LBM edit is within 1 dB of the VAE round trip outside the mask and at least
3 dB above the identity edit inside it; the 20-step SFT (bridge mode) edit is above the identity edit inside it.
Every stage runs through the same entry points as scripts/quickstart.sh, in-process.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
COUNT, TEST = 80, 8  # samples generated, of which held out
SFT_STEPS, LBM_STEPS = 20, 1200  # LBM: the quickstart's own LBM preset, for 1200 steps (not 2000)


def _cli(main, argv: list[str]) -> None:
    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """tiny model -> fill data -> dataset JSON -> caches -> SFT -> LBM (from scratch), as the quickstart does."""
    from diffsynth_edit.cache.cli import main_cache
    from diffsynth_edit.dataset.cli import main as data_main
    from diffsynth_edit.editing.cli import main as edit_main
    from diffsynth_edit.training.cli import main_train

    root = tmp_path_factory.mktemp("quickstart")
    models, qs, runs = root / "models", root / "data", root / "train"
    _cli(edit_main, ["tiny-model", "--out", models])
    _cli(data_main, ["sample-data", "--out", qs / "raw", "--count", COUNT, "--size", 64, "--family", "fill"])
    _cli(data_main, ["build", "--source-dir", qs / "raw/source", "--target-dir", qs / "raw/target",
                     "--mask-dir", qs / "raw/mask", "--instructions", qs / "raw/edit_types.csv",
                     "--out", qs / "dataset.json", "--test-fraction", TEST / COUNT, "--seed", 0])
    for split in ("train", "test"):
        _cli(main_cache, ["--dataset", qs / f"dataset_{split}.json", "--cache-dir", qs / f"cache-{split}",
                          "--model-root", models, "--variant", 2511, "--dtype", "fp32", "--progress", "false"])
    common = ["--preset", REPO / "configs/tiny_quickstart.toml", "--cache-dir", qs / "cache-train",
              "--model-root", models, "--output-dir", runs, "--wandb", "false", "--val-cache-dir", qs / "cache-test"]
    _cli(main_train, [*common, "--run-name", "sft", "--max-steps", SFT_STEPS, "--save-every", SFT_STEPS,
                      "--validate-every", SFT_STEPS // 2])
    sft = sorted((runs / "sft").glob("step-*.safetensors"))[-1]
    lbm_common = [*common[2:], "--preset", REPO / "configs/tiny_quickstart_lbm.toml"]  # from scratch, as the quickstart
    _cli(main_train, [*lbm_common, "--run-name", "lbm", "--max-steps", LBM_STEPS, "--save-every", LBM_STEPS,
                      "--validate-every", LBM_STEPS // 2])
    lbm = sorted((runs / "lbm").glob("step-*.safetensors"))[-1]
    evals = {}
    for name, ckpt, flags in (("sft", sft, ["--steps", 20, "--cfg", 2]),
                              ("lbm", lbm, ["--sampler", "lbm", "--steps", 1, "--cfg", 1])):
        out = runs / name / "eval"
        _cli(edit_main, ["evaluate", "--dataset", qs / "dataset_test.json", "--model-root", models,
                         "--checkpoint", ckpt, *flags, "--out", out, "--progress", "false", "--grid-cell", 64])
        evals[name] = json.loads((out / "metrics.json").read_text())
    return runs, evals


def test_vae_round_trip_reconstructs_the_demo_images(quickstart):
    _, evals = quickstart
    psnr = evals["lbm"]["psnr"]
    assert psnr["vae"]["all"] >= 28.0, psnr
    assert psnr["identity"]["out"] == 100.0  # the source is exact outside the mask (the PSNR cap)


def test_lbm_one_step_edit_beats_the_identity_by_3_db_inside_the_mask(quickstart):
    _, evals = quickstart
    psnr = evals["lbm"]["psnr"]
    assert psnr["edit"]["in"] >= psnr["identity"]["in"] + 3.0, psnr


def test_lbm_one_step_edit_keeps_the_background_within_1_db_of_the_vae_ceiling(quickstart):
    """Issue 17's target. At this budget (80 samples, rank 32, 1200 steps) the gap to the VAE's 36.0 dB was 0.85,
    0.76, 0.91, 0.15, 3.54 dB for seeds 1-5 (seed 5 confused the colours: blue boxes came out brown, purple ones
    blue) and 0.32 dB for seed 42, the seed this test trains with; with rank 8 and 300 steps 2.2, 0.6, 2.6, 0.8 dB
    (seeds 1-4). The error outside the mask is mostly one colour offset over the whole background; with a single
    fill colour (no colour word to read) the edit's own error outside was 41-43 dB at rank 8 / 300 steps (README)."""
    _, evals = quickstart
    psnr = evals["lbm"]["psnr"]
    assert psnr["edit"]["out"] >= psnr["vae"]["out"] - 1.0, psnr


def test_sft_bridge_edit_beats_the_identity_inside_the_mask(quickstart):
    _, evals = quickstart
    psnr = evals["sft"]["psnr"]
    assert psnr["edit"]["in"] > psnr["identity"]["in"], psnr


def test_evaluation_files_show_references_and_the_curve(quickstart):
    from PIL import Image

    runs, evals = quickstart
    m = evals["lbm"]
    sample = m["samples"][0]
    for key in ("psnr_in", "psnr_out", "identity_psnr_in", "identity_psnr_out", "vae_psnr_in", "vae_psnr_out"):
        assert isinstance(sample[key], float), key
    assert m["psnr"]["edit"]["in"] == pytest.approx(np.mean([s["psnr_in"] for s in m["samples"]]))
    header = (runs / "lbm/eval/metrics.csv").read_text().splitlines()[0].split(",")
    assert {"identity_psnr_in", "vae_psnr_out"} <= set(header)
    with Image.open(runs / "lbm/eval/grid.png") as grid:  # 4 columns of 64 px, one row per test sample + captions
        assert grid.width == 4 * (64 + 4) + 4 and grid.height == 18 + TEST * (64 + 14 + 4) + 4
    for run, steps in (("sft", SFT_STEPS), ("lbm", LBM_STEPS)):
        rows = (runs / run / "eval_metrics.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == [str(steps // 2), str(steps)]
        assert (runs / run / "eval_curve.png").stat().st_size > 0
