"""Two CPU processes (gloo) through the real launcher, `accelerate launch --num_processes 2`, with the shipped DDP,
ZeRO-2 and ZeRO-3 configs:

- the learning rate of every optimizer step equals the single-process schedule (accelerate used to step it once per
  process: a cosine over 100 steps reached 0 at step 50 under 2 processes);
- DDP and ZeRO-2 runs of the tiny model (batch 1 x accumulation 2 x 2 processes) log the losses and learning rates of
  a single-process run with the same global batch (batch 1 x accumulation 4: the same samples and noise per step) and
  end with its LoRA/STE weights, within the tolerances stated below; a run killed (SIGKILL) after step 3 and resumed
  ends with the uninterrupted run's weights;
- ProdigyPlusScheduleFree saves its evaluation weights under ZeRO-2 (the saved tensors are the eval view, which
  differs from the train view); under ZeRO-3 (schedule-free off) the saved tensors are the trained ones and the
  checkpoint's metadata says "train".

Phase 1 over 2 ranks is tested in test_cache.py (test_two_process_run_encodes_each_sample_once).
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_deepspeed import zero3_test_config
from test_training import cache_dir, make_cfg, run  # noqa: F401  (module-scoped cache fixture)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"ddp": REPO / "configs" / "accelerate_ddp.yaml", "zero2": REPO / "configs" / "accelerate_zero2.yaml"}
# 2 processes x accumulation 2 against 1 process x accumulation 4: the gradients are the same sums in another order
# (fp32), so losses agree to float rounding and the weights after 4 AdamW steps to well below one step's change.
LOSS_RTOL = 1e-5
WEIGHT_TOL = 1e-3  # x the largest change of any weight over the run
RESUME_TOL = 1e-6  # x the same: a resumed run repeats the same operations


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: Path, script: list[str], env_extra: dict | None = None, expect_kill: bool = False,
           expect_failure: str | None = None) -> str:
    """`accelerate launch --config_file CONFIG --num_processes 2 SCRIPT...` on the CPU; returns its output.
    `expect_kill`: the run must fail with a SIGKILL; `expect_failure`: it must fail with this text in its output."""
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="offline", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               **(env_extra or {}))
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(free_port()), *script]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    if expect_kill or expect_failure:
        assert res.returncode != 0 and (expect_failure or "SIGKILL") in log, log[-4000:]
    else:
        assert res.returncode == 0, log[-6000:]
    return log


def train_args(cache: Path, tiny_root: Path, out: Path, run_name: str, **kw) -> list[str]:
    args = {"cache-dir": cache, "model-root": tiny_root, "output-dir": out, "run-name": run_name, "lora-rank": 4,
            "batch-size": 1, "save-every": 2, "log-every": 1, "keep-last": 0, "wandb": "false",
            "gradient-checkpointing": "false", "cfg-drop-prob": 0.0, "device": "cpu"}
    args.update({k.replace("_", "-"): v for k, v in kw.items()})
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_lr_schedule_under_two_processes(tmp_path):
    """Cosine with warmup 10 over 100 optimizer steps (accumulation 2): the lr of each step under 2 DDP processes is
    the single-process schedule's, so step 50 is mid-cosine and only step 100 gets near 0."""
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.training.optim import lr_lambda

    out = tmp_path / "lrs.json"
    launch(CONFIGS["ddp"], [str(REPO / "tests" / "dist_worker.py"), "schedule", str(out), "100", "10", "cosine", "2"])
    report = json.loads(out.read_text())
    assert report["world"] == 2
    f = lr_lambda(TrainConfig(warmup_steps=10, lr_schedule="cosine", max_steps=100))
    expected = [1e-3 * f(k) for k in range(100)]
    assert len(report["lrs"]) == 100
    for k, (got, want) in enumerate(zip(report["lrs"], expected)):
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-18), (k + 1, got, want)
    assert report["lrs"][9] == pytest.approx(1e-3) and report["lrs"][49] > 0.5e-3 and report["lrs"][-1] < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2"])
