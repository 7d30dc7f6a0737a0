"""The app under abuse (issue 19 item 7): editor payloads bounded before decoding, a warning and a login when it
serves the network, only loadable checkpoints listed, over-long names refused by name."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, w: int, h: int, mode: str = "RGBA") -> Path:
    Image.new(mode, (w, h), (255, 255, 255, 0) if mode == "RGBA" else 0).save(path)
    return path


def _payload(tmp_path, n_layers: int, layer_size=(64, 48)):
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    bg = _png(tmp_path / "bg.png", 64, 48, "RGB")
    layer = _png(tmp_path / "layer.png", *layer_size)
    return EditorData(background=FileData(path=str(bg)), layers=[FileData(path=str(layer))] * n_layers,
                      composite=FileData(path=str(bg)))


def test_editor_refuses_many_layers_before_decoding(tmp_path, monkeypatch):
    import gradio as gr

    from diffsynth_edit.app.editor_limits import MAX_LAYERS, bounded_editor

    editor = bounded_editor(gr.ImageEditor(type="pil", image_mode="RGBA", layers=False, format="png"))
    (tmp_path / "b").mkdir()
    many, too_big = _payload(tmp_path, 24), _payload(tmp_path / "b", 1, layer_size=(128, 96))
    decoded = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or original(self))
    with pytest.raises(gr.Error, match="24 brush layers"):
        editor.preprocess(many)
    assert not decoded, "an image was decoded before the payload was checked"
    with pytest.raises(gr.Error, match="brush layer 1 has 12288 pixels, more than the image"):
        editor.preprocess(too_big)
    assert not decoded
    monkeypatch.undo()
    value = editor.preprocess(_payload(tmp_path, MAX_LAYERS))
    assert value["background"].size == (64, 48) and len(value["layers"]) == MAX_LAYERS


def test_editor_refuses_an_image_over_the_pixel_limit_from_its_header(tmp_path):
    from diffsynth_edit.app.editor_limits import check_editor_payload
    from diffsynth_edit.app.errors import AppInputError

    big = _png(tmp_path / "big.png", 300, 200, "L")
    with pytest.raises(AppInputError, match="60000 pixels; at most 50000"):
        check_editor_payload(str(big), [], None, max_pixels=50_000)
    check_editor_payload(str(big), [str(big)], str(big), max_pixels=60_000)


def test_network_bind_warns_and_auth_comes_from_a_file_or_the_environment(tmp_path):
    from diffsynth_edit.app.auth import AUTH_ENV, exposure_warning, load_auth
    from diffsynth_edit.config import ConfigError

    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    w = exposure_warning("0.0.0.0", None)
    assert "WARNING" in w and "no login" in w and "--auth-file" in w and AUTH_ENV in w
    assert "WARNING" not in exposure_warning("0.0.0.0", [("u", "p")])
    f = tmp_path / "users"
    f.write_text("# who may edit\nalice:s3cret:with-colon\n\nbob:pw\n")
    assert load_auth(f, environ={}) == [("alice", "s3cret:with-colon"), ("bob", "pw")]
    assert load_auth(None, environ={AUTH_ENV: "carol:x, dave:y"}) == [("carol", "x"), ("dave", "y")]
    assert load_auth(None, environ={}) is None
    f.write_text("alice\n")
    with pytest.raises(ConfigError, match=r"--auth-file .*users line 1: expected `user:password`"):
        load_auth(f, environ={})


def _http(url: str, data: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


@pytest.mark.slow
def test_served_app_asks_for_the_login(tiny_root, tmp_path):
    from diffsynth_edit.app.testing import free_port, start_app, stop_process

    users = tmp_path / "users"
    users.write_text("alice:s3cret\n")
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    proc = start_app(["--tiny", "--tiny-root", str(tiny_root), "--checkpoint-root", str(tmp_path), "--device", "cpu",
                      "--auth-file", str(users)], REPO, log, port, threads=1)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, _ = _http(url + "config")
                break
            except OSError:
                time.sleep(0.5)
        assert status == 401, (status, (tmp_path / "app.log").read_text()[-3000:])
        assert _http(url + "login", {"username": "alice", "password": "wrong"})[0] >= 400
        code, headers = _http(url + "login", {"username": "alice", "password": "s3cret"})
        assert code == 200 and "set-cookie" in {k.lower() for k in headers}
        cookie = next(v for k, v in headers.items() if k.lower() == "set-cookie").split(";")[0]
        assert _http(url + "config", headers={"Cookie": cookie})[0] == 200
    finally:
        stop_process(proc)
        log.close()


def test_png_store_removes_the_folder_a_killed_app_left(tmp_path, monkeypatch):
    """The output folder carries the app's pid; a folder whose pid is dead (an app killed by SIGKILL) goes when the
    next store is made, a live app's folder stays."""
    import tempfile

    from diffsynth_edit.app.png import PngStore

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"qwen_edit_app-{int(gone.stdout)}-abc"
    live = tmp_path / f"qwen_edit_app-{os.getppid()}-def"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "out.png").write_bytes(b"png")
    store = PngStore()
    assert not dead.exists() and (live / "out.png").exists()
    assert store.dir.parent == tmp_path and store.dir.name.startswith(f"qwen_edit_app-{os.getpid()}-")
    assert Path(store.save(Image.new("RGB", (8, 8)), "out")).parent == store.dir


