"""Third-party LoRAs: every published key layout read from files built from the tiny DiT's module names, refusals that
name the key, exact stacking (merged delta = Σ B·A·scale·strength; removing one restores the previous weights), the
editor's hot-swapped extra LoRAs and `edit_images.py --lora`."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from diffsynth_edit.checkpoint import LoRAWeights
from diffsynth_edit.lora_formats import (LAYOUTS, LoRAFormatError, detect_layout, lora_layer, parse_lora_state_dict,
                                         read_lora_file, to_layout)
from diffsynth_edit.lora_stack import LoRALayer, LoRAStack, LoRAStackError, module_delta

BLOCK_MODULES = ("attn.to_q", "attn.to_k", "attn.add_v_proj", "attn.to_out.0", "img_mlp.net.0.proj",
                 "txt_mlp.net.2", "img_mod.1")
TOP_MODULES = ("img_in", "proj_out")


def _linears(dit) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear)}


def make_lora(dit, seed: int, rank: int = 4, modules=None, alpha: float | None = 2.0,
              dtype=torch.float64) -> LoRAWeights:
    """Random non-zero A, B for `modules` (default: blocks 0 and 1 of BLOCK_MODULES plus TOP_MODULES); with `alpha`,
    scale alpha / rank on every other module (the rest without alpha, scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    linears = _linears(dit)
    if modules is None:
        modules = [f"transformer_blocks.{i}.{m}" for i in (0, 1) for m in BLOCK_MODULES] + list(TOP_MODULES)
    lora = LoRAWeights()
    for i, name in enumerate(modules):
        out_f, in_f = linears[name].out_features, linears[name].in_features
        a = torch.randn(rank, in_f, generator=gen, dtype=torch.float64) / in_f ** 0.5
        b = torch.randn(out_f, rank, generator=gen, dtype=torch.float64) / rank ** 0.5
        lora.modules[name] = (a.to(dtype), b.to(dtype))
        if alpha is not None and i % 2 == 0:
            lora.scale[name] = alpha / rank
    return lora


@pytest.fixture(scope="module")
def dit64(tiny_pipe):
    """A float64 copy of the tiny DiT (the shared pipeline is never mutated)."""
    return copy.deepcopy(tiny_pipe.dit).double()


def _save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _expected_delta(lora: LoRAWeights, module: str, strength: float) -> torch.Tensor:
    a, b = (t.double() for t in lora.modules[module])
    return torch.einsum("or,ri->oi", b, a) * lora.scale.get(module, 1.0) * strength


# ---- layouts --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("alpha", [True, False])
def test_every_layout_reads_back_the_same_delta(dit64, tmp_path, layout, alpha):
    lora = make_lora(dit64, seed=1)
    path = _save(to_layout(lora, layout, alpha=alpha), tmp_path / f"{layout}.safetensors")
    got = read_lora_file(path, dit64)
    assert got.layout == layout and set(got.lora.modules) == set(lora.modules)
    for module in lora.modules:
        expected = _expected_delta(lora, module, 1.0)
        delta = module_delta([LoRALayer("x", got.lora)], module, torch.float64)
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-13 * expected.abs().max().item())
        if alpha and layout != "diffsynth":  # the file keeps A as it is and the alpha beside it
            assert torch.equal(got.lora.modules[module][0], lora.modules[module][0])


