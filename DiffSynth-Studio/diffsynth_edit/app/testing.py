"""Helpers for the app's tests and benchmark: test checkpoints for a DiT, and a live app in a subprocess."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..checkpoint import write_checkpoint
from ..ste import STE

DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.2")


def lora_state_for(dit: torch.nn.Module, rank: int = 4, seed: int = 0, scale: float = 0.5,
                   targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """Random PEFT-form LoRA (`X.lora_A.default.weight` [r, in], `.lora_B.default.weight` [out, r]) for every
    block's `targets`; both A and B non-zero, so the LoRA changes the output."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, mod in dit.named_modules():
        name = name.replace(".base_layer", "")
        weight = getattr(mod, "weight", None)
        if not name.startswith("transformer_blocks.") or not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        if not any(name.endswith("." + t) for t in targets) or f"{name}.lora_A.default.weight" in state:
            continue
        out_f, in_f = weight.shape
        state[f"{name}.lora_A.default.weight"] = torch.randn(rank, in_f, generator=gen) * scale / in_f ** 0.5
        state[f"{name}.lora_B.default.weight"] = torch.randn(out_f, rank, generator=gen) * scale / rank ** 0.5
    return state


def ste_state_for(dit: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete STE state dict whose heads are non-zero (so some gates close)."""
    torch.manual_seed(seed)
    ste = STE.for_dit(dit)
    with torch.no_grad():
        for head in ste.heads:
            head.weight.normal_(0, 1.0)
    return {k: v.detach().clone() for k, v in ste.state_dict().items()}


def make_test_checkpoint(dit: torch.nn.Module, path: Path | str, step: int = 100, seed: int = 0, rank: int = 4,
                         with_ste: bool = False, variant: str = "2511", scale: float = 0.5) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"step": step, "variant": variant, "rank": rank, "lora_alpha": rank, "zero_cond_t": variant == "2511",
            "dit_activation": "gelu-tanh"}
    return write_checkpoint(path, lora_state_for(dit, rank, seed, scale), ste_state_for(dit, seed) if with_ste else None,
                            meta)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"app exited with code {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"app at {url} did not answer within {timeout:.0f} s ({last})")


def start_app(args: Sequence[str], cwd: Path | str, log, port: int, threads: int | None = None,
              **env: str) -> subprocess.Popen:
    """Start `python app_gradio.py --port PORT *args` in `cwd`, offline and without analytics, its output to the open
    file `log`. `threads` sets OMP_NUM_THREADS (1 suits the tiny model, above all on a loaded machine); `env` adds
    variables."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               DIFFSYNTH_SKIP_DOWNLOAD="true", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **env)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, str(Path(cwd) / "app_gradio.py"), "--port", str(port), *args],
                            cwd=str(cwd), env=env, stdout=log, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def app_process(args: Sequence[str], cwd: Path | str, log_path: Path | str, timeout: float = 120.0,
                port: int | None = None, threads: int | None = None) -> Iterator[str]:
    """`start_app`; yield its URL once it serves; stop it afterwards."""
    port = port or free_port()
    log = open(log_path, "w")
    proc = start_app(args, cwd, log, port, threads)
    url = f"http://127.0.0.1:{port}/"
    try:
        try:
            wait_for_http(url + "config", timeout, proc)
        except Exception:
            log.flush()
            raise RuntimeError(f"{Path(log_path).read_text()[-4000:]}") from None
        yield url
    finally:
        stop_process(proc)
        log.close()


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