@pytest.mark.slow
def test_sigterm_stops_the_app_and_removes_its_outputs(tiny_root, tmp_path):
    """SIGTERM (systemd, docker stop) closes the server, runs the exit handlers (the output folder goes) and exits
    with 128 + 15, as a shell reports a process the signal killed."""
    from diffsynth_edit.app.testing import free_port, start_app, stop_process, wait_for_http

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    log_path = tmp_path / "app.log"
    with open(log_path, "w") as log:
        proc = start_app(["--tiny", "--tiny-root", str(tiny_root), "--checkpoint-root", str(tmp_path), "--device",
                          "cpu"], REPO, log, port, threads=1, TMPDIR=str(tmp))
        try:
            wait_for_http(f"http://127.0.0.1:{port}/config", 180, proc)
            outputs = list(tmp.glob(f"qwen_edit_app-{proc.pid}-*"))
            assert len(outputs) == 1 and outputs[0].is_dir()
        finally:
            stop_process(proc)
    text = log_path.read_text()
    assert proc.returncode == 143, text[-3000:]
    assert "[app] stopped (SIGTERM)" in text and "Traceback" not in text, text[-3000:]
    assert not outputs[0].exists()


def test_listing_skips_files_that_are_not_checkpoints(tmp_path):
    from diffsynth_edit.app.checkpoints import list_checkpoints

    lora = {"transformer_blocks.0.attn.to_q.lora_A.default.weight": torch.zeros(4, 8),
            "transformer_blocks.0.attn.to_q.lora_B.default.weight": torch.zeros(8, 4)}
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    save_file(lora, str(run / "step-000002.safetensors"))
    save_file(lora | {"ste.ste_blocks.0.w": torch.zeros(2)}, str(run / "state" / "trainable.safetensors"))
    save_file({"t0": torch.zeros(2)}, str(run / "state" / "optimizer.safetensors"))
    (run / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert [e.id for e in list_checkpoints([tmp_path])] == ["run/step-000002.safetensors"]


def test_over_long_checkpoint_name_is_refused_by_name(tmp_path):
    from diffsynth_edit.app.checkpoints import CheckpointAccessError, resolve_checkpoint

    for name in ("a" * 5000 + ".safetensors", "run/" + "b" * 300 + ".safetensors"):
        with pytest.raises(CheckpointAccessError, match=r"refused a checkpoint name of \d+ characters"):
            resolve_checkpoint(name, [tmp_path])