def test_two_processes_match_one_and_resume_after_sigkill(mode, cache_dir, tiny_root, tmp_path):  # noqa: F811
    from diffsynth_edit.training.faults import KILL_ENV

    schedule = dict(optimizer="adamw", learning_rate=1e-3, lr_schedule="cosine", warmup_steps=1, max_steps=4)
    _, single_path = run(make_cfg(cache_dir, tiny_root, tmp_path / "one", gradient_accumulation=4, save_every=2,
                                  log_every=1, **schedule))
    args = dict(gradient_accumulation=2, **schedule)
    train = str(REPO / "train_2511.py")
    launch(CONFIGS[mode], [train, "train", *train_args(cache_dir, tiny_root, tmp_path, "full", **args)])
    launch(CONFIGS[mode], [train, "train", *train_args(cache_dir, tiny_root, tmp_path, "cut", **args)],
           env_extra={KILL_ENV: "step:3"}, expect_kill=True)
    assert [r["step"] for r in metrics(tmp_path / "cut")] == ["1", "2", "3"]
    resumed_log = launch(CONFIGS[mode], [train, "train", *train_args(cache_dir, tiny_root, tmp_path, "cut",
                                                                     resume="true", **args)])
    assert "resuming at step 2" in resumed_log and "x 2 process(es)" in resumed_log

    # Losses, gradient norms and learning rates of each step: those of the single-process run.
    one, two = metrics(tmp_path / "one" / "run"), metrics(tmp_path / "full")
    assert [r["step"] for r in two] == ["1", "2", "3", "4"]
    for a, b in zip(one, two):
        for key in ("loss", "loss_main", "loss_sub", "grad_norm"):
            assert math.isclose(float(a[key]), float(b[key]), rel_tol=LOSS_RTOL), (key, a, b)
        assert math.isclose(float(a["lr"]), float(b["lr"]), rel_tol=1e-12), (a["lr"], b["lr"])
    # warmup 1, then cosine over 3 steps: step 4 at 1/2 (1 + cos(2 pi / 3)) = 1/4
    assert [float(r["lr"]) for r in two] == pytest.approx([1e-3, 1e-3, 0.75e-3, 0.25e-3], rel=1e-12)

    # Final LoRA/STE weights: those of the single-process run, within WEIGHT_TOL of the run's largest weight change.
    single, full = load_file(str(single_path)), load_file(str(tmp_path / "full" / "step-000004.safetensors"))
    first = load_file(str(tmp_path / "full" / "step-000002.safetensors"))
    change = max_diff(full, first)
    assert change > 1e-4
    assert max_diff(full, single) <= WEIGHT_TOL * change, (max_diff(full, single), change)

    # Killed after step 3 (state of step 2 on disk), resumed: the uninterrupted run's weights, each step logged once.
    cut = load_file(str(tmp_path / "cut" / "step-000004.safetensors"))
    assert max_diff(cut, full) <= RESUME_TOL * change, (max_diff(cut, full), change)
    assert [r["step"] for r in metrics(tmp_path / "cut")] == ["1", "2", "3", "4"]
    state = json.loads((tmp_path / "cut" / "state" / "trainer.json").read_text())
    assert state["step"] == 4
    assert state["deepspeed"] == (None if mode == "ddp" else {"stage": 2, "world_size": 2})
    assert not list((tmp_path / "cut").glob(".state-*"))


@pytest.mark.slow
def test_a_stop_signal_on_one_process_stops_both_at_the_same_micro_batch(cache_dir, tiny_root, tmp_path):  # noqa: F811
    """SIGTERM to rank 1 only, after its third micro-batch (step 2 half done): both processes leave before the next
    one (rank 0 would otherwise wait in the next backward's all-reduce), the state of step 1 is saved, and the run
    resumed from it ends with the uninterrupted run's weights."""
    from diffsynth_edit.training.faults import SIGNAL_ENV

    args = dict(optimizer="adamw", learning_rate=1e-3, gradient_accumulation=2, max_steps=3, save_every=2)
    train = str(REPO / "train_2511.py")
    launch(CONFIGS["ddp"], [train, "train", *train_args(cache_dir, tiny_root, tmp_path, "full", **args)])
    launch(CONFIGS["ddp"], [train, "train", *train_args(cache_dir, tiny_root, tmp_path, "cut", **args)],
           env_extra={SIGNAL_ENV: "SIGTERM:3:1"},
           expect_failure="stopped by a signal on another process before step 2 finished; the resume state of step 1")
    assert json.loads((tmp_path / "cut" / "state" / "trainer.json").read_text())["step"] == 1
    launch(CONFIGS["ddp"], [train, "train", *train_args(cache_dir, tiny_root, tmp_path, "cut", resume="true",
                                                        **args)])
    full, cut = (load_file(str(tmp_path / r / "step-000003.safetensors")) for r in ("full", "cut"))
    change = max_diff(full, load_file(str(tmp_path / "full" / "step-000002.safetensors")))
    assert max_diff(cut, full) <= RESUME_TOL * change, (max_diff(cut, full), change)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_prodigy_saved_weights_under_zero(stage, cache_dir, tiny_root, tmp_path):  # noqa: F811
    config = CONFIGS["zero2"] if stage == "zero2" else zero3_test_config(tmp_path)
    out = tmp_path / "views.json"
    args = train_args(cache_dir, tiny_root, tmp_path, "prodigy", optimizer="prodigy", d0=1e-3, max_steps=3,
                      gradient_accumulation=1, save_every=3)
    launch(config, [str(REPO / "tests" / "dist_worker.py"), "views", str(out), *args])
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["zero_stage"] == int(stage[-1])
    if stage == "zero2":
        # Schedule-free on: the saved tensors are the evaluation weights, which differ from the train view.
        assert r["schedule_free"] is True and r["metadata_weights"] == "eval"
        # (3 steps with d0 1e-3 put the two views ~2e-4 apart; eval() after a train() round trip is not bit-exact.)
        assert r["eval_vs_train"] > 1e-5, r
        assert r["saved_vs_eval"] <= 1e-3 * r["eval_vs_train"], r
    else:
        # ZeRO-3 builds Prodigy without schedule-free: one view, the trained weights, and the metadata says so.
        assert r["schedule_free"] is False and r["metadata_weights"] == "train"
        assert r["eval_vs_train"] == 0 and r["saved_vs_train"] <= 1e-7 * r["scale"], r
