"""The app served live (a subprocess on a free port, bound to 127.0.0.1, tiny model), driven by gradio_client."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def live(tiny_root, tmp_path_factory):
    from diffsynth_edit.app.testing import app_process, make_test_checkpoint
    from diffsynth_edit.tiny import TinyQwenImageDiT

    base = tmp_path_factory.mktemp("app_live")
    dit = TinyQwenImageDiT()  # same module shapes as the served tiny DiT
    make_test_checkpoint(dit, base / "train" / "run1" / "step-10.safetensors", step=10, seed=1)
    make_test_checkpoint(dit, base / "train" / "run1" / "step-20.safetensors", step=20, seed=2, with_ste=True)
    make_test_checkpoint(dit, base / "outside" / "evil.safetensors", step=1, seed=3)
    from safetensors.torch import save_file

    from diffsynth_edit.app.testing import lora_state_for
    from diffsynth_edit.checkpoint import parse_state_dict
    from diffsynth_edit.lora_formats import to_layout

    lightning = parse_state_dict(lora_state_for(dit, seed=4)).lora  # a third-party LoRA in the Lightning layout
    lightning.scale = {m: 0.5 for m in lightning.modules}
    (base / "train" / "loras").mkdir(parents=True)
    save_file(to_layout(lightning, "lightning"), str(base / "train" / "loras" / "lightning.safetensors"))
    (base / "train" / "run1" / "notes.txt").write_text("not a checkpoint")
    files = base / "files"
    files.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(files / "image.png")
    mask = Image.new("L", (128, 96), 0)
    mask.paste(255, (32, 16, 80, 64))
    mask.save(files / "mask.png")
    mask.resize((64, 48), Image.NEAREST).save(files / "mask_half.png")
    Image.new("L", (96, 96), 255).save(files / "mask_square.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(files / "ref.png")
    (files / "junk.png").write_bytes(b"\x89PNG but not really an image")
    args = ["--tiny", "--tiny-root", str(tiny_root), "--checkpoint-root", str(base / "train"), "--device", "cpu",
            "--steps", "4"]
    with app_process(args, cwd=REPO, log_path=base / "app.log", threads=1) as url:
        from gradio_client import Client

        client = Client(url, verbose=False)
        yield {"url": url, "client": client, "files": files, "base": base}


def _edit(live, **overrides):
    from gradio_client import handle_file

    f = live["files"]
    kwargs = dict(image=handle_file(str(f / "image.png")), mask=handle_file(str(f / "mask.png")),
                  prompt="make it blue", references=None, checkpoint="", strength=1.0, sampler="flow", steps=2,
                  cfg=2.0, seed=1, blend_alpha=0.0)
    kwargs.update(overrides)
    return live["client"].predict(**kwargs, api_name="/edit")


def _assert_error(live, match: str, **overrides):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        _edit(live, **overrides)
    assert match in str(info.value), str(info.value)
    # the server keeps serving: a valid call right after succeeds
    image, _, settings = _edit(live, steps=1)
    assert Image.open(image).size == (128, 96) and settings["steps"] == 1


def test_edit_returns_images_of_the_right_sizes(live):
    from gradio_client import handle_file

    image, sub, settings = _edit(live, checkpoint="run1/step-20.safetensors",
                                 references=[handle_file(str(live["files"] / "ref.png"))])
    assert Image.open(image).size == (128, 96)
    assert Image.open(sub).size == (48, 48)  # the mask box (32..80 x 16..64), 16-aligned
    assert settings["checkpoint"] == "run1/step-20.safetensors" and settings["run"] == "run1"
    assert settings["step"] == 20 and settings["mode"] == "bridge" and settings["references"] == 1
    assert settings["size"] == [128, 96] and settings["seed"] == 1
    # LBM, no mask, base model: no sub image
    image, sub, settings = _edit(live, mask=None, sampler="lbm", steps=4, cfg=1.0)
    assert Image.open(image).size == (128, 96) and sub is None and settings["mode"] == "plain"


def test_checkpoint_outside_the_roots_is_refused(live):
    _assert_error(live, "inside the checkpoint roots", checkpoint="../outside/evil.safetensors")
    _assert_error(live, "inside the checkpoint roots", checkpoint=str(live["base"] / "outside/evil.safetensors"))
    _assert_error(live, "only .safetensors", checkpoint="run1/notes.txt")


def test_mask_of_another_size(live):
    from gradio_client import handle_file

    image, sub, settings = _edit(live, mask=handle_file(str(live["files"] / "mask_half.png")))
    assert Image.open(image).size == (128, 96)
    assert any("mask resized" in n for n in settings["notices"])
    _assert_error(live, "aspect ratio", mask=handle_file(str(live["files"] / "mask_square.png")))


def test_garbage_input_returns_an_error_and_the_server_keeps_serving(live):
    from gradio_client import handle_file

    _assert_error(live, "not a readable image", image=handle_file(str(live["files"] / "junk.png")))
    _assert_error(live, "steps=-5 is out of range", steps=-5)
    _assert_error(live, "unknown sampler", sampler="euler_a")
    _assert_error(live, "steps", sampler="lbm", steps=9)
    _assert_error(live, "blend_alpha", blend_alpha=3)
    _assert_error(live, "no image", image=None)


def test_fast_client_recipe(live):
    """The documented client with one TLS context (diffsynth_edit.app.client.connect) calls /edit the same way."""
    import ssl

    from gradio_client import handle_file

    from diffsynth_edit.app.client import connect

    client = connect(live["url"])
    assert isinstance(client.ssl_verify, ssl.SSLContext) and client.ssl_verify.verify_mode == ssl.CERT_REQUIRED
    f = live["files"]
    image, sub, settings = client.predict(image=handle_file(str(f / "image.png")), mask=handle_file(str(f / "mask.png")),
                                          prompt="x", steps=1, cfg=1.0, seed=3, api_name="/edit")
    assert Image.open(image).size == (128, 96) and sub is None and settings["seed"] == 3
    assert Image.open(image).format == "PNG"
    client.close()


def _raw_join(url: str, data: list) -> dict:
    """Join /edit's queue with a hand-made payload (what gradio_client cannot send) and return the final message."""
    import json
    import uuid

    import httpx

    config = httpx.get(url + "config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "edit")
    session = uuid.uuid4().hex
    r = httpx.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                        "event_data": None, "trigger_id": None})
    if r.status_code != 200:
        return {"msg": "rejected", "status": r.status_code, "text": r.text}
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("no process_completed message")


