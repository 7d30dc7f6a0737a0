"""The workspace DiT forward against the reference implementation of the released model: diffusers'
`QwenImageTransformer2DModel` holding the tiny model's weights (the module names are the same, so the state dict
loads without renaming). float32, CPU; 2509 (no zero_cond_t) and 2511 (zero_cond_t), one and two references, a
padded batch of two prompts of different lengths. Also the activation option and its checkpoint metadata."""
from __future__ import annotations

import copy

import pytest
import torch

from diffsynth_edit.activation import (DIFFSYNTH, REFERENCE, TanhGELU, checkpoint_activation, dit_activation,
                                       set_dit_activation)
from diffsynth_edit.bridge_dit import DiTInputs, bridge_forward, patchify, unpatchify
from diffsynth_edit.tiny import TINY_TEXT_DIM

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test dependency (pip install -e '.[test]')")

TOL = 1e-5  # fp32; outputs are O(1)


def reference_model(dit, zero_cond_t: bool):
    """diffusers' transformer with the tiny DiT's configuration and weights."""
    from diffusers import QwenImageTransformer2DModel

    blocks = dit.transformer_blocks
    heads = blocks[0].attn.num_heads
    dim = dit.img_in.out_features
    ref = QwenImageTransformer2DModel(
        patch_size=2, in_channels=dit.img_in.in_features, out_channels=dit.proj_out.out_features // 4,
        num_layers=len(blocks), attention_head_dim=dim // heads, num_attention_heads=heads,
        joint_attention_dim=dit.txt_in.in_features, axes_dims_rope=tuple(dit.pos_embed.axes_dim),
        zero_cond_t=zero_cond_t)
    missing, unexpected = ref.load_state_dict(dit.state_dict(), strict=True)
    assert not missing and not unexpected
    return ref.float().eval()


