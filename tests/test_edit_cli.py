"""edit_images.py: edit / evaluate / tiny-model on a 2-sample dataset with the tiny model, resume, and the metric
functions on known arrays."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from diffsynth_edit.editing import evaluate as ev
from diffsynth_edit.editing.cli import main as cli_main

FAST = ["--steps", "2", "--cfg", "2", "--device", "cpu", "--progress", "false"]


def _env():
    return dict(os.environ, DIFFSYNTH_SKIP_DOWNLOAD="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, str(REPO_ROOT / "edit_images.py"), *map(str, args)], capture_output=True,
                          text=True, env=_env(), cwd=str(REPO_ROOT), timeout=timeout)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Two 64x64 samples: one with a mask and an extra reference, one without a mask; relative paths."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.RandomState(0)
    for d in ("src", "tgt", "mask", "ref"):
        (root / d).mkdir()
    for i in range(2):
        src = rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)
        tgt = src.copy()
        tgt[16:40, 8:48] = [200, 30, 30]
        Image.fromarray(src).save(root / "src" / f"s{i}.png")
        Image.fromarray(tgt).save(root / "tgt" / f"t{i}.png")
        m = np.zeros((64, 64), np.uint8)
        m[16:40, 8:48] = 255
        Image.fromarray(m).save(root / "mask" / f"m{i}.png")
    Image.fromarray(rng.randint(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "ref" / "r0.png")
    records = [
        {"prompt": "Picture 1 is the image to modify. Paint the box red.", "image": "tgt/t0.png",
         "edit_image": ["src/s0.png", "ref/r0.png"], "back_mask": "mask/m0.png", "edit_type": "Replace",
         "id": "sample/0"},
        {"prompt": "Picture 1 is the image to modify. Paint it red.", "image": "tgt/t1.png",
         "edit_image": ["src/s1.png"], "id": "s1"},
    ]
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


# ---- metrics on known arrays ---------------------------------------------------------------------------------------
def test_identical_images_mse_zero_psnr_capped():
    a = np.random.RandomState(0).randint(0, 256, (8, 8, 3), dtype=np.uint8)
    assert ev.mse(a, a) == 0.0 and ev.mae(a, a) == 0.0
    assert ev.psnr(a, a) == ev.PSNR_CAP_DB == 100.0
    row = ev.region_metrics(a, a, None)
    assert row["psnr"] == row["psnr_in"] == 100.0 and row["mse_out"] is None and row["mask_fraction"] == 1.0


def test_known_offset():
    a = np.full((4, 6, 3), 100, np.uint8)
    b = np.full((4, 6, 3), 151, np.uint8)  # offset 51/255 = 0.2
    assert ev.mse(a, b) == pytest.approx(0.04)
    assert ev.mae(a, b) == pytest.approx(0.2)
    assert ev.psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.04))  # 13.979 dB
    assert ev.psnr_from_mse(0.01) == pytest.approx(20.0)
    assert ev.psnr_from_mse(1e-12) == 100.0  # capped


def test_region_metrics_in_and_out():
    out = np.zeros((4, 4, 3), np.uint8)
    tgt = np.zeros((4, 4, 3), np.uint8)
    tgt[:2] = 255  # top half differs by 1.0
    tgt[2:, :, 0] = 51  # bottom half differs by 0.2 in one channel
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    row = ev.region_metrics(out, tgt, mask)
    assert row["mse_in"] == pytest.approx(1.0) and row["mae_in"] == pytest.approx(1.0)
    assert row["psnr_in"] == pytest.approx(0.0)
    assert row["mse_out"] == pytest.approx(0.04 / 3) and row["mae_out"] == pytest.approx(0.2 / 3)
    assert row["mse"] == pytest.approx((1.0 + 0.04 / 3) / 2)
    assert row["mask_fraction"] == 0.5
    empty = ev.region_metrics(out, tgt, np.zeros((4, 4), bool))
    assert empty["mse_in"] is None and empty["psnr_in"] is None and empty["mse_out"] == pytest.approx(row["mse"])
    with pytest.raises(ValueError, match="differ in size"):
        ev.region_metrics(out, tgt[:2], None)


def test_pil_and_array_inputs_agree():
    a = np.random.RandomState(1).randint(0, 256, (8, 8, 3), dtype=np.uint8)
    b = np.random.RandomState(2).randint(0, 256, (8, 8, 3), dtype=np.uint8)
    assert ev.mse(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(ev.mse(a, b))
    assert ev.mse(a, b) == pytest.approx(np.mean(((a / 255.0) - (b / 255.0)) ** 2))


def test_align_to_output_resizes_target_and_binarises_mask():
    out = Image.new("RGB", (32, 16))
    tgt = Image.new("RGB", (64, 32), (10, 20, 30))
    mask = Image.new("L", (64, 32), 0)
    mask.paste(200, (0, 0, 32, 32))
    mask.paste(100, (32, 0, 64, 32))  # below the threshold
    t, m, notes = ev.align_to_output(out, tgt, mask)
    assert t.size == (32, 16) and m.shape == (16, 32) and m.dtype == bool
    assert m[:, :16].all() and not m[:, 16:].any()
    assert notes and "64x32" in notes[0]


def test_mean_metrics_skips_missing():
    rows = [{"a": 1.0, "b": None}, {"a": 3.0, "b": 2.0}, {"a": float("nan")}]
    assert ev.mean_metrics(rows, ["a", "b", "c"]) == {"a": 2.0, "b": 2.0, "c": None}


def test_lpips_unavailable_is_reported(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    ok, reason = ev.lpips_status()
    assert not ok and "not installed" in reason


# ---- CLI -----------------------------------------------------------------------------------------------------------
def test_edit_subprocess_then_resume(dataset, tiny_root, tmp_path):
    out = tmp_path / "edit"
    proc = _run_cli("edit", "--dataset", dataset, "--model-root", tiny_root, "--out", out, "--mode", "bridge",
                    *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "edited 2, skipped 0, failed 0 of 2" in proc.stdout
    names = {"sample_0", "s1"}
    for n in names:
        img = Image.open(out / f"{n}.png")
        assert img.size == (64, 64) and img.mode == "RGB"
        assert (out / f"{n}_sub.png").is_file()
        info = json.loads((out / f"{n}.json").read_text())
        assert info["settings"]["mode"] == "bridge" and info["settings"]["steps"] == 2
    assert Image.open(out / "sample_0_sub.png").size == (48, 32)  # mask x [8,48) y [16,40) -> 16-aligned box
    assert Image.open(out / "s1_sub.png").size == (64, 64)  # no mask: whole image
    assert json.loads((out / "run.json").read_text())["command"] == "edit"
    assert not list(out.glob(".*.tmp"))

    # resume: nothing is redone, outputs untouched (in-process to save a second interpreter start)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "s1.png").unlink()
    logs = []
    rc = cli_main(["edit", "--dataset", str(dataset), "--model-root", str(tiny_root), "--out", str(out),
                   "--mode", "bridge", *FAST])
    assert rc == 0
    assert (out / "s1.png").is_file()
    for name, stamp in stamps.items():
        if not name.startswith("s1"):  # s1's image was deleted, so s1 is redone (its sub image too)
            assert (out / name).stat().st_mtime_ns == stamp, f"{name} was rewritten"
    import diffsynth_edit.editing.cli as edit_cli

    rc = edit_cli.run_edit(edit_cli.parse_config(edit_cli.EditConfig, [
        "--dataset", str(dataset), "--model-root", str(tiny_root), "--out", str(out), "--mode", "bridge", *FAST]),
        log=logs.append)
    assert rc == 0 and any("skipping 2" in m for m in logs) and any("edited 0, skipped 2" in m for m in logs)


def test_edit_outputs_are_deterministic_and_match_the_editor(dataset, tiny_root, tiny_pipe, tmp_path):
    """The CLI output equals a direct Editor call with the same settings (same seed, plain mode)."""
    from diffsynth_edit.editing.editor import Editor, EditRequest, EditSettings

    out = tmp_path / "one"
    src = dataset.parent / "src" / "s0.png"
    rc = cli_main(["edit", "--image", str(src), "--mask", str(dataset.parent / "mask" / "m0.png"), "--prompt", "x",
                   "--model-root", str(tiny_root), "--out", str(out), "--seed", "3", *FAST])
    assert rc == 0
    assert (out / "s0.png").is_file() and not (out / "s0_sub.png").exists()
    direct = Editor(tiny_pipe, variant="2511").edit(
        EditRequest(image=Image.open(src), prompt="x", mask=Image.open(dataset.parent / "mask" / "m0.png")),
        EditSettings(steps=2, cfg_scale=2.0, seed=3))
    assert np.array_equal(np.asarray(Image.open(out / "s0.png")), np.asarray(direct.image))


def test_evaluate(dataset, tiny_root, tmp_path):
    """In-process (the subprocess entry point is covered by the edit test; one interpreter start is enough)."""
    out = tmp_path / "eval"
    rc = cli_main(["evaluate", "--dataset", str(dataset), "--model-root", str(tiny_root), "--out", str(out),
                   "--mode", "bridge", "--grid-cell", "64", *FAST])
    assert rc == 0
    assert (out / "images" / "sample_0.png").is_file() and (out / "images" / "s1_sub.png").is_file()
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["count"] == 2 and summary["evaluated"] == 2 and summary["failed"] == []
    assert summary["lpips"].startswith("unavailable") or summary["lpips"].startswith("lpips")
    for k in ("mse", "mae", "psnr", "mse_in", "mae_in", "psnr_in", "mse_out", "mae_out", "psnr_out"):
        assert math.isfinite(summary["mean"][k]), k
    s0, s1 = summary["samples"]
    assert s0["id"] == "sample/0" and 0 < s0["mask_fraction"] < 1 and s0["mse_out"] is not None
    assert s1["mask_fraction"] == 1.0 and s1["mse_out"] is None  # no mask: whole image is "in"
    # the metrics are the formulas applied to the files on disk
    output = np.asarray(Image.open(out / "images" / "sample_0.png").convert("RGB"), dtype=np.float64) / 255
    target = np.asarray(Image.open(dataset.parent / "tgt" / "t0.png").convert("RGB"), dtype=np.float64) / 255
    m = np.asarray(Image.open(dataset.parent / "mask" / "m0.png")) > 127
    assert s0["mse"] == pytest.approx(np.mean((output - target) ** 2))
    assert s0["mae_in"] == pytest.approx(np.mean(np.abs(output - target)[m]))
    assert s0["mse_out"] == pytest.approx(np.mean(((output - target) ** 2)[~m]))
    assert s0["psnr"] == pytest.approx(10 * math.log10(1 / s0["mse"]))
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["sample/0", "s1", "mean"]
    assert float(rows[0]["psnr"]) == pytest.approx(s0["psnr"], rel=1e-6)
    assert rows[1]["mse_out"] == ""
    assert float(rows[2]["mse"]) == pytest.approx((s0["mse"] + s1["mse"]) / 2, rel=1e-6)
    grid = Image.open(out / "grid.png")
    assert grid.width > 4 * 64 and grid.height > 2 * 64
    # re-evaluation reuses the edited images
    logs = []
    import diffsynth_edit.editing.cli as edit_cli

    cfg = edit_cli.parse_config(edit_cli.EvaluateConfig, ["--dataset", str(dataset), "--model-root", str(tiny_root),
                                                          "--out", str(out), "--mode", "bridge", *FAST])
    assert edit_cli.run_evaluate(cfg, log=logs.append) == 0
    assert any("reused 2" in m for m in logs)
    assert json.loads((out / "metrics.json").read_text())["mean"] == summary["mean"]


def test_outputs_reused_only_with_the_same_settings_and_checkpoint(dataset, tiny_root, tiny_pipe, tmp_path):
    """A re-run into the same --out redoes samples made with another seed/steps or another checkpoint file (even at
    the same path) and says so; unchanged settings reuse them."""
    import diffsynth_edit.editing.cli as edit_cli
    from diffsynth_edit.app.testing import make_test_checkpoint

    out = tmp_path / "eval"
    base = ["--dataset", str(dataset), "--model-root", str(tiny_root), "--out", str(out), "--grid-rows", "0",
            "--cfg", "1", "--device", "cpu", "--progress", "false", "--lpips", "false"]

    def evaluate(*extra):
        logs = []
        cfg = edit_cli.parse_config(edit_cli.EvaluateConfig, [*base, *map(str, extra)])
        assert edit_cli.run_evaluate(cfg, log=logs.append) == 0, logs
        return logs, json.loads((out / "metrics.json").read_text())["mean"]["psnr"]

    logs, psnr_a = evaluate("--seed", 1, "--steps", 2)
    assert any("edited 2, reused 0" in m for m in logs)
    logs, psnr_b = evaluate("--seed", 99, "--steps", 3)
    assert any("edited 2, reused 0" in m for m in logs), logs
    assert any("redoing 2 sample(s)" in m and "changed: seed, steps" in m for m in logs), logs
    assert psnr_b != psnr_a
    sidecar = json.loads((out / "images" / "s1.json").read_text())
    assert sidecar["settings"]["seed"] == 99 and sidecar["settings"]["steps"] == 3 and len(sidecar["fingerprint"]) == 64
    logs, psnr_c = evaluate("--seed", 99, "--steps", 3)
    assert any("edited 0, reused 2" in m for m in logs) and psnr_c == psnr_b
    # a checkpoint, then another checkpoint written to the same path
    ckpt = tmp_path / "ckpt" / "step.safetensors"
    make_test_checkpoint(tiny_pipe.dit, ckpt, seed=0)
    logs, _ = evaluate("--seed", 99, "--steps", 3, "--checkpoint", ckpt)
    assert any("edited 2, reused 0" in m for m in logs) and any("changed: checkpoint" in m for m in logs), logs
    first = (out / "images" / "s1.png").read_bytes()
    make_test_checkpoint(tiny_pipe.dit, ckpt, seed=1)
    os.utime(ckpt, ns=(1, 1))  # another file, whatever the clock's resolution
    logs, _ = evaluate("--seed", 99, "--steps", 3, "--checkpoint", ckpt)
    assert any("edited 2, reused 0" in m for m in logs), logs
    assert (out / "images" / "s1.png").read_bytes() != first


def test_evaluate_reports_missing_target(dataset, tiny_root, tmp_path):
    import diffsynth_edit.editing.cli as edit_cli

    records = json.loads(dataset.read_text())
    records[1]["image"] = "tgt/missing.png"
    bad = dataset.parent / "bad.json"
    bad.write_text(json.dumps(records))
    out = tmp_path / "eval"
    logs = []
    cfg = edit_cli.parse_config(edit_cli.EvaluateConfig, ["--dataset", str(bad), "--model-root", str(tiny_root),
                                                          "--out", str(out), "--grid-rows", "0", *FAST])
    assert edit_cli.run_evaluate(cfg, log=logs.append) == 1
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["failed"] == ["s1"] and summary["evaluated"] == 1
    assert "missing.png" in summary["samples"][1]["error"]
    assert not (out / "grid.png").exists()


def test_tiny_model_command(tmp_path):
    rc = cli_main(["tiny-model", "--out", str(tmp_path / "tiny")])
    assert rc == 0 and (tmp_path / "tiny" / "tiny_models.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["edit", "--out", "x"], "--dataset"),
    (["edit", "--image", "a.png", "--out", "x"], "--prompt"),
    (["edit", "--dataset", "d.json", "--image", "a.png", "--prompt", "p", "--out", "x"], "not both"),
    (["edit", "--dataset", "d.json"], "--out"),
    (["edit", "--dataset", "d.json", "--out", "x", "--steps", "0"], "steps"),
    (["edit", "--dataset", "d.json", "--out", "x", "--sampler", "ddim"], "sampler"),
    (["edit", "--dataset", "d.json", "--out", "x", "--cfg", "0.5"], "cfg_scale"),
    (["edit", "--dataset", "d.json", "--out", "x", "--variant", "2512"], "variant"),
    (["edit", "--dataset", "d.json", "--out", "x", "--fp8-fast-accum"], "--fp8-fast-accum changes how the fp8 "
                                                                        "matmuls accumulate: it needs --fp8"),
    (["edit", "--dataset", "d.json", "--out", "x", "--fp8-keep-bf16", "img_mlp.net.0.proj"],
     "--fp8-keep-bf16 names DiT linears to leave out of fp8: it needs --fp8"),
    (["edit", "--dataset", "d.json", "--out", "x", "--fp8", "--fp8-keep-bf16", "img_mlp.net.2,img_mlp.net.0"],
     "--fp8-keep-bf16: fp8 keep-bf16: 'img_mlp.net.0' is not a token linear of a DiT block; choose from attn.to_q,"),
    (["evaluate", "--out", "x"], "--dataset"),
    (["tiny-model"], "--out"),
])
def test_bad_arguments(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        cli_main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_weights_and_bad_checkpoint_fail_cleanly(dataset, tiny_root, tmp_path, capsys):
    rc = cli_main(["edit", "--dataset", str(dataset), "--model-root", str(tmp_path / "none"), "--out",
                   str(tmp_path / "o"), *FAST])
    assert rc == 2 and "dit weights" in capsys.readouterr().err
    rc = cli_main(["edit", "--dataset", str(dataset), "--model-root", str(tiny_root), "--out", str(tmp_path / "o"),
                   "--checkpoint", str(tmp_path / "x.pt"), *FAST])
    assert rc == 2 and "only .safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--compile", "--fp8"])
def test_speed_flags_need_cuda(dataset, tiny_root, tmp_path, flag):
    with pytest.raises(SystemExit, match="--compile and --fp8 need a CUDA device.*on cpu"):
        cli_main(["edit", "--dataset", str(dataset), "--model-root", str(tiny_root), "--out", str(tmp_path / "o"),
                  "--device", "cpu", flag, *FAST])
    assert not list((tmp_path / "o").rglob("*.png"))  # stopped before any edit


def test_usage_without_command(capsys):
    assert cli_main([]) == 2
    assert "edit_images.py edit" in capsys.readouterr().err