def test_files_outside_the_upload_folder_are_refused(live):
    """/edit skips gradio's per-component preprocessing (the service validates every input), but gradio's own check
    that an input file was uploaded to this server still runs: a path elsewhere on the server is refused."""
    outside = str(live["files"] / "image.png")  # exists on the server's disk, but was never uploaded
    payload = {"path": outside, "meta": {"_type": "gradio.FileData"}, "orig_name": "image.png"}
    msg = _raw_join(live["url"], [payload, None, "x", None, "", 1.0, "flow", 1, 1.0, 0, 0.0, "", "qwen"])
    assert msg.get("success") is False and "not uploaded" in msg["output"]["error"], msg
    _assert_error(live, "no image", image=None)  # and the server keeps serving


def test_checkpoint_listing_endpoint(live):
    listing = live["client"].predict(api_name="/checkpoints")
    assert [(c["run"], c["step"]) for c in listing] == [("loras", None), ("run1", 10), ("run1", 20)]


def test_extra_loras_are_applied_through_the_api(live):
    _, _, base = _edit(live, checkpoint="run1/step-10.safetensors", steps=1)
    image, _, settings = _edit(live, checkpoint="run1/step-10.safetensors", steps=1,
                               loras="loras/lightning.safetensors:0.5", schedule="lightning")
    assert settings["checkpoint"] == "run1/step-10.safetensors" and settings["schedule"] == "lightning"
    assert [(x["name"], x["layout"], x["strength"]) for x in settings["extra_loras"]] == [
        ("loras/lightning.safetensors", "lightning", 0.5)]
    image_base, _, settings_base = _edit(live, checkpoint="run1/step-10.safetensors", steps=1)
    assert settings_base["extra_loras"] == [] and base["extra_loras"] == [] and base["schedule"] == "qwen"
    assert np.asarray(Image.open(image)).tobytes() != np.asarray(Image.open(image_base)).tobytes()
    _assert_error(live, "inside the checkpoint roots", loras="../outside/evil.safetensors")


def test_one_generation_at_a_time_others_queue(live):
    """Three simultaneous requests: one runs, the others wait in the queue and are told their position."""
    import time

    from gradio_client import handle_file

    client = live["client"]
    image = handle_file(str(live["files"] / "image.png"))
    jobs = [client.submit(image, None, "x", None, "", 1.0, "flow", 12, 2.0, i, 0.0, api_name="/edit")
            for i in range(3)]
    seen = set()
    deadline = time.monotonic() + 120
    while not all(j.done() for j in jobs) and time.monotonic() < deadline:
        for j in jobs:
            s = j.status()
            seen.add((s.code.name, s.rank))
        time.sleep(0.005)
    assert sorted(j.result()[2]["seed"] for j in jobs) == [0, 1, 2]
    assert any(code == "IN_QUEUE" and rank is not None and rank >= 1 for code, rank in seen), seen