def test_published_layouts_by_hand(dit64):
    """Key names written out as the publishers write them (not through `to_layout`)."""
    lin = _linears(dit64)
    q, mlp = lin["transformer_blocks.0.attn.to_q"], lin["transformer_blocks.1.img_mlp.net.0.proj"]
    gen = torch.Generator().manual_seed(0)

    def pair(mod, rank=8):
        return (torch.randn(rank, mod.in_features, generator=gen).bfloat16(),
                torch.randn(mod.out_features, rank, generator=gen).bfloat16())

    (a, b), (a2, b2) = pair(q), pair(mlp)
    lightning = {  # lightx2v Qwen-Image(-Edit) Lightning: no prefix, lora_down/lora_up, alpha ≠ rank
        "transformer_blocks.0.attn.to_q.lora_down.weight": a, "transformer_blocks.0.attn.to_q.lora_up.weight": b,
        "transformer_blocks.0.attn.to_q.alpha": torch.tensor(1.0, dtype=torch.bfloat16),
        "transformer_blocks.1.img_mlp.net.0.proj.lora_down.weight": a2,
        "transformer_blocks.1.img_mlp.net.0.proj.lora_up.weight": b2,
        "transformer_blocks.1.img_mlp.net.0.proj.alpha": torch.tensor(4.0),
    }
    got = parse_lora_state_dict(lightning, dit64)
    assert got.layout == "lightning"
    assert got.lora.scale == {"transformer_blocks.0.attn.to_q": 1 / 8, "transformer_blocks.1.img_mlp.net.0.proj": 0.5}
    kohya = {"lora_unet_transformer_blocks_1_img_mlp_net_0_proj.lora_down.weight": a2,
             "lora_unet_transformer_blocks_1_img_mlp_net_0_proj.lora_up.weight": b2,
             "lora_unet_transformer_blocks_1_img_mlp_net_0_proj.alpha": torch.tensor(8.0)}
    got = parse_lora_state_dict(kohya, dit64)
    assert got.layout == "kohya" and list(got.lora.modules) == ["transformer_blocks.1.img_mlp.net.0.proj"]
    assert got.lora.scale["transformer_blocks.1.img_mlp.net.0.proj"] == 1.0
    diffusers = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
                 "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b}
    got = parse_lora_state_dict(diffusers, dit64)
    assert got.layout == "diffusers" and got.lora.scale == {}  # no alpha: scale 1
    comfy = {"diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight": a,
             "diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight": b,
             "diffusion_model.transformer_blocks.0.attn.to_q.alpha": torch.tensor(2.0)}
    got = parse_lora_state_dict(comfy, dit64)
    assert got.layout == "comfyui" and got.lora.scale == {"transformer_blocks.0.attn.to_q": 0.25}
    peft = {"transformer_blocks.0.attn.to_q.lora_A.default.weight": a,
            "transformer_blocks.0.attn.to_q.lora_B.default.weight": b}
    assert parse_lora_state_dict(peft, dit64).layout == "diffsynth"


def test_detect_layout_refuses_mixed_prefixes():
    with pytest.raises(LoRAFormatError, match="different prefixes.*transformer.x.lora_A.weight"):
        detect_layout(["transformer.x.lora_A.weight", "diffusion_model.x.lora_B.weight"])


@pytest.mark.parametrize("case,key", [
    ("unknown", "transformer_blocks.0.attn.to_q.diff"),
    ("missing_module", "transformer_blocks.7.attn.to_q.lora_A.weight"),
    ("not_linear", "transformer_blocks.0.attn.norm_q.lora_A.weight"),
    ("shape", "transformer_blocks.0.attn.to_q.lora_A.weight"),
    ("lonely", "transformer_blocks.0.attn.to_k.lora_A.weight"),
    ("alpha_alone", "transformer_blocks.0.attn.to_v.alpha"),
    ("ste", "pipe.ste.heads.0.weight"),
    ("kohya_unknown", "lora_unet_transformer_blocks_0_attn_to_qq.lora_down.weight"),
])
def test_misfitting_keys_are_refused_with_the_key_named(dit64, tmp_path, case, key):
    lin = _linears(dit64)
    q = lin["transformer_blocks.0.attn.to_q"]
    good = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, q.in_features),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(q.out_features, 2)}
    sd = dict(good)
    if case == "shape":
        sd[key] = torch.zeros(2, q.in_features + 1)
    elif case == "kohya_unknown":
        sd = {key: torch.zeros(2, 4), key.replace("down", "up"): torch.zeros(4, 2)}
    elif case in ("missing_module", "not_linear"):
        sd[key] = torch.zeros(2, 4)
        sd[key.replace("lora_A", "lora_B")] = torch.zeros(4, 2)
    else:
        sd[key] = torch.zeros(2, q.in_features) if case == "lonely" else torch.tensor(1.0)
    path = _save(sd, tmp_path / "bad.safetensors")
    with pytest.raises(LoRAFormatError) as info:
        read_lora_file(path, dit64)
    assert str(path) in str(info.value) and repr(key) in str(info.value), str(info.value)


