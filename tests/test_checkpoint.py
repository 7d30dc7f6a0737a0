"""Checkpoint layouts into an Editor, refusals with named keys, and hot-swapping. Every test that fuses a LoRA gets
its own freshly loaded tiny pipeline (the session pipeline is never modified)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffsynth_edit.checkpoint import CheckpointError, parse_state_dict, read_checkpoint, write_checkpoint
from diffsynth_edit.editing.editor import Editor, EditRequest, EditSettings
from diffsynth_edit.loading import load_pipeline
from diffsynth_edit.ste import STE
from numerics import assert_close_scaled

RANK = 4
SETTINGS = EditSettings(steps=2, cfg_scale=2.0, seed=5)
MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_v_proj", "transformer_blocks.2.img_mod.1",
           "transformer_blocks.0.img_mlp.net.0.proj", "img_in", "proj_out")


def _request() -> EditRequest:
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 40, 48))
    return EditRequest(image=img, prompt="replace the object", mask=mask)


@pytest.fixture()
def fresh_pipe(tiny_sources):
    return load_pipeline(tiny_sources, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def base_latents(tiny_pipe):
    """Plain-mode output of the untouched tiny model."""
    latents = Editor(tiny_pipe, variant="2511").edit(_request(), SETTINGS).latents
    assert torch.isfinite(latents).all()
    return latents


def _linear(dit, name):
    return dict(dit.named_modules())[name]


def _lora(dit, seed=0, modules=MODULES, rank=RANK) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in modules:
        lin = _linear(dit, name)
        a = torch.randn(rank, lin.in_features, generator=g) * 0.2
        b = torch.randn(lin.out_features, rank, generator=g) * 0.2  # nonzero B: the LoRA has an effect
        out[name] = (a, b)
    return out


def _ste_state(dit, seed=0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    ste = STE.for_dit(dit)
    for head in ste.heads:
        torch.nn.init.normal_(head.weight, std=1.0)
    return {k: v.clone() for k, v in ste.state_dict().items()}


def _peft(lora) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in lora.items():
        out[f"{name}.lora_A.default.weight"] = a
        out[f"{name}.lora_B.default.weight"] = b
    return out


# ---- writers for each accepted layout -------------------------------------------------------------------------------
def write_design(path: Path, lora, ste=None, variant="2511") -> Path:
    meta = {"variant": variant, "zero_cond_t": variant == "2511", "lora_rank": RANK, "lora_alpha": RANK,
            "lora_targets": ["to_q"], "step": 10}
    return write_checkpoint(path, _peft(lora), ste, meta)


def write_original(path: Path, lora, ste=None) -> Path:
    sd = _peft(lora)
    for k, v in (ste or {}).items():
        sd[f"pipe.ste.{k}"] = v
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_prefixed(path: Path, lora, prefix: str) -> Path:
    sd = {}
    for name, (a, b) in lora.items():
        sd[f"{prefix}{name}.lora_A.weight"] = a
        sd[f"{prefix}{name}.lora_B.weight"] = b
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_down_up_alpha(path: Path, lora, alpha=2 * RANK) -> Path:
    """kohya style: lora_down/lora_up + per-module alpha; scale = alpha / rank (= 2 here), so A is stored halved."""
    sd = {}
    for name, (a, b) in lora.items():
        sd[f"{name}.lora_down.weight"] = a * (RANK / alpha)
        sd[f"{name}.lora_up.weight"] = b
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


LAYOUTS = {
    "design": lambda p, lora: write_design(p, lora),
    "original": lambda p, lora: write_original(p, lora),
    "diffusion_model": lambda p, lora: write_prefixed(p, lora, "diffusion_model."),
    "transformer": lambda p, lora: write_prefixed(p, lora, "transformer."),
    "down_up_alpha": lambda p, lora: write_down_up_alpha(p, lora),
}


# ---- accepted layouts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_loads_and_changes_output(fresh_pipe, tmp_path, base_latents, layout):
    path = LAYOUTS[layout](tmp_path / f"{layout}.safetensors", _lora(fresh_pipe.dit))
    ckpt = read_checkpoint(path)
    assert sorted(ckpt.lora.modules) == sorted(MODULES)
    editor = Editor(fresh_pipe, variant="2511")
    editor.load_checkpoint(path)
    assert editor.checkpoint is not None and editor.ste is None
    out = editor.edit(_request(), SETTINGS)
    assert out.sub_image is None
    assert not torch.equal(out.latents, base_latents)
    assert out.settings["checkpoint"] == str(path)


def test_all_layouts_give_identical_outputs(tiny_sources, tmp_path):
    lora = None
    results = {}
    for layout, writer in LAYOUTS.items():
        pipe = load_pipeline(tiny_sources, torch_dtype=torch.float32)
        lora = lora or _lora(pipe.dit)
        editor = Editor(pipe, variant="2511")
        editor.load_checkpoint(writer(tmp_path / f"{layout}.safetensors", lora))
        results[layout] = editor.edit(_request(), SETTINGS).latents
    ref = results.pop("design")
    for layout, latents in results.items():
        assert torch.equal(latents, ref), layout


@pytest.mark.parametrize("layout", ["design", "original"])
def test_ste_checkpoint_switches_to_bridge_mode(fresh_pipe, tmp_path, layout):
    ste = _ste_state(fresh_pipe.dit)
    lora = _lora(fresh_pipe.dit)
    path = (write_design if layout == "design" else write_original)(tmp_path / "c.safetensors", lora, ste)
    editor = Editor(fresh_pipe, variant="2511")
    editor.load_checkpoint(path)
    assert editor.bridge and editor.ste is not None
    assert not editor.ste.training
    for k, v in editor.ste.state_dict().items():
        assert torch.equal(v, ste[k]), k
    image, sub_image = editor.edit(_request(), SETTINGS)
    assert sub_image is not None and sub_image.size == (32, 32)
    # the trained gates matter: the same LoRA with a fresh (identity) STE gives another result
    with_trained = editor.edit(_request(), SETTINGS).sub_latents
    editor.ste = editor.ste_template()
    assert not torch.equal(editor.edit(_request(), SETTINGS).sub_latents, with_trained)


def test_ste_only_checkpoint(fresh_pipe, tmp_path):
    path = write_checkpoint(tmp_path / "ste.safetensors", {}, _ste_state(fresh_pipe.dit), {"variant": "2511"})
    editor = Editor(fresh_pipe, variant="2511")
    ckpt = editor.load_checkpoint(path)
    assert not ckpt.lora.modules and ckpt.has_ste and editor.bridge


def test_strength_zero_is_the_base_model(fresh_pipe, tmp_path, base_latents):
    editor = Editor(fresh_pipe, variant="2511")
    editor.load_checkpoint(write_design(tmp_path / "a.safetensors", _lora(fresh_pipe.dit)), strength=0.0)
    assert torch.equal(editor.edit(_request(), SETTINGS).latents, base_latents)


def test_metadata_alpha_scales_unless_folded():
    a, b = torch.ones(2, 3), torch.ones(5, 2)
    sd = {"x.lora_A.default.weight": a, "x.lora_B.default.weight": b}
    assert parse_state_dict(sd, {"lora_alpha": 8}).lora.scale["x"] == 4.0
    assert parse_state_dict(sd, {"lora_alpha": 8, "alpha_folded": True}).lora.scale.get("x", 1.0) == 1.0
    assert parse_state_dict(sd).lora.scale.get("x", 1.0) == 1.0
    sd2 = {"x.lora_down.weight": a, "x.lora_up.weight": b, "x.alpha": torch.tensor(1.0)}
    assert parse_state_dict(sd2).lora.scale["x"] == 0.5


def test_write_read_round_trip(tmp_path, tiny_pipe):
    lora = _lora(tiny_pipe.dit)
    ste = _ste_state(tiny_pipe.dit)
    path = write_design(tmp_path / "x.safetensors", lora, ste)
    ckpt = read_checkpoint(path)
    assert ckpt.variant == "2511" and ckpt.metadata["zero_cond_t"] is True and ckpt.metadata["step"] == 10
    assert ckpt.metadata["lora_targets"] == ["to_q"]
    assert ckpt.lora.rank == RANK
    for name, (a, b) in lora.items():
        assert torch.equal(ckpt.lora.modules[name][0], a) and torch.equal(ckpt.lora.modules[name][1], b)
    assert set(ckpt.ste) == set(ste)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in keys
    assert "pipe.ste.ste_blocks.0.proj_down.weight" in keys and "pipe.ste.heads.2.bias" in keys


# ---- refusals -------------------------------------------------------------------------------------------------------
def _refuse(editor: Editor, path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        editor.load_checkpoint(path)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert editor.checkpoint is None and editor.ste is None  # nothing half-loaded
    return msg


@pytest.fixture()
def plain_editor(tiny_pipe):
    """Refusals never touch the weights, so the session pipeline is safe here."""
    return Editor(tiny_pipe, variant="2511")


def test_refuse_lora_for_missing_module(plain_editor, tmp_path, tiny_pipe):
    lora = _lora(tiny_pipe.dit)
    lora["transformer_blocks.7.attn.to_q"] = tuple(t.clone() for t in lora["transformer_blocks.0.attn.to_q"])
    lora["transformer_blocks.0.attn.to_qq"] = tuple(t.clone() for t in lora["transformer_blocks.0.attn.to_q"])
    _refuse(plain_editor, write_design(tmp_path / "m.safetensors", lora), "does not have",
            "transformer_blocks.7.attn.to_q", "transformer_blocks.0.attn.to_qq", str(tmp_path / "m.safetensors"))


def test_refuse_inconsistent_rank(plain_editor, tmp_path, tiny_pipe):
    lora = _lora(tiny_pipe.dit)
    a, b = lora["img_in"]
    lora["img_in"] = (a, b[:, :3])
    _refuse(plain_editor, write_design(tmp_path / "r.safetensors", lora), "img_in", "low-rank pair", "(4, 64)",
            "(64, 3)")


def test_refuse_wrong_in_out_features(plain_editor, tmp_path, tiny_pipe):
    lora = _lora(tiny_pipe.dit)
    a, b = lora["transformer_blocks.0.attn.to_q"]
    lora["transformer_blocks.0.attn.to_q"] = (torch.randn(RANK, 3072), torch.randn(3072, RANK))
    _refuse(plain_editor, write_design(tmp_path / "s.safetensors", lora), "shapes do not fit",
            "transformer_blocks.0.attn.to_q", "3072x3072", "64x64")


def test_refuse_lonely_lora_half(plain_editor, tmp_path, tiny_pipe):
    sd = _peft(_lora(tiny_pipe.dit))
    del sd["img_in.lora_B.default.weight"]
    path = tmp_path / "h.safetensors"
    save_file(sd, str(path))
    _refuse(plain_editor, path, "only one of A/B", "img_in")


def test_refuse_ste_missing_block(plain_editor, tmp_path, tiny_pipe):
    ste = {k: v for k, v in _ste_state(tiny_pipe.dit).items() if not k.startswith(("ste_blocks.2.", "heads.2."))}
    msg = _refuse(plain_editor, write_design(tmp_path / "b.safetensors", _lora(tiny_pipe.dit), ste),
                  "missing STE keys", "heads.2.bias", "45 tensors expected, 30 found")
    assert "unexpected" not in msg


def test_refuse_ste_extra_block(plain_editor, tmp_path, tiny_pipe):
    ste = _ste_state(tiny_pipe.dit)
    big = STE(num_blocks=4, in_dim=tiny_pipe.dit.img_in.out_features).state_dict()
    ste.update({k: v for k, v in big.items() if k.startswith(("ste_blocks.3.", "heads.3."))})
    _refuse(plain_editor, write_design(tmp_path / "e.safetensors", {}, ste), "unexpected STE keys", "heads.3.weight")


def test_refuse_ste_for_another_width(plain_editor, tmp_path, tiny_pipe):
    ste = STE(num_blocks=3, in_dim=3072).state_dict()  # a full-size STE cut to 3 blocks
    _refuse(plain_editor, write_design(tmp_path / "w.safetensors", {}, ste), "STE shapes do not fit",
            "proj_down.weight (64, 3072) != (64, 64)")


def test_refuse_unrecognised_keys(plain_editor, tmp_path, tiny_pipe):
    sd = _peft(_lora(tiny_pipe.dit))
    sd["transformer_blocks.0.attn.to_q.weight"] = torch.zeros(64, 64)
    sd["optimizer.state.0"] = torch.zeros(1)
    path = tmp_path / "u.safetensors"
    save_file(sd, str(path))
    _refuse(plain_editor, path, "unrecognised keys", "transformer_blocks.0.attn.to_q.weight", "optimizer.state.0")


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth"])
def test_refuse_pickle_files(plain_editor, tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    torch.save({"x.lora_A.weight": torch.zeros(1, 1)}, path)
    _refuse(plain_editor, path, "only .safetensors", str(path))


def test_refuse_damaged_and_missing_files(plain_editor, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    _refuse(plain_editor, bad, "not a readable safetensors file")
    _refuse(plain_editor, tmp_path / "none.safetensors", "no such checkpoint file")


def test_refuse_variant_mismatch(plain_editor, tmp_path, tiny_pipe):
    path = write_design(tmp_path / "v.safetensors", _lora(tiny_pipe.dit), variant="2509")
    _refuse(plain_editor, path, "Qwen-Image-Edit-2509", "Qwen-Image-Edit-2511")


def test_refuse_empty_checkpoint(plain_editor, tmp_path):
    path = write_checkpoint(tmp_path / "empty.safetensors", {}, None, {"variant": "2511"})
    _refuse(plain_editor, path, "neither LoRA nor STE")


def test_refused_load_leaves_editor_usable(plain_editor, tmp_path, tiny_pipe, base_latents):
    path = write_design(tmp_path / "v.safetensors", _lora(tiny_pipe.dit), variant="2509")
    with pytest.raises(CheckpointError):
        plain_editor.load_checkpoint(path)
    assert torch.equal(plain_editor.edit(_request(), SETTINGS).latents, base_latents)


def test_fused_editor_refuses_second_lora(fresh_pipe, tmp_path):
    editor = Editor(fresh_pipe, variant="2511")
    editor.load_checkpoint(write_design(tmp_path / "a.safetensors", _lora(fresh_pipe.dit, seed=1)))
    with pytest.raises(CheckpointError, match="hot_swap"):
        editor.load_checkpoint(write_design(tmp_path / "b.safetensors", _lora(fresh_pipe.dit, seed=2)))


# ---- hot swap -------------------------------------------------------------------------------------------------------
def test_hot_swap_unload_and_switch(tiny_sources, tmp_path, base_latents):
    pipe = load_pipeline(tiny_sources, torch_dtype=torch.float32)
    editor = Editor(pipe, variant="2511", hot_swap=True)
    assert torch.equal(editor.edit(_request(), SETTINGS).latents, base_latents)
    path_a = write_design(tmp_path / "a.safetensors", _lora(pipe.dit, seed=1), _ste_state(pipe.dit, seed=1))
    path_b = write_down_up_alpha(tmp_path / "b.safetensors",
                                 _lora(pipe.dit, seed=2, modules=MODULES[:3] + ("transformer_blocks.1.txt_mod.1",)))

    editor.load_checkpoint(path_a)
    out_a = editor.edit(_request(), SETTINGS)
    assert editor.bridge and out_a.sub_image is not None
    editor.unload_checkpoint()
    assert editor.checkpoint is None and editor.ste is None and not editor.bridge
    assert torch.equal(editor.edit(_request(), SETTINGS).latents, base_latents)

    editor.load_checkpoint(path_a)
    assert torch.equal(editor.edit(_request(), SETTINGS).latents, out_a.latents)  # reload gives the same
    editor.load_checkpoint(path_b)  # switch without an explicit unload
    out_ab = editor.edit(_request(), SETTINGS)
    assert out_ab.sub_image is None  # B has no STE: back to plain mode

    fresh = Editor(load_pipeline(tiny_sources, torch_dtype=torch.float32), variant="2511", hot_swap=True)
    fresh.load_checkpoint(path_b)
    out_b = fresh.edit(_request(), SETTINGS)
    assert torch.equal(out_ab.latents, out_b.latents)
    assert not torch.equal(out_b.latents, base_latents)


def test_hot_swap_matches_fused(tiny_sources, tmp_path):
    pipe = load_pipeline(tiny_sources, torch_dtype=torch.float32)
    path = write_design(tmp_path / "a.safetensors", _lora(pipe.dit))
    hot = Editor(pipe, variant="2511", hot_swap=True)
    hot.load_checkpoint(path)
    fused = Editor(load_pipeline(tiny_sources, torch_dtype=torch.float32), variant="2511")
    fused.load_checkpoint(path)
    # W x + B(A x) vs (W + BA) x in float32 over a whole edit: scaled to the latents
    assert_close_scaled(hot.edit(_request(), SETTINGS).latents, fused.edit(_request(), SETTINGS).latents, 1e-4)


def test_fp8_editor_refuses_a_fused_checkpoint_load(fresh_pipe, tmp_path):
    """After `speed_up(fp8=True)` the bf16 weights are gone: a LoRA cannot be fused any more (hot-swap still works,
    the LoRA running beside the fp8 weights)."""
    from diffsynth_edit.checkpoint import CheckpointError

    editor = Editor(fresh_pipe, variant="2511")
    editor.fp8 = True  # what speed_up(fp8=True) sets (the quantisation itself needs an fp8 GPU)
    path = write_design(tmp_path / "a.safetensors", _lora(fresh_pipe.dit))
    with pytest.raises(CheckpointError, match="fp8.*hot_swap=True"):
        editor.load_checkpoint(path)
    assert editor.checkpoint is None