class _PageStub:  # build_ui only needs these attributes to lay out the page
    max_steps = 100
    loaded = None
    startup_notices = []

    max_extra_loras = 2

    @staticmethod
    def checkpoint_choices():
        return [("(none: base model)", "")]

    @staticmethod
    def lora_choices():
        return [("(none)", "")]


def test_generate_events_share_one_slot():
    """Structure: the page's Generate and /edit are in one concurrency group of size 1 (queue on)."""
    from diffsynth_edit.app.ui import GPU_GROUP, build_ui

    demo = build_ui(_PageStub())
    fns = list(demo.fns.values()) if isinstance(demo.fns, dict) else list(demo.fns)
    gpu = [f for f in fns if getattr(f, "concurrency_id", None) == GPU_GROUP]
    assert len(gpu) == 2 and all(f.concurrency_limit == 1 and f.queue for f in gpu)
    assert {f.api_name for f in gpu} >= {"edit"}


def test_queue_polls_every_5_ms_and_edit_skips_component_preprocessing():
    """launch() slows gradio's idle queue poll from 1 ms to QUEUE_POLL_S (fewer GIL hand-offs during an edit); /edit
    takes its inputs as gradio serialised them (file dicts, numbers), the service validating each one."""
    from diffsynth_edit.app.testing import free_port
    from diffsynth_edit.app.ui import QUEUE_POLL_S, build_ui, launch

    demo = build_ui(_PageStub())
    launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        assert demo._queue.sleep_when_free == QUEUE_POLL_S == 0.005
        fns = list(demo.fns.values()) if isinstance(demo.fns, dict) else list(demo.fns)
        edit = next(f for f in fns if f.api_name == "edit")
        assert edit.preprocess is False and edit.postprocess is True and edit.queue
    finally:
        demo.close()



EXTRA_LORA_SLOTS = 3  # the app's default --max-extra-loras


def _page_inputs(editor_value, prompt: str, checkpoint: str, seed: int) -> tuple:
    """Every input of the page's Generate event, in its order: editor, prompt, references, checkpoint, strength,
    sampler, steps, cfg, seed, blend, schedule, then the extra-LoRA slots' files and strengths (all empty)."""
    return (editor_value, prompt, None, checkpoint, 1.0, "flow", 2, 2.0, seed, 0.0, "qwen",
            *[""] * EXTRA_LORA_SLOTS, *[1.0] * EXTRA_LORA_SLOTS)


def test_use_as_input_chains_two_edits(live):
    """The page's own path: Generate on an image with a painted mask, "Use as input" on its output, Generate again.
    The second edit starts from exactly the first output's pixels: it equals an /edit call on that output file."""
    from gradio_client import handle_file

    f, client = live["files"], live["client"]
    layer = Image.new("RGBA", (128, 96), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (32, 16, 80, 64))  # brush paint = the region to edit
    layer.save(f / "layer.png")
    first_value = {"background": handle_file(str(f / "image.png")), "layers": [handle_file(str(f / "layer.png"))],
                   "composite": handle_file(str(f / "image.png"))}
    first, _, _, settings1, _ = client.predict(*_page_inputs(first_value, "make it blue", "", seed=1),
                                               api_name="/ui_generate")
    assert settings1["mask"] == "painted" and settings1["size"] == [128, 96]
    first_px = np.asarray(Image.open(first).convert("RGB"))
    assert not np.array_equal(first_px, np.asarray(Image.open(f / "image.png").convert("RGB")))

    chained = client.predict(handle_file(first), api_name="/use_as_input")
    assert chained["layers"] == [] and np.array_equal(np.asarray(Image.open(chained["background"]).convert("RGB")),
                                                      first_px)
    second_value = {"background": handle_file(chained["background"]), "layers": [],
                    "composite": handle_file(chained["composite"])}
    second, sub, compare, settings2, _ = client.predict(
        *_page_inputs(second_value, "make it red", "run1/step-20.safetensors", seed=5), api_name="/ui_generate")
    before = compare[0] if isinstance(compare, (list, tuple)) else compare
    assert np.array_equal(np.asarray(Image.open(before).convert("RGB")), first_px)  # the "before" is edit 1's output
    assert settings2["mask"].startswith("none") and settings2["checkpoint"] == "run1/step-20.safetensors"
    second_px = np.asarray(Image.open(second).convert("RGB"))
    assert second_px.shape == first_px.shape and not np.array_equal(second_px, first_px)
    assert Image.open(sub).size == (128, 96)  # bridge checkpoint, no mask: the sub stream is the whole image
    direct, _, _ = _edit(live, image=handle_file(first), mask=None, prompt="make it red",
                         checkpoint="run1/step-20.safetensors", seed=5)
    assert np.array_equal(np.asarray(Image.open(direct).convert("RGB")), second_px)