def test_non_safetensors_and_damaged_files_refused(dit64, tmp_path):
    with pytest.raises(LoRAFormatError, match="only .safetensors"):
        read_lora_file(tmp_path / "x.pt", dit64)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAFormatError, match="not a readable safetensors"):
        read_lora_file(bad, dit64)
    with pytest.raises(LoRAFormatError, match="no such LoRA file"):
        read_lora_file(tmp_path / "none.safetensors", dit64)


# ---- stacking -------------------------------------------------------------------------------------------------------
def _weights(dit) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in _linears(dit).items()}


def test_merged_stack_is_the_sum_and_removal_restores_exactly(dit64):
    dit = copy.deepcopy(dit64)
    w0 = _weights(dit)
    layers = [LoRALayer("a", make_lora(dit, 1), 1.0),
              LoRALayer("b", make_lora(dit, 2, rank=3, alpha=6.0), 0.7),
              LoRALayer("c", make_lora(dit, 3, modules=["transformer_blocks.1.attn.to_q", "img_in"]), -1.3)]
    stack = LoRAStack(lambda: dit, mode="merge", keep_originals=True)
    snapshots = [w0]
    for i in range(len(layers)):
        stack.add(layers[i])
        snapshots.append(_weights(dit))
        now = snapshots[-1]
        for name in w0:
            expected = sum((_expected_delta(x.lora, name, x.strength) for x in layers[:i + 1]
                            if name in x.lora.modules), torch.zeros_like(w0[name]))
            tol = 4e-16 * (w0[name].abs().max() + expected.abs().max()).item()
            torch.testing.assert_close(now[name] - w0[name], expected, rtol=0, atol=tol)
    assert any(not torch.equal(snapshots[3][n], w0[n]) for n in w0)
    # removing the newest restores the previous weights exactly, down to the base
    for i in (2, 1, 0):
        stack.remove(layers[i].name)
        assert all(torch.equal(_weights(dit)[n], snapshots[i][n]) for n in w0), f"after removing {layers[i].name}"
    assert stack.originals == {}
    # removing one from the middle equals stacking the others from scratch
    stack.set_layers(layers)
    stack.remove("b")
    fresh = copy.deepcopy(dit64)
    LoRAStack(lambda: fresh, mode="merge", keep_originals=True).set_layers([layers[0], layers[2]])
    assert all(torch.equal(_weights(dit)[n], _weights(fresh)[n]) for n in w0)
    # a strength change is a recomputation from the originals, not an update of the merged weights
    stack.set_layers([layers[0], LoRALayer("c", layers[2].lora, 0.5)])
    stack.set_layers([layers[0], layers[2]])
    assert all(torch.equal(_weights(dit)[n], _weights(fresh)[n]) for n in w0)


def test_merged_stack_without_originals_only_grows(dit64):
    dit = copy.deepcopy(dit64)
    a, b = LoRALayer("a", make_lora(dit, 1)), LoRALayer("b", make_lora(dit, 2), 0.5)
    stack = LoRAStack(lambda: dit, mode="merge")
    stack.add(a)
    stack.add(b)
    w = _weights(dit)
    w0 = _weights(dit64)
    for name in w0:
        expected = sum((_expected_delta(x.lora, name, x.strength) for x in (a, b) if name in x.lora.modules),
                       torch.zeros_like(w0[name]))
        torch.testing.assert_close(w[name] - w0[name], expected, rtol=0,
                                   atol=8e-16 * (w0[name].abs().max() + expected.abs().max()).item())
    with pytest.raises(LoRAStackError, match="hot_swap=True"):
        stack.remove("a")
    assert all(torch.equal(_weights(dit)[n], w[n]) for n in w)  # the refusal changed nothing
    with pytest.raises(LoRAStackError, match="stacked twice"):
        stack.set_layers([a, b, LoRALayer("a", a.lora)])