def reference_forward(ref, inp: DiTInputs) -> torch.Tensor:
    """diffusers' call for the plain layout [main | edit_1 ... edit_k]; returns the main prediction [B,16,H/8,W/8]."""
    x = inp.latents
    batch, hm, wm = x.shape[0], x.shape[2] // 2, x.shape[3] // 2
    shapes = [(1, hm, wm)] + [(1, e.shape[2] // 2, e.shape[3] // 2) for e in inp.edit_latents]
    tokens = torch.cat([patchify(x)] + [patchify(e) for e in inp.edit_latents], dim=1)
    out = ref(hidden_states=tokens, encoder_hidden_states=inp.prompt_emb, encoder_hidden_states_mask=inp.prompt_emb_mask,
              timestep=inp.timestep / 1000, img_shapes=[shapes] * batch, return_dict=False)[0]
    return unpatchify(out[:, :hm * wm], hm, wm)


def make_inputs(batch: int, n_refs: int, txt_lens: tuple[int, ...], seed: int = 0) -> DiTInputs:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 12, generator=g)
    refs = [torch.randn(batch, 16, *hw, generator=g) for hw in ((8, 12), (6, 10))[:n_refs]]
    length = max(txt_lens)
    emb = torch.randn(batch, length, TINY_TEXT_DIM, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(txt_lens):
        mask[i, :n] = 1
        emb[i, n:] = 0
    t = torch.tensor([700.0, 250.0][:batch])
    return DiTInputs(latents=x, timestep=t, prompt_emb=emb, prompt_emb_mask=mask, edit_latents=refs)


CASES = [pytest.param(1, 1, (9,), id="one-ref"), pytest.param(1, 2, (9,), id="two-refs"),
         pytest.param(2, 2, (11, 6), id="padded-batch")]


@pytest.mark.parametrize("variant", ["2509", "2511"])
@pytest.mark.parametrize("batch, n_refs, txt_lens", CASES)
def test_plain_forward_equals_diffusers(tiny_pipe, variant, batch, n_refs, txt_lens):
    from diffsynth_edit.variants import get_variant

    zero_cond_t = get_variant(variant).zero_cond_t
    dit = tiny_pipe.dit
    assert dit_activation(dit) == REFERENCE  # load_pipeline's default
    inp = make_inputs(batch, n_refs, txt_lens)
    ref = reference_model(dit, zero_cond_t)
    with torch.no_grad():
        expected = reference_forward(ref, inp)
        main, sub = bridge_forward(dit, inp, zero_cond_t=zero_cond_t)
    assert sub is None and main.shape == expected.shape == inp.latents.shape
    assert float(expected.abs().max()) > 0.1  # a real signal, not two zero tensors
    assert float((main - expected).abs().max()) <= TOL
    # The training path: gradients on, every block checkpointed.
    with torch.enable_grad():
        trained, _ = bridge_forward(dit, DiTInputs(**{**inp.__dict__, "latents": inp.latents.clone().requires_grad_()}),
                                    zero_cond_t=zero_cond_t, use_gradient_checkpointing=True)
    assert float((trained.detach() - expected).abs().max()) <= TOL


def test_diffsynth_approximation_is_the_option_and_differs(tiny_pipe):
    """sigmoid-1.702 computes diffsynth's `x·sigmoid(1.702x)` and is measurably off the reference, which is what
    the comparison above would catch; switching back restores the reference exactly."""
    dit = copy.deepcopy(tiny_pipe.dit)
    inp = make_inputs(1, 1, (9,))
    ref = reference_model(dit, True)
    with torch.no_grad():
        expected = reference_forward(ref, inp)
        assert set_dit_activation(dit, DIFFSYNTH) == 2 * len(dit.transformer_blocks)
        assert dit_activation(dit) == DIFFSYNTH
        approx, _ = bridge_forward(dit, inp, zero_cond_t=True)
        mlp = dit.transformer_blocks[0].img_mlp.net[0]
        h = torch.randn(4, mlp.proj.in_features)
        y = mlp.proj(h)
        assert torch.equal(mlp(h), y * torch.sigmoid(1.702 * y))
        set_dit_activation(dit, REFERENCE)
        assert isinstance(mlp, TanhGELU)
        assert torch.equal(mlp(h), torch.nn.functional.gelu(y, approximate="tanh"))
        back, _ = bridge_forward(dit, inp, zero_cond_t=True)
    assert float((approx - expected).abs().max()) > 1e-4
    assert float((back - expected).abs().max()) <= TOL
    assert set(dit.state_dict()) == set(tiny_pipe.dit.state_dict())  # keys unchanged by the switch


def test_checkpoint_activation_metadata():
    assert checkpoint_activation({"dit_activation": "gelu-tanh"}) == (REFERENCE, None)
    assert checkpoint_activation({"dit_activation": "sigmoid-1.702"}) == (DIFFSYNTH, None)
    # a workspace checkpoint from before the field (format marker or STE weights): diffsynth's approximation
    act, note = checkpoint_activation({"format": "qwen-edit-workspace/1"}, "old.safetensors")
    assert act == DIFFSYNTH and "old.safetensors" in note and "assuming diffsynth's" in note
    assert checkpoint_activation({}, "old.safetensors", has_ste=True)[0] == DIFFSYNTH
    # any other LoRA without the field (ComfyUI/diffusers exports): the released model's
    act, note = checkpoint_activation({}, "foreign.safetensors")
    assert act == REFERENCE and "assuming the released model's gelu-tanh" in note
    with pytest.raises(ValueError, match="dit_activation must be one of"):
        checkpoint_activation({"dit_activation": "relu"})


@pytest.mark.parametrize("choice, meta, expected, logged", [
    ("auto", {"dit_activation": "gelu-tanh"}, REFERENCE, None),
    ("auto", {"dit_activation": "sigmoid-1.702"}, DIFFSYNTH, None),
    ("auto", {"format": "qwen-edit-workspace/1"}, DIFFSYNTH, "assuming diffsynth's sigmoid-1.702"),
    ("auto", {}, REFERENCE, "assuming the released model's gelu-tanh"),
    ("gelu-tanh", {"format": "qwen-edit-workspace/1"}, REFERENCE, "running it with gelu-tanh as configured"),
])
def test_editor_honours_checkpoint_activation(tiny_sources, tmp_path, choice, meta, expected, logged):
    """The editor runs a checkpoint under the activation it was trained with (auto), an older checkpoint without
    the field under diffsynth's (said in the log), and goes back to its own choice when the checkpoint is unloaded."""
    from diffsynth_edit.app.testing import lora_state_for
    from diffsynth_edit.checkpoint import write_checkpoint
    from diffsynth_edit.editing.editor import Editor
    from diffsynth_edit.loading import load_pipeline

    pipe = load_pipeline(tiny_sources, components=("dit",), torch_dtype=torch.float32)
    path = write_checkpoint(tmp_path / "c.safetensors", lora_state_for(pipe.dit, 2, 0, 0.01), None,
                            {"variant": "2511", **meta})
    lines: list[str] = []
    editor = Editor(pipe, variant="2511", hot_swap=True, activation=choice, log=lines.append)
    assert editor.activation == REFERENCE
    editor.load_checkpoint(path)
    assert editor.activation == expected
    assert (logged is None and not lines) or (logged is not None and any(logged in m for m in lines)), lines
    editor.unload_checkpoint()
    assert editor.activation == REFERENCE
