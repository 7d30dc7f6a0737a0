"""Training under faults (issue 19): exact resume with ProdigyPlusScheduleFree after a real kill -9, resume states
that load without pickle, and a full or read-only output folder during training."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training import cache_dir, make_cfg, run  # noqa: F401  (module fixture reused)

TESTS = Path(__file__).parent


def cli_args(cache_dir, tiny_root, out, **kw) -> list[str]:
    """The `train` flags of `make_cfg(cache_dir, tiny_root, out, **kw)`."""
    base = dict(cache_dir=cache_dir, model_root=tiny_root, output_dir=out, run_name="run", lora_rank=4,
                optimizer="adamw", learning_rate=1e-3, gradient_accumulation=1, batch_size=1, max_steps=1,
                save_every=100, gradient_checkpointing=False, wandb=False, device="cpu", cfg_drop_prob=0.0)
    base.update(kw)
    argv = []
    for k, v in base.items():
        if v is None:
            continue
        argv += ["--" + k.replace("_", "-"), ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    return argv


def train_cli(argv, capsys) -> tuple[int, str]:
    from diffsynth_edit.training.cli import main_train

    capsys.readouterr()
    code = main_train(argv)
    return code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("trainable_dtype", ["bf16", "fp32"])
def test_prodigy_run_killed_then_resumed_equals_uninterrupted(cache_dir, tiny_root, tmp_path, trainable_dtype,  # noqa: F811
                                                              capsys):
    """The presets' optimizer, kill -9 of a training process after the state of step 2, `--resume`: every saved
    tensor equals the uninterrupted run's (Prodigy keeps fp32 and bf16 state side by side; a cast drifts)."""
    from diffsynth_edit.training.faults import KILL_ENV

    kw = dict(optimizer="prodigy", learning_rate=None, trainable_dtype=trainable_dtype, max_steps=5, save_every=2,
              gradient_accumulation=2)
    _, full = run(make_cfg(cache_dir, tiny_root, tmp_path / "full", **kw))
    code = ("import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
            "from diffsynth_edit.training.cli import main_train; sys.exit(main_train(sys.argv[2:]))")
    argv = cli_args(cache_dir, tiny_root, tmp_path / "cut", **kw)
    proc = subprocess.run([sys.executable, "-c", code, str(TESTS), *argv], env=os.environ | {KILL_ENV: "step:3"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    state = tmp_path / "cut" / "run" / "state"
    saved = load_file(str(state / "optimizer.safetensors"))
    assert {torch.bfloat16, torch.float32} <= {t.dtype for t in saved.values()}, "no mixed-dtype state to test"
    code_, err = train_cli(argv + ["--resume"], capsys)
    assert code_ == 0, err
    resumed = tmp_path / "cut" / "run" / "step-000005.safetensors"
    sf, sr = load_file(str(full)), load_file(str(resumed))
    assert sf.keys() == sr.keys()
    for k in sf:
        assert sf[k].dtype == sr[k].dtype and torch.equal(sf[k], sr[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, after_micro, stopped_at", [("SIGTERM", 5, 2), ("SIGINT", 4, 2)])
def test_stop_signal_saves_the_last_finished_step_and_resume_equals_uninterrupted(
        cache_dir, tiny_root, tmp_path, capsys, signal_name, after_micro, stopped_at):  # noqa: F811
    """SIGTERM (a preemption) or SIGINT (Ctrl-C) during a run: it stops before the next micro-batch, writes the
    resume state of the last finished step (SIGTERM after micro-batch 5 of steps of 2: step 3 is dropped half done;
    SIGINT after micro-batch 4: at a step boundary), exits with the signal's code; `--resume` then ends with the
    uninterrupted run's weights, bit for bit (the data position goes back to the dropped step's start)."""
    from diffsynth_edit.training.faults import SIGNAL_ENV

    kw = dict(optimizer="prodigy", learning_rate=None, trainable_dtype="bf16", max_steps=5, save_every=100,
              gradient_accumulation=2)
    _, full = run(make_cfg(cache_dir, tiny_root, tmp_path / "full", **kw))
    code = ("import sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); "
            "from diffsynth_edit.training.cli import main_train; sys.exit(main_train(sys.argv[2:]))")
    argv = cli_args(cache_dir, tiny_root, tmp_path / "cut", **kw)
    proc = subprocess.run([sys.executable, "-c", code, str(TESTS), *argv],
                          env=os.environ | {SIGNAL_ENV: f"{signal_name}:{after_micro}"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + getattr(signal, signal_name), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"stopped by {signal_name} before step {stopped_at + 1} finished; the resume state of step "
            f"{stopped_at} is in") in proc.stderr
    state = tmp_path / "cut" / "run" / "state"
    assert json.loads((state / "trainer.json").read_text())["step"] == stopped_at
    assert not list((tmp_path / "cut" / "run").glob("step-*.safetensors"))  # save_every 100: only the state
    code_, err = train_cli(argv + ["--resume"], capsys)
    assert code_ == 0, err
    sf, sr = load_file(str(full)), load_file(str(tmp_path / "cut" / "run" / "step-000005.safetensors"))
    assert sf.keys() == sr.keys()
    for k in sf:
        assert torch.equal(sf[k], sr[k]), k


def test_stop_requests_records_the_first_signal_and_stops_at_the_second(monkeypatch):
    """The first SIGTERM/SIGINT is recorded; a repeat within the launcher-echo window too (torchrun forwards the
    signal its workers got from the terminal or scheduler already); one after it stops at once."""
    from diffsynth_edit import lifetime
    from diffsynth_edit.lifetime import Terminated, stop_requests

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_requests() as stop:
        assert not stop.requested and stop.exit_code == 1
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == "SIGTERM" and stop.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's echo: still only recorded
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGTERM"
        monkeypatch.setattr(lifetime, "_ECHO_SECONDS", 0.0)
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == "SIGINT" and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_restored_optimizer_state_keeps_saved_dtypes():
    """bf16 and fp32 parameters: after a state round trip through the resume files every state tensor has its saved
    dtype and value, and the next step equals the uninterrupted optimizer's."""
    from prodigyplus import ProdigyPlusScheduleFree

    from diffsynth_edit.training.state_io import load_state, restore_optimizer_state, save_state

    def make(dtype):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(64, 48, generator=g).to(dtype)),
              torch.nn.Parameter(torch.randn(48, generator=g).to(dtype))]
        return ps, ProdigyPlusScheduleFree([{"params": ps}], lr=1.0, betas=(0.95, 0.99))

    for dtype in (torch.bfloat16, torch.float32):
        ps, opt = make(dtype)
        g = torch.Generator().manual_seed(1)
        grads = [[torch.randn(p.shape, generator=g).to(dtype) for p in ps] for _ in range(3)]
        for step in grads[:2]:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            save_state(Path(d) / "optimizer", {"optimizer": opt.state_dict()})
            blob = load_state(Path(d) / "optimizer")
        ps2, opt2 = make(dtype)
        with torch.no_grad():
            for a, b in zip(ps2, ps):
                a.copy_(b)
        restore_optimizer_state(opt2, blob["optimizer"])
        dtypes = set()
        for a, b in zip(ps, ps2):
            for k, v in opt.state[a].items():
                if isinstance(v, torch.Tensor):
                    dtypes.add(v.dtype)
                    w = opt2.state[b][k]
                    assert w.dtype == v.dtype and torch.equal(w, v), (dtype, k)
        assert len(dtypes) == 2, f"{dtype}: the state is not mixed-dtype ({dtypes}), the test cannot fail"
        for o, params in ((opt, ps), (opt2, ps2)):
            for p, gr in zip(params, grads[2]):
                p.grad = gr.clone()
            torch.manual_seed(3)  # bf16 weights are updated with stochastic rounding (global RNG)
            o.step()
        for a, b in zip(ps, ps2):
            assert torch.equal(a, b), dtype


def _resume_state_run(cache_dir, tiny_root, tmp_path):  # noqa: F811
    run(make_cfg(cache_dir, tiny_root, tmp_path, max_steps=2, save_every=2))
    return tmp_path / "run" / "state"


class _Payload:
    """Unpickling this calls open(path, "w"): a stand-in for code run by a crafted state."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_resume_state_is_not_a_pickle_and_a_crafted_one_is_refused(cache_dir, tiny_root, tmp_path, capsys):  # noqa: F811
    state = _resume_state_run(cache_dir, tiny_root, tmp_path)
    assert not list(state.glob("*.pt")), "the trainer wrote a pickle"
    assert {p.name for p in state.iterdir()} >= {"optimizer.safetensors", "optimizer.json", "trainer.json"}
    # A run folder from elsewhere: the older layout's optimizer.pt, crafted to run code when unpickled.
    (state / "optimizer.json").unlink()
    (state / "optimizer.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _Payload(marker)}, state / "optimizer.pt")
    code, err = train_cli(cli_args(cache_dir, tiny_root, tmp_path, max_steps=4, save_every=2, resume="true"),
                          capsys)
    assert not marker.exists(), "the crafted state ran code"
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and str(state / "optimizer.pt") in lines[0], err


def test_crafted_deepspeed_state_is_refused(tmp_path):
    from diffsynth_edit.training.state_io import StateFileError, load_torch_state

    marker = tmp_path / "code-ran"
    torch.save({"loss_scaler": _Payload(marker)}, tmp_path / "zero-rank00000.pt")
    with pytest.raises(StateFileError, match="refused"):
        load_torch_state(tmp_path / "zero-rank00000.pt", allow_deepspeed=True)
    assert not marker.exists()


@contextlib.contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path, leave: int) -> Path:
    """Fill the file system of `folder` but for about `leave` bytes."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _read_only(folder: Path):
    """Make `folder` unwritable: a read-only remount of the tmpfs as root, chmod otherwise."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    else:
        for p in [folder, *folder.rglob("*")]:
            if p.is_dir():
                p.chmod(0o555)


def _writable(folder: Path):
    if os.geteuid() == 0:
        subprocess.run(["mount", "-o", "remount,rw", str(folder)], check=True)
    else:
        for p in [folder, *folder.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_output_is_one_line_and_stays_resumable(cache_dir, tiny_root, tmp_path, fault,  # noqa: F811
                                                                  capsys):
    """A run saved at step 2; its folder then fills up (or turns read-only) and the resumed run fails at its next
    write: one line naming the file and the kept state, exit 2, state/ still step 2; with space back, `--resume`
    finishes with the uninterrupted run's weights."""
    import json

    _, full = run(make_cfg(cache_dir, tiny_root, tmp_path / "full", max_steps=4, save_every=2))
    with _tmpfs(tmp_path / "mnt", "8m") as out:
        argv = cli_args(cache_dir, tiny_root, out, max_steps=2, save_every=2)
        assert train_cli(argv, capsys)[0] == 0
        run_dir = out / "run"
        before = {p.name: p.read_bytes() for p in (run_dir / "state").iterdir()}
        argv = cli_args(cache_dir, tiny_root, out, max_steps=4, save_every=2, resume="true")
        if fault == "full":
            filler = _fill(out, leave=16 * 1024)
        else:
            _read_only(out)
        try:
            code, err = train_cli(argv, capsys)
        finally:
            if fault == "read-only":
                _writable(out)
        lines = re.findall(r"error: [^\r\n]*", err)  # beside tqdm's bar
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot write "), err
        reason = "no space left" if fault == "full" else "read-only"
        assert reason in lines[0].lower() and str(run_dir) in lines[0] and "step 2" in lines[0], lines[0]
        assert json.loads((run_dir / "state" / "trainer.json").read_text())["step"] == 2
        assert {p.name: p.read_bytes() for p in (run_dir / "state").iterdir()} == before
        assert not list(run_dir.glob(".state-*")) and not list(run_dir.glob(".*.tmp"))
        if fault == "full":
            filler.unlink()
        code, err = train_cli(argv, capsys)
        assert code == 0, err
        sf, sr = load_file(str(full)), load_file(str(run_dir / "step-000004.safetensors"))
        for k in sf:
            assert torch.equal(sf[k], sr[k]), k