def test_hot_stack_lists_sum_and_removal_restores_exactly(tiny_sources):
    from diffsynth_edit.loading import load_pipeline

    pipe = load_pipeline(tiny_sources, torch_dtype=torch.float64)
    pipe.dit = pipe.enable_lora_hot_loading(pipe.dit)
    dit = pipe.dit
    a, b = LoRALayer("a", make_lora(dit, 1), 0.8), LoRALayer("b", make_lora(dit, 2, rank=2), -0.5)
    stack = LoRAStack(lambda: dit, mode="hot")
    mods = dict(dit.named_modules())

    def lists():
        return {n: [(x, y) for x, y in zip(m.lora_A_weights, m.lora_B_weights)]
                for n, m in mods.items() if hasattr(m, "lora_A_weights")}

    empty = lists()
    stack.add(a)
    after_a = lists()
    stack.add(b)
    for name, pairs in lists().items():
        expected = sum((_expected_delta(x.lora, name, x.strength) for x in (a, b) if name in x.lora.modules),
                       torch.zeros(mods[name].out_features, mods[name].in_features, dtype=torch.float64))
        got = sum((bb @ aa for aa, bb in pairs), torch.zeros_like(expected))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-14 * (1 + expected.abs().max().item()))
    stack.remove("b")
    assert {n: [(x.data_ptr(), y.data_ptr()) for x, y in p] for n, p in lists().items()} == \
        {n: [(x.data_ptr(), y.data_ptr()) for x, y in p] for n, p in after_a.items()}
    stack.clear()
    assert all(not p for p in lists().values()) and all(not p for p in empty.values())


# ---- the editor -----------------------------------------------------------------------------------------------------
def _request():
    import numpy as np
    from PIL import Image

    from diffsynth_edit.editing.editor import EditRequest

    rng = np.random.default_rng(0)
    return EditRequest(image=Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)), prompt="make it red")


def test_editor_hot_swaps_extra_loras_on_a_checkpoint(tiny_sources, tmp_path):
    from diffsynth_edit.app.testing import make_test_checkpoint
    from diffsynth_edit.editing.editor import EditSettings, Editor
    from diffsynth_edit.loading import load_pipeline

    settings = EditSettings(steps=2, cfg_scale=1.0, seed=3)
    pipe = load_pipeline(tiny_sources, torch_dtype=torch.float32)
    editor = Editor(pipe, variant="2511", hot_swap=True)
    base = editor.edit(_request(), settings)
    ckpt = make_test_checkpoint(pipe.dit, tmp_path / "ckpt.safetensors", seed=5)
    light = _save(to_layout(make_lora(pipe.dit, 7, dtype=torch.bfloat16, alpha=1.0), "lightning"),
                  tmp_path / "lightning.safetensors")
    own = _save(to_layout(make_lora(pipe.dit, 8), "comfyui"), tmp_path / "own.safetensors")
    editor.load_checkpoint(ckpt)
    with_ckpt = editor.edit(_request(), settings)
    layers = [lora_layer(light, pipe.dit, 1.0), lora_layer(own, pipe.dit, 0.6)]
    editor.set_extra_loras(layers)
    stacked = editor.edit(_request(), settings)
    assert not torch.equal(stacked.latents, with_ckpt.latents)
    assert [(x["layout"], x["strength"]) for x in stacked.settings["extra_loras"]] == [("lightning", 1.0),
                                                                                     ("comfyui", 0.6)]
    editor.load_checkpoint(ckpt, strength=0.5)  # switching the checkpoint keeps the extras
    assert editor.extra_loras == layers and len(editor.loras.layers) == 3
    editor.load_checkpoint(ckpt)
    assert torch.equal(editor.edit(_request(), settings).latents, stacked.latents)
    editor.set_extra_loras([])
    assert torch.equal(editor.edit(_request(), settings).latents, with_ckpt.latents)
    editor.set_extra_loras(layers[1:])
    editor.unload_checkpoint()
    only_own = editor.edit(_request(), settings)
    assert only_own.settings["checkpoint"] is None and len(only_own.settings["extra_loras"]) == 1
    editor.set_extra_loras([])
    assert torch.equal(editor.edit(_request(), settings).latents, base.latents)

    # the same stack merged into the weights (a fresh fused editor) gives the same edit
    fused = Editor(load_pipeline(tiny_sources, torch_dtype=torch.float32), variant="2511")
    fused.load_checkpoint(ckpt)
    fused.set_extra_loras([lora_layer(light, fused.pipe.dit, 1.0), lora_layer(own, fused.pipe.dit, 0.6)])
    torch.testing.assert_close(fused.edit(_request(), settings).latents, stacked.latents, rtol=1e-4, atol=1e-5)
    with pytest.raises(LoRAStackError, match="hot_swap=True"):
        fused.set_extra_loras([])


