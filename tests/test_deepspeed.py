"""DeepSpeed ZeRO-2 and ZeRO-3 through the real launcher (one CPU process): the trap checks pass with the shipped
configs, the run warm-starts, trains with finite losses and saves whole LoRA + STE tensors, and a run cut after step 2
and resumed ends with the same weights as an uninterrupted one (ZeRO optimizer state: fp32 masters and the client
optimizer's state, per rank)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import cache_dir, make_cfg, run  # noqa: F401  (module-scoped cache fixture)

REPO = Path(__file__).resolve().parents[1]
N_STE = 45  # 3 tiny blocks x 15 STE tensors


def launch(config: Path, cache: Path, tiny_root: Path, out: Path, run_name: str, *extra: str) -> str:
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "1",
           str(REPO / "train_2511.py"), "train", "--cache-dir", str(cache), "--model-root", str(tiny_root),
           "--output-dir", str(out), "--run-name", run_name, "--lora-rank", "4", "--optimizer", "prodigy",
           "--d0", "1e-3", "--gradient-accumulation", "2", "--save-every", "1", "--keep-last", "0",
           "--wandb", "false", "--gradient-checkpointing", "false", *extra]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(extra)}\n" + res.stdout[-3000:] + res.stderr[-5000:]
    return log


def zero3_test_config(tmp_path: Path) -> Path:
    """The shipped ZeRO-3 configs with one change: no parameter persists unpartitioned (the shipped threshold of 1e6
    elements would keep every tensor of the tiny model whole, so nothing would have to be gathered to save)."""
    ds = json.loads((REPO / "configs" / "ds_zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.0
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds_zero3.json").write_text(json.dumps(ds))
    text = (REPO / "configs" / "accelerate_zero3.yaml").read_text()
    assert "configs/ds_zero3.json" in text
    (tmp_path / "accelerate_zero3.yaml").write_text(text.replace("configs/ds_zero3.json",
                                                                 str(tmp_path / "ds_zero3.json")))
    return tmp_path / "accelerate_zero3.yaml"


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def plain_checkpoint(cache_dir, tiny_root, tmp_path_factory):  # noqa: F811
    """A plain (no DeepSpeed, no DDP) single-process run: the reference shapes, and the warm start of the ZeRO runs
    (so LoRA B is non-zero from the first step)."""
    _, path = run(make_cfg(cache_dir, tiny_root, tmp_path_factory.mktemp("plain"), optimizer="adamw",
                           learning_rate=1e-3, max_steps=1))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stage,trainable_dtype", [("zero2", "fp32"), ("zero3", "bf16")])
def test_zero_trains_saves_and_resumes(stage, trainable_dtype, cache_dir, tiny_root, plain_checkpoint,  # noqa: F811
                                       tmp_path):
    config = (REPO / "configs" / "accelerate_zero2.yaml" if stage == "zero2" else zero3_test_config(tmp_path))
    common = ("--init-from", str(plain_checkpoint), "--trainable-dtype", trainable_dtype)
    full_log = launch(config, cache_dir, tiny_root, tmp_path, "full", "--max-steps", "3", *common)
    launch(config, cache_dir, tiny_root, tmp_path, "cut", "--max-steps", "2", *common)
    resumed_log = launch(config, cache_dir, tiny_root, tmp_path, "cut", "--max-steps", "3", "--resume", *common)

    assert "each rank estimates Prodigy's step size" in full_log
    assert ("runs with use_schedulefree=False" in full_log) == (stage == "zero3")
    assert "warm start from" in full_log
    rows = metrics(tmp_path / "full")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r["loss"]) > 0, r
        assert math.isfinite(float(r["grad_norm"])) and float(r["grad_norm"]) > 0, r  # DeepSpeed's own norm

    # Whole (gathered) tensors, with the keys and shapes of a plain run and the run's trainable dtype.
    reference = load_file(str(plain_checkpoint))
    full = {i: load_file(str(tmp_path / "full" / f"step-00000{i}.safetensors")) for i in (1, 2, 3)}
    assert {k: tuple(v.shape) for k, v in full[3].items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert all(v.numel() > 0 for v in full[3].values())
    assert sum(k.startswith("pipe.ste.") for k in full[3]) == N_STE
    assert any(".lora_B." in k for k in full[3])
    dtype = torch.float32 if trainable_dtype == "fp32" else torch.bfloat16
    assert {v.dtype for v in full[3].values()} == {dtype}

    # Each step moves the LoRA and the STE.
    step_change = max_diff(full[3], full[2])
    assert step_change > 1e-4
    assert max_diff({k: v for k, v in full[2].items() if k.startswith("pipe.ste.")},
                    {k: v for k, v in full[1].items() if k.startswith("pipe.ste.")}) > 0

    # The cut run is the same run up to step 2; the resumed one continues the step count and ends where the
    # uninterrupted run ends (the fp32 masters and the client optimizer's state came back, not only the weights).
    assert "resuming at step 2" in resumed_log
    assert [r["step"] for r in metrics(tmp_path / "cut")] == ["1", "2", "3"]
    cut = {i: load_file(str(tmp_path / "cut" / f"step-00000{i}.safetensors")) for i in (2, 3)}
    assert max_diff(cut[2], full[2]) < step_change * 1e-3
    assert max_diff(cut[3], full[3]) < step_change * 1e-3
    state = json.loads((tmp_path / "cut" / "state" / "trainer.json").read_text())
    assert state["step"] == 3 and state["deepspeed"] == {"stage": int(stage[-1]), "world_size": 1}
    assert (tmp_path / "cut" / "state" / "zero-rank00000.pt").is_file()

    # That state holds a per-rank ZeRO optimizer state: a run without DeepSpeed may not resume from it.
    from diffsynth_edit.training.faults import TrainingError

    with pytest.raises(TrainingError, match=r"written under DeepSpeed .*stage.*this run is without DeepSpeed"):
        run(make_cfg(cache_dir, tiny_root, tmp_path, run_name="cut", resume=True, max_steps=4))


def test_uses_zero3_reads_accelerate_configs_and_their_deepspeed_json(tmp_path):
    """The scripts' ZeRO-3 test (`uses_zero3` in scripts/env.sh): the shipped configs, an inline `zero_stage: 3`, and a
    config whose DeepSpeed JSON says stage 3 under a name that does not."""
    inline = tmp_path / "inline.yaml"
    inline.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n  offload: none\n")
    inline_2 = tmp_path / "inline2.yaml"
    inline_2.write_text("deepspeed_config:\n  zero_stage: 2\n")
    renamed = tmp_path / "big.yaml"
    renamed.write_text((REPO / "configs" / "accelerate_zero3.yaml").read_text().replace(
        "configs/ds_zero3.json", f'"{REPO / "configs" / "ds_zero3.json"}"'))
    expected = {REPO / "configs" / "accelerate_ddp.yaml": False, REPO / "configs" / "accelerate_zero2.yaml": False,
                REPO / "configs" / "accelerate_zero3.yaml": True, inline: True, inline_2: False, renamed: True}
    for config, zero3 in expected.items():
        res = subprocess.run(["bash", "-c", 'source scripts/env.sh && uses_zero3 "$1"', "-", str(config)], cwd=REPO,
                             capture_output=True, text=True)
        assert (res.returncode == 0) == zero3, (config, res.returncode, res.stderr)


@pytest.mark.slow
def test_lbm_script_under_zero3_runs_the_compiling_preset_uncompiled(cache_dir, tiny_root, tmp_path):  # noqa: F811
    """`scripts/Qwen-Image-Edit-LBM.sh` with a ZeRO-3 accelerate config: the LBM preset compiles the DiT blocks, which
    ZeRO-3 refuses, so the script turns compilation (and the recompute budget made for it) off, says so, and the run
    trains and saves."""
    config = zero3_test_config(tmp_path)
    env = dict(os.environ, PYTHON=sys.executable, MODEL_ROOT=str(tiny_root), CACHE_PATH=str(cache_dir),
               OUTPUT_PATH=str(tmp_path / "out"), RUN_NAME="lbm", NUM_GPUS="1", ACCELERATE_CONFIG=str(config),
               DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", str(REPO / "scripts" / "Qwen-Image-Edit-LBM.sh"), "--max-steps", "1",
                          "--lora-rank", "4", "--gradient-accumulation", "1", "--wandb", "false",
                          "--validate-every", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-5000:]
    assert "== ZeRO-3: the DiT blocks run uncompiled (--compile-blocks false --recompute-budget none " in log
    assert (tmp_path / "out" / "lbm" / "step-000001.safetensors").is_file()
    config_used = json.loads((tmp_path / "out" / "lbm" / "config.json").read_text())
    assert config_used["objective"] == "lbm" and config_used["compile_blocks"] is False
    assert config_used["recompute_budget"] is None and config_used["lora_rank"] == 4

