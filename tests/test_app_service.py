"""Unit tests of the app's gradio-free layer: checkpoint listing and the root check, hot-swapping checkpoints
without reloading the base model, request validation, the upload limit, the mask from the editor's brush layer and
the fast PNG writer of the outputs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_edit.app.checkpoints import CheckpointAccessError, list_checkpoints, resolve_checkpoint
from diffsynth_edit.app.config import parse_app_config
from diffsynth_edit.app.errors import AppInputError
from diffsynth_edit.app.uploads import limit_pixels, mask_from_editor
from diffsynth_edit.app.testing import make_test_checkpoint
from diffsynth_edit.checkpoint import write_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a shared, loaded machine (oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def app_pipe(tiny_sources):
    """The service's own pipeline (hot-swap mutates it, so the shared `tiny_pipe` is left alone)."""
    from diffsynth_edit.loading import load_pipeline

    return load_pipeline(tiny_sources, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def roots(tmp_path_factory, app_pipe):
    base = tmp_path_factory.mktemp("ckpt_roots")
    train = base / "train"
    dit = app_pipe.dit
    make_test_checkpoint(dit, train / "runA" / "step-100.safetensors", step=100, seed=1)
    make_test_checkpoint(dit, train / "runA" / "step-20.safetensors", step=20, seed=2)
    make_test_checkpoint(dit, train / "runB" / "step-7.safetensors", step=7, seed=3, with_ste=True)
    # no "step" in the metadata: taken from the file name
    from diffsynth_edit.app.testing import lora_state_for

    write_checkpoint(train / "runC" / "checkpoint-55.safetensors", lora_state_for(dit, seed=4), None,
                     {"variant": "2511"})
    (train / "runA" / "notes.txt").write_text("not a checkpoint")
    (train / "runA" / "step-1.pt").write_bytes(b"pickle!")
    outside = base / "outside"
    make_test_checkpoint(dit, outside / "evil.safetensors", step=1, seed=9)
    os.symlink(outside / "evil.safetensors", train / "runA" / "link.safetensors")
    os.symlink(outside, train / "linkdir")
    extra = base / "extra"
    make_test_checkpoint(dit, extra / "other" / "step-3.safetensors", step=3, seed=5)
    return {"train": train, "outside": outside, "extra": extra, "base": base}


@pytest.fixture()
def service(app_pipe, roots):
    from diffsynth_edit.app.service import EditService
    from diffsynth_edit.editing.editor import Editor

    editor = Editor(app_pipe, variant="2511", hot_swap=True)
    svc = EditService(editor, [roots["train"], roots["extra"]], max_upload_pixels=4096 * 4096,
                      max_pixels=256 * 256)
    yield svc
    editor.unload_checkpoint()


def _image(w=64, h=48, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _mask(w=64, h=48, box=(16, 16, 48, 32)) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    m.paste(255, box)
    return m


FAST = dict(sampler="flow", steps=2, cfg=1.5, seed=3)


# ---- listing and the root check ----------------------------------------------------------------------------------
def test_list_checkpoints_with_run_and_step(roots):
    entries = list_checkpoints([roots["train"], roots["extra"]])
    ids = [e.id for e in entries]
    assert ids == ["other/step-3.safetensors", "runA/step-20.safetensors", "runA/step-100.safetensors",
                   "runB/step-7.safetensors", "runC/checkpoint-55.safetensors"]
    by_id = {e.id: e for e in entries}
    assert by_id["runA/step-100.safetensors"].run == "runA" and by_id["runA/step-100.safetensors"].step == 100
    assert by_id["runC/checkpoint-55.safetensors"].step == 55  # from the file name
    assert by_id["runB/step-7.safetensors"].variant == "2511"
    assert "runA" in by_id["runA/step-20.safetensors"].label and "step 20" in by_id["runA/step-20.safetensors"].label
    # the symlinks that lead outside and the non-safetensors files are not listed
    assert not any("link" in i or i.endswith((".pt", ".txt")) for i in ids)


@pytest.mark.parametrize("name", [
    "../outside/evil.safetensors",
    "runA/../../outside/evil.safetensors",
    "runA/link.safetensors",              # symlink inside the root pointing outside
    "linkdir/evil.safetensors",           # through a linked folder
    "../../../../../../etc/passwd",
    "/etc/passwd",
])
def test_root_escape_is_refused(roots, name):
    with pytest.raises(CheckpointAccessError, match="inside the checkpoint roots"):
        resolve_checkpoint(name, [roots["train"]])


def test_absolute_path_outside_is_refused(roots):
    with pytest.raises(CheckpointAccessError, match="inside the checkpoint roots"):
        resolve_checkpoint(str(roots["outside"] / "evil.safetensors"), [roots["train"]])


def test_resolution_inside_roots(roots):
    train = roots["train"].resolve()
    assert resolve_checkpoint("", [train]) is None and resolve_checkpoint(None, [train]) is None
    assert resolve_checkpoint("runA/step-100.safetensors", [train]) == train / "runA/step-100.safetensors"
    assert resolve_checkpoint(str(train / "runB/step-7.safetensors"), [train]) == train / "runB/step-7.safetensors"
    assert resolve_checkpoint("other/step-3.safetensors", [train, roots["extra"]]) == \
        roots["extra"].resolve() / "other/step-3.safetensors"
    with pytest.raises(CheckpointAccessError, match="only .safetensors"):
        resolve_checkpoint("runA/step-1.pt", [train])
    with pytest.raises(CheckpointAccessError, match="no checkpoint"):
        resolve_checkpoint("runA/step-999.safetensors", [train])


def test_service_refuses_escape_and_keeps_working(service, roots):
    for name in ("../outside/evil.safetensors", str(roots["outside"] / "evil.safetensors"), "runA/link.safetensors"):
        with pytest.raises(AppInputError, match="inside the checkpoint roots"):
            service.generate(_image(), _mask(), "p", checkpoint=name, **FAST)
        assert service.editor.checkpoint is None
    out = service.generate(_image(), _mask(), "p", checkpoint="runA/step-100.safetensors", **FAST)
    assert out.settings["checkpoint"] == "runA/step-100.safetensors"
    assert out.settings["run"] == "runA" and out.settings["step"] == 100


# ---- hot swap ----------------------------------------------------------------------------------------------------
def test_switching_checkpoints_does_not_reload_the_base_model(service, monkeypatch):
    import diffsynth_edit.app.editor_setup as editor_setup_mod
    import diffsynth_edit.loading as loading_mod

    def no_reload(*a, **k):
        raise AssertionError("the base model was reloaded")

    monkeypatch.setattr(editor_setup_mod, "load_pipeline", no_reload)
    monkeypatch.setattr(loading_mod, "load_pipeline", no_reload)
    pipe_id, dit_id = id(service.editor.pipe), id(service.editor.pipe.dit)
    img, mask = _image(), _mask()

    def run(ckpt="", strength=1.0):
        return service.generate(img, mask, "make it blue", checkpoint=ckpt, strength=strength, **FAST)

    base = run()
    a = run("runA/step-100.safetensors")
    assert service.checkpoint_loads == 1 and service.loaded == ("runA/step-100.safetensors", 1.0)
    a_again = run("runA/step-100.safetensors")
    assert service.checkpoint_loads == 1, "an unchanged (path, strength) must not reload"
    b = run("runB/step-7.safetensors")  # LoRA + STE: bridge mode, a sub image
    assert service.checkpoint_loads == 2
    a_half = run("runA/step-100.safetensors", 0.5)
    assert service.checkpoint_loads == 3, "a new strength reloads the LoRA"
    a_zero = run("runA/step-100.safetensors", 0.0)
    back = run("")
    assert service.editor.checkpoint is None and service.loaded is None

    arr = lambda o: np.asarray(o.image, dtype=np.int16)  # noqa: E731
    assert np.abs(arr(a) - arr(base)).max() > 0, "the LoRA must change the output"
    assert np.array_equal(arr(a), arr(a_again))
    assert np.abs(arr(a_half) - arr(a)).max() > 0
    assert np.abs(arr(a_zero) - arr(base)).max() <= 1, "strength 0 is the base model"
    assert np.array_equal(arr(back), arr(base)), "unloading must restore the base model exactly"
    assert base.sub_image is None and base.settings["mode"] == "plain"
    assert b.sub_image is not None and b.settings["mode"] == "bridge"
    assert a.settings["mode"] == "plain"  # runA has no STE: the previous STE is gone too
    assert (id(service.editor.pipe), id(service.editor.pipe.dit)) == (pipe_id, dit_id)


# ---- requests ----------------------------------------------------------------------------------------------------
def test_output_sizes_and_settings(service, tmp_path):
    img = _image(160, 96)
    p = tmp_path / "in.png"
    img.save(p)
    _mask(160, 96, (32, 16, 96, 64)).save(tmp_path / "m.png")
    _image(64, 64, 2).save(tmp_path / "ref2.png")
    refs = [_image(64, 64, 1), (str(tmp_path / "ref2.png"), "caption")]  # PIL, and a gallery's (path, caption)
    out = service.generate(str(p), str(tmp_path / "m.png"), "x", references=refs,
                           checkpoint="runB/step-7.safetensors", sampler="lbm", steps=2, cfg=1.0, seed=-1,
                           blend_alpha=0.5)
    assert out.image.size == (160, 96) and out.source.size == (160, 96)
    assert out.sub_image.size == (64, 48)  # the mask box, 16-aligned
    s = out.settings
    assert s["sampler"] == "lbm" and s["steps"] == 2 and s["blend_alpha"] == 0.5 and s["references"] == 2
    assert 0 <= s["seed"] <= 2**32 - 1 and any("random seed" in n for n in s["notices"])
    assert s["size"] == [160, 96] and s["mask"] == "given"


def test_upload_over_the_limit_is_downscaled_with_a_notice(service):
    service.max_upload_pixels = 64 * 48
    try:
        out = service.generate(_image(256, 192), _mask(256, 192, (64, 64, 192, 160)), "x", **FAST)
    finally:
        service.max_upload_pixels = 4096 * 4096
    assert any("downscaled to 64x48" in n for n in out.notices), out.notices
    assert out.settings["input_size"] == [256, 192]
    assert out.image.size[0] * out.image.size[1] <= 64 * 48


def test_limit_pixels_keeps_aspect():
    im, note = limit_pixels(Image.new("RGB", (4000, 1000)), 1000 * 1000)
    assert im.size[0] * im.size[1] <= 1000 * 1000 and abs(im.size[0] / im.size[1] - 4) < 0.01 and note
    im2, note2 = limit_pixels(im, 1000 * 1000)
    assert im2 is im and note2 is None


def test_mask_of_another_size(service):
    out = service.generate(_image(96, 64), _mask(48, 32, (8, 8, 32, 24)), "x", **FAST)
    assert out.image.size == (96, 64)
    assert any("mask resized" in n for n in out.notices)
    with pytest.raises(AppInputError, match="aspect ratio"):
        service.generate(_image(96, 64), _mask(64, 64, (8, 8, 32, 24)), "x", **FAST)


@pytest.mark.parametrize("bad, match", [
    (dict(steps=-5), "steps"),
    (dict(steps=2.5), "whole number"),
    (dict(sampler="euler"), "unknown sampler"),
    (dict(sampler="lbm", steps=5), "steps"),
    (dict(cfg=float("nan")), "cfg"),
    (dict(cfg="abc"), "cfg"),
    (dict(seed="abc"), "seed"),
    (dict(blend_alpha=2.0), "blend_alpha"),
    (dict(strength=float("inf"), checkpoint="runA/step-100.safetensors"), "strength"),
    (dict(prompt=123), "prompt"),
    (dict(references=[_image()] * 4), "reference"),
    (dict(checkpoint=12), "checkpoint"),
])
def test_bad_requests_raise_app_input_error(service, bad, match):
    kwargs = dict(image=_image(), mask=_mask(), prompt="x", **FAST) | bad
    with pytest.raises(AppInputError, match=match):
        service.generate(**kwargs)


def test_bad_image_files(service, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("this is no image")
    with pytest.raises(AppInputError, match="not a readable image"):
        service.generate(str(junk), None, "x", **FAST)
    with pytest.raises(AppInputError, match="not found"):
        service.generate(str(tmp_path / "missing.png"), None, "x", **FAST)
    with pytest.raises(AppInputError, match="empty"):
        service.generate(_image(), Image.new("L", (64, 48), 0), "x", **FAST)
    import diffsynth_edit.app.uploads as images_mod

    _image().save(tmp_path / "ok.png")
    old, images_mod.HARD_PIXEL_LIMIT = images_mod.HARD_PIXEL_LIMIT, 100
    try:
        with pytest.raises(AppInputError, match="too large"):
            service.generate(str(tmp_path / "ok.png"), None, "x", **FAST)
    finally:
        images_mod.HARD_PIXEL_LIMIT = old
    # the service still works afterwards
    assert service.generate(_image(), None, "x", **FAST).image.size == (64, 48)


# ---- the editor's value -> (image, mask) ---------------------------------------------------------------------------
def test_mask_from_the_brush_layer_alpha():
    bg = Image.new("RGBA", (80, 60), (10, 20, 30, 255))
    layer = Image.new("RGBA", (80, 60), (0, 0, 0, 0))
    layer.paste((255, 42, 109, 150), (10, 10, 30, 40))           # semi-transparent paint still counts
    layer2 = Image.new("RGBA", (40, 30), (0, 0, 0, 0))            # another layer at half size: resized
    layer2.paste((255, 255, 255, 255), (30, 20, 35, 25))
    composite = Image.new("RGBA", (80, 60), (255, 0, 0, 255))     # never used for the mask
    image, mask, notes = mask_from_editor({"background": bg, "layers": [layer, layer2], "composite": composite})
    assert image is bg and mask.size == (80, 60) and not notes
    m = np.asarray(mask) > 127
    assert m[10:40, 10:30].all() and m[40:50, 60:70].all()
    assert m.sum() == 20 * 30 + 10 * 10
    image, mask, notes = mask_from_editor({"background": bg, "layers": [], "composite": bg})
    assert mask is None and "whole image" in notes[0]
    assert mask_from_editor(None) == (None, None, [])


def test_ui_value_through_the_service(service):
    bg = _image(96, 64).convert("RGBA")
    layer = Image.new("RGBA", (96, 64), (0, 0, 0, 0))
    layer.paste((255, 42, 109, 255), (16, 16, 48, 48))
    image, mask, notes = mask_from_editor({"background": bg, "layers": [layer], "composite": bg})
    out = service.generate(image, mask, "x", mask_source="painted", notices=notes, **FAST)
    assert out.settings["mask"] == "painted" and out.settings["box"] == [1, 3, 1, 3]


# ---- configuration and model set-up --------------------------------------------------------------------------------
def test_config_flags_and_preset(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    cfg = parse_app_config([])
    assert cfg.port == 7999 and cfg.bind_host == "127.0.0.1" and cfg.checkpoint_root == [Path("train")]
    cfg = parse_app_config(["--preset", str(repo / "configs/app.toml"), "--checkpoint-root", "a",
                            "--checkpoint-root", "b", "--host", "0.0.0.0", "--max-upload-pixels", "1000000"])
    assert cfg.checkpoint_root == [Path("a"), Path("b")] and cfg.bind_host == "0.0.0.0"
    assert cfg.max_upload_pixels == 1_000_000
    assert parse_app_config(["--share"]).bind_host == "127.0.0.1"
    with pytest.raises(SystemExit):
        parse_app_config(["--lbm-steps", "9"])


def test_tiny_fallback_when_no_weights(tiny_root, tmp_path):
    from diffsynth_edit.app.editor_setup import build_editor
    from diffsynth_edit.loading import MissingWeightsError

    cfg = parse_app_config(["--model-root", str(tmp_path / "nothing"), "--tiny-root", str(tiny_root),
                            "--device", "cpu"])
    logs = []
    editor, notices = build_editor(cfg, log=logs.append)
    assert editor.hot_swap and editor.pipe.torch_dtype == torch.float32
    assert notices and "tiny" in notices[0] and "not found" in notices[0]
    cfg = parse_app_config(["--model-root", str(tmp_path / "nothing"), "--tiny-fallback", "false",
                            "--device", "cpu"])
    with pytest.raises(MissingWeightsError):
        build_editor(cfg, log=logs.append)


@pytest.mark.parametrize("flag", ["--compile", "--fp8"])
def test_speed_up_flags_need_cuda(tiny_root, flag):
    from diffsynth_edit.app.editor_setup import build_editor
    from diffsynth_edit.config import ConfigError

    cfg = parse_app_config(["--tiny", "--tiny-root", str(tiny_root), "--device", "cpu", flag])
    assert cfg.compile or cfg.fp8
    with pytest.raises(ConfigError, match="need a CUDA device"):
        build_editor(cfg, log=lambda s: None)


def test_fp8_fast_accum_needs_fp8(tiny_root, capsys):
    with pytest.raises(SystemExit) as info:
        parse_app_config(["--tiny", "--tiny-root", str(tiny_root), "--fp8-fast-accum"])
    assert info.value.code == 2
    assert "`fp8-fast-accum` changes how the fp8 matmuls accumulate: it needs `fp8`" in capsys.readouterr().err
    cfg = parse_app_config(["--tiny", "--tiny-root", str(tiny_root), "--fp8", "--fp8-fast-accum"])
    assert cfg.fp8 and cfg.fp8_fast_accum


def test_fp8_keep_bf16_names_block_linears_and_needs_fp8(tiny_root, capsys):
    base = ["--tiny", "--tiny-root", str(tiny_root)]
    for extra, message in ((["--fp8-keep-bf16", "img_mlp.net.2"], "it needs `fp8`"),
                           (["--fp8", "--fp8-keep-bf16", "img_mlp"], "'img_mlp' is not a token linear")):
        with pytest.raises(SystemExit) as info:
            parse_app_config(base + extra)
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    cfg = parse_app_config(base + ["--fp8", "--fp8-keep-bf16", "img_mlp.net.0.proj,img_mlp.net.2"])
    assert cfg.fp8_keep_bf16 == ["img_mlp.net.0.proj", "img_mlp.net.2"]


# ---- output PNGs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,size", [("RGB", (1024, 768)), ("RGB", (1, 1)), ("RGBA", (33, 517)), ("L", (7, 1)),
                                       ("LA", (3, 65)), ("P", (20, 10)), ("I;16", (9, 9))])
def test_fast_png_reads_back_bit_for_bit(mode, size):
    import io

    from diffsynth_edit.app.png import encode_png

    rng = np.random.default_rng(0)
    if mode in ("RGB", "RGBA", "LA", "L"):
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
        shape = (size[1], size[0]) + ((channels,) if channels > 1 else ())
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    else:  # other modes go through Pillow
        image = Image.new(mode, size)
    for threads in (1, 4):  # 4 bands for the 1024x768 image: one zlib stream joined from four deflate bands
        data = encode_png(image, threads=threads)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        back = Image.open(io.BytesIO(data))
        back.load()
        assert back.mode == image.mode and back.size == image.size
        assert np.array_equal(np.asarray(back), np.asarray(image))


def test_fast_png_is_no_larger_than_pillow_on_a_photo_like_image():
    """Up filter + run-length deflate: about Pillow's compress_level=1 size on smooth images with noise."""
    import io

    from diffsynth_edit.app.png import encode_png

    yy, xx = np.mgrid[0:256, 0:256].astype(np.float32)
    arr = np.stack([xx, yy, 128 + 100 * np.sin(xx / 17.0) * np.cos(yy / 11.0)], -1)
    arr += np.random.default_rng(1).integers(-6, 7, arr.shape)
    image = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    pil = io.BytesIO()
    image.save(pil, format="PNG", compress_level=1)
    assert len(encode_png(image)) <= 1.1 * pil.tell()



# ---- extra LoRAs stacked on the checkpoint ---------------------------------------------------------------------------
@pytest.fixture()
def lora_service(app_pipe, tmp_path):
    """A service over its own root holding a checkpoint and two third-party LoRAs (Lightning and kohya layouts)."""
    from diffsynth_edit.app.service import EditService
    from diffsynth_edit.app.testing import lora_state_for
    from diffsynth_edit.checkpoint import parse_state_dict
    from diffsynth_edit.editing.editor import Editor
    from diffsynth_edit.lora_formats import to_layout
    from safetensors.torch import save_file

    root = tmp_path / "root"
    make_test_checkpoint(app_pipe.dit, root / "run" / "step-5.safetensors", step=5, seed=1)
    for name, layout, seed in (("lightning", "lightning", 11), ("style", "kohya", 12)):
        lora = parse_state_dict(lora_state_for(app_pipe.dit, seed=seed)).lora
        lora.scale = {m: 0.5 for m in lora.modules}
        (root / "loras").mkdir(parents=True, exist_ok=True)
        save_file(to_layout(lora, layout), str(root / "loras" / f"{name}.safetensors"))
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(to_layout(parse_state_dict(lora_state_for(app_pipe.dit, seed=13)).lora, "comfyui"),
              str(outside / "evil.safetensors"))
    editor = Editor(app_pipe, variant="2511", hot_swap=True)
    svc = EditService(editor, [root], max_pixels=256 * 256, max_extra_loras=2)
    yield svc
    editor.set_extra_loras([])
    editor.unload_checkpoint()


def test_extra_loras_are_listed_applied_hot_swapped_and_removed(lora_service):
    svc = lora_service
    values = [v for _, v in svc.lora_choices()]
    assert values == ["", "loras/lightning.safetensors", "loras/style.safetensors", "run/step-5.safetensors"]
    kw = dict(checkpoint="run/step-5.safetensors", **FAST)
    base = svc.generate(_image(), _mask(), "p", **kw)
    assert base.settings["extra_loras"] == []
    one = svc.generate(_image(), _mask(), "p", loras="loras/lightning.safetensors:0.8", **kw)
    assert [(x["name"], x["layout"], x["strength"]) for x in one.settings["extra_loras"]] == [
        ("loras/lightning.safetensors", "lightning", 0.8)]
    assert "extra LoRAs: loras/lightning.safetensors @ 0.8" in one.notices
    assert np.asarray(one.image).tobytes() != np.asarray(base.image).tobytes()
    again = svc.generate(_image(), _mask(), "p", loras=[["loras/lightning.safetensors", 0.8]], **kw)
    assert not any("extra LoRAs" in n for n in again.notices), "an unchanged list must not be re-applied"
    assert np.asarray(again.image).tobytes() == np.asarray(one.image).tobytes()
    first = svc.editor.extra_loras[0]
    two = svc.generate(_image(), _mask(), "p", loras="loras/lightning.safetensors:0.8, loras/style.safetensors", **kw)
    assert svc.editor.extra_loras[0] is first, "an unchanged LoRA keeps its layer (and its tensors on the device)"
    assert [x["layout"] for x in two.settings["extra_loras"]] == ["lightning", "kohya"]
    assert np.asarray(two.image).tobytes() != np.asarray(one.image).tobytes()
    back = svc.generate(_image(), _mask(), "p", loras=[{"name": "loras/lightning.safetensors", "strength": 0.8}],
                        **kw)
    assert np.asarray(back.image).tobytes() == np.asarray(one.image).tobytes()
    gone = svc.generate(_image(), _mask(), "p", loras="", **kw)
    assert "extra LoRAs removed" in gone.notices
    assert np.asarray(gone.image).tobytes() == np.asarray(base.image).tobytes()


@pytest.mark.parametrize("loras,match", [
    ("../outside/evil.safetensors", "inside the checkpoint roots"),
    ("loras/none.safetensors", "no checkpoint"),
    ("loras/lightning.safetensors:9", "out of range"),
    ("loras/lightning.safetensors, loras/lightning.safetensors:0.5", "listed twice"),
    ("loras/lightning.safetensors, loras/style.safetensors, run/step-5.safetensors", "at most 2"),
    (42, "text or a list"),
])
def test_bad_extra_loras_are_refused_and_the_service_stays_usable(lora_service, loras, match):
    with pytest.raises(AppInputError, match=match):
        lora_service.generate(_image(), _mask(), "p", loras=loras, **FAST)
    assert lora_service.generate(_image(), _mask(), "p", **FAST).settings["extra_loras"] == []


def test_extra_lora_with_ste_keys_is_refused_naming_the_key(lora_service, app_pipe):
    root = lora_service.roots[0]
    make_test_checkpoint(app_pipe.dit, root / "run" / "step-9.safetensors", step=9, seed=2, with_ste=True)
    with pytest.raises(AppInputError, match=r"LoRA run/step-9.safetensors: key 'pipe\.ste\..*STE weight"):
        lora_service.generate(_image(), _mask(), "p", loras="run/step-9.safetensors", **FAST)


def test_unknown_schedule_refused_lightning_schedule_applied(lora_service):
    with pytest.raises(AppInputError, match="unknown schedule 'fast'"):
        lora_service.generate(_image(), _mask(), "p", schedule="fast", **FAST)
    out = lora_service.generate(_image(), _mask(), "p", schedule="lightning", **FAST)
    assert out.settings["schedule"] == "lightning"