# ---- edit_images.py --lora ------------------------------------------------------------------------------------------
def test_cli_stacks_loras_and_names_bad_files(tiny_root, tiny_pipe, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from diffsynth_edit.editing.cli import main
    from diffsynth_edit.editing.options import parse_lora_spec

    assert parse_lora_spec("a/b.safetensors:0.5") == (__import__("pathlib").Path("a/b.safetensors"), 0.5)
    assert parse_lora_spec("c:d.safetensors")[1] == 1.0
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    light = _save(to_layout(make_lora(tiny_pipe.dit, 7, dtype=torch.float32), "lightning"), tmp_path / "l.safetensors")
    kohya = _save(to_layout(make_lora(tiny_pipe.dit, 8, dtype=torch.float32), "kohya"), tmp_path / "k.safetensors")
    common = ["edit", "--image", tmp_path / "in.png", "--prompt", "x", "--model-root", tiny_root, "--steps", "2",
              "--cfg", "1", "--device", "cpu", "--progress", "false"]
    common = [str(c) for c in common]
    assert main([*common, "--out", str(tmp_path / "base")]) == 0
    assert main([*common, "--out", str(tmp_path / "out"), "--lora", f"{light}:0.8", "--lora", str(kohya)]) == 0
    info = json.loads((tmp_path / "out" / "in.json").read_text())
    assert [(x["name"], x["layout"], x["strength"]) for x in info["settings"]["extra_loras"]] == [
        (str(light), "lightning", 0.8), (str(kohya), "kohya", 1.0)]
    assert (tmp_path / "out" / "in.png").read_bytes() != (tmp_path / "base" / "in.png").read_bytes()

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*common, "--out", str(tmp_path / "x"), "--lora", str(tmp_path / "missing.safetensors")])
    assert info.value.code == 2 and "no such file" in capsys.readouterr().err
    bad = _save({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 3),
                 "transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3, 2)}, tmp_path / "bad.safetensors")
    assert main([*common, "--out", str(tmp_path / "y"), "--lora", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "'transformer_blocks.0.attn.to_q.lora_A.weight'" in err and str(bad) in err, err


# ---- the Lightning schedule -----------------------------------------------------------------------------------------
def test_lightning_schedule_is_shift_3_without_terminal_stretch():
    from diffsynth_edit.editing.sampling import flow_sigmas

    got = flow_sigmas(4, 1024, 1024, "lightning")
    s = torch.tensor([1.0, 0.75, 0.5, 0.25])
    torch.testing.assert_close(got, torch.cat([3 * s / (1 + 2 * s), torch.zeros(1)]), rtol=0, atol=1e-6)
    assert not torch.allclose(flow_sigmas(4, 1024, 1024), got)
    with pytest.raises(ValueError, match="schedule"):
        flow_sigmas(4, 64, 64, "karras")


def test_editor_and_service_take_the_schedule(editor):
    from diffsynth_edit.editing.editor import EditInputError, EditSettings

    qwen = editor.edit(_request(), EditSettings(steps=3, cfg_scale=1.0))
    light = editor.edit(_request(), EditSettings(steps=3, cfg_scale=1.0, schedule="lightning"))
    assert light.settings["schedule"] == "lightning" and not torch.equal(qwen.latents, light.latents)
    with pytest.raises(EditInputError, match="schedule"):
        EditSettings(schedule="fast").validate()
