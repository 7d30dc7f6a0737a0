"""The workspace DiT forward (`bridge_forward`): upstream equality in plain mode, STE RoPE routing, zero_cond_t
modulation per token, batching, gradient checkpointing and the STE module itself. Tiny float32 DiT on CPU."""
from __future__ import annotations

import copy

import pytest
import torch

from diffsynth_edit import bridge_dit
from diffsynth_edit.bridge_dit import DiTInputs, bridge_forward, swapped_sub_freqs
from diffsynth_edit.ste import STE, STEEncoderLayer
from numerics import FP32_REL, FP64_REL, assert_close_scaled

TEXT_DIM = 64


@pytest.fixture()
def dit(tiny_pipe):
    return tiny_pipe.dit


@pytest.fixture(scope="module")
def dit64(tiny_pipe):
    """The tiny DiT in float64: where two computations must agree exactly (up to rounding), they are compared here,
    so the claim does not depend on a CPU's float32 summation order."""
    return copy.deepcopy(tiny_pipe.dit).double()


def _double(inp: DiTInputs) -> DiTInputs:
    f = lambda t: None if t is None else (t.double() if t.is_floating_point() else t)  # noqa: E731
    return DiTInputs(latents=f(inp.latents), timestep=f(inp.timestep), prompt_emb=f(inp.prompt_emb),
                     prompt_emb_mask=inp.prompt_emb_mask, edit_latents=[f(e) for e in inp.edit_latents],
                     sub_latents=f(inp.sub_latents), subyx=inp.subyx)


def _inputs(batch=1, main_hw=(8, 12), sub_box=(1, 3, 2, 5), edit_hws=((8, 12), (6, 6)), txt_lens=(7,),
            timesteps=(600.0,), seed=0, with_sub=True) -> DiTInputs:
    """Latent sizes are in latent pixels (8 px); boxes in tokens (16 px)."""
    g = torch.Generator().manual_seed(seed)
    h, w = main_hw
    x = torch.randn(batch, 16, h, w, generator=g)
    txt_lens = list(txt_lens) * (batch if len(txt_lens) == 1 else 1)
    length = max(txt_lens)
    emb = torch.randn(batch, length, TEXT_DIM, generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(txt_lens):
        mask[i, :n] = 1
        emb[i, n:] = 0
    edits = [torch.randn(batch, 16, eh, ew, generator=g) for eh, ew in edit_hws]
    sub = subyx = None
    if with_sub:
        boxes = [sub_box] * batch if isinstance(sub_box[0], int) else list(sub_box)
        subyx = torch.tensor(boxes)
        hs, ws = 2 * (boxes[0][1] - boxes[0][0]), 2 * (boxes[0][3] - boxes[0][2])
        sub = torch.randn(batch, 16, hs, ws, generator=g)
    t = torch.tensor(list(timesteps) * (batch if len(timesteps) == 1 else 1), dtype=torch.float32)
    return DiTInputs(latents=x, timestep=t, prompt_emb=emb, prompt_emb_mask=mask, edit_latents=edits,
                     sub_latents=sub, subyx=subyx)


def _random_ste(dit, seed=1, std=1.0) -> STE:
    torch.manual_seed(seed)
    ste = STE.for_dit(dit)
    for head in ste.heads:
        torch.nn.init.normal_(head.weight, std=std)
    return ste.eval()


def _select(inp: DiTInputs, i: int) -> DiTInputs:
    n = int(inp.prompt_emb_mask[i].sum())
    return DiTInputs(latents=inp.latents[i:i + 1], timestep=inp.timestep[i:i + 1],
                     prompt_emb=inp.prompt_emb[i:i + 1, :n], prompt_emb_mask=inp.prompt_emb_mask[i:i + 1, :n],
                     edit_latents=[e[i:i + 1] for e in inp.edit_latents],
                     sub_latents=None if inp.sub_latents is None else inp.sub_latents[i:i + 1],
                     subyx=None if inp.subyx is None else inp.subyx[i:i + 1])


class BlockSpy:
    """Records the keyword arguments every DiT block is called with."""

    def __init__(self, dit):
        self.calls: list[dict] = []
        self.handles = [b.register_forward_pre_hook(self._hook, with_kwargs=True) for b in dit.transformer_blocks]

    def _hook(self, module, args, kwargs):
        self.calls.append(dict(kwargs))

    def close(self):
        for h in self.handles:
            h.remove()


# ---- plain mode == upstream ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("edit_hws", [((8, 12),), ((8, 12), (6, 6)), ()])
def test_plain_mode_equals_upstream_model_fn(dit, zero_cond_t, edit_hws):
    from diffsynth.pipelines.qwen_image import model_fn_qwen_image

    inp = _inputs(edit_hws=edit_hws, with_sub=False)
    with torch.no_grad():
        main, sub = bridge_forward(dit, inp, zero_cond_t=zero_cond_t)
        ref = model_fn_qwen_image(dit=dit, latents=inp.latents, timestep=inp.timestep, prompt_emb=inp.prompt_emb,
                                  prompt_emb_mask=inp.prompt_emb_mask, height=64, width=96,
                                  edit_latents=list(inp.edit_latents) or None, zero_cond_t=zero_cond_t)
    assert sub is None
    assert main.shape == ref.shape == inp.latents.shape
    assert torch.equal(main, ref)


def test_bridge_layout_matches_upstream_with_sub_as_first_reference(dit):
    """Without zero_cond_t and without routing, [main | sub | edit] with frames 0/1/2 is exactly upstream's layout
    with the sub latents passed as the first edit image: the main prediction must be identical."""
    from diffsynth.pipelines.qwen_image import model_fn_qwen_image

    inp = _inputs()
    with torch.no_grad():
        main, sub = bridge_forward(dit, inp, zero_cond_t=False)
        ref = model_fn_qwen_image(dit=dit, latents=inp.latents, timestep=inp.timestep, prompt_emb=inp.prompt_emb,
                                  prompt_emb_mask=inp.prompt_emb_mask, height=64, width=96,
                                  edit_latents=[inp.sub_latents, *inp.edit_latents], zero_cond_t=False)
    assert sub.shape == inp.sub_latents.shape
    assert torch.equal(main, ref)


# ---- STE routing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_fresh_ste_is_identity(dit, zero_cond_t):
    inp = _inputs()
    ste = STE.for_dit(dit).eval()
    with torch.no_grad():
        main_a, sub_a, gates = bridge_forward(dit, inp, ste=ste, zero_cond_t=zero_cond_t, return_gates=True)
        main_b, sub_b = bridge_forward(dit, inp, ste=None, zero_cond_t=zero_cond_t)
        main_c, sub_c = bridge_forward(dit, inp, gate_override=1.0, zero_cond_t=zero_cond_t)
    assert len(gates) == len(dit.transformer_blocks)
    assert all(bool((g == 1).all()) for g in gates)
    assert torch.equal(main_a, main_b) and torch.equal(sub_a, sub_b)
    assert torch.equal(main_c, main_b) and torch.equal(sub_c, sub_b)


def _main_rope_on_box(dit, main_tokens_hw, box, txt_len):
    """Independent expectation: the main image's RoPE (frame 0) at the cells of the box, row-major."""
    hm, wm = main_tokens_hw
    freqs, _ = dit.pos_embed([(1, hm, wm)], [txt_len], device=torch.device("cpu"))
    y1, y2, x1, x2 = box
    rows = [freqs[y * wm + x] for y in range(y1, y2) for x in range(x1, x2)]
    return torch.stack(rows)


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_gate_zero_only_swaps_sub_rope(dit64, monkeypatch, zero_cond_t):
    """gate 0 == a forward without routing whose sub RoPE was replaced by the main RoPE at the bbox (float64)."""
    dit = dit64
    inp = _double(_inputs())
    box = tuple(inp.subyx[0].tolist())
    with torch.no_grad():
        main0, sub0 = bridge_forward(dit, inp, gate_override=0.0, zero_cond_t=zero_cond_t)
        main1, sub1 = bridge_forward(dit, inp, gate_override=1.0, zero_cond_t=zero_cond_t)
    expected_sub = _main_rope_on_box(dit, (4, 6), box, 7)
    assert torch.equal(swapped_sub_freqs(dit.pos_embed([(1, 4, 6)], [7], device=torch.device("cpu"))[0], (4, 6),
                                         inp.subyx)[0], expected_sub)

    original = dit.pos_embed.forward
    n_main, n_sub = 24, expected_sub.shape[0]

    def patched(video_fhw, txt_seq_lens, device):
        vid, txt = original(video_fhw, txt_seq_lens, device)
        vid = vid.clone()
        vid[n_main:n_main + n_sub] = expected_sub
        return vid, txt

    monkeypatch.setattr(dit.pos_embed, "forward", patched)
    with torch.no_grad():
        main_exp, sub_exp = bridge_forward(dit, inp, ste=None, zero_cond_t=zero_cond_t)
    monkeypatch.undo()
    assert_close_scaled(main0, main_exp, FP64_REL, "main")
    assert_close_scaled(sub0, sub_exp, FP64_REL, "sub")
    # ... and the swap matters (the sub tokens' frame index differs from main's)
    assert float((sub0 - sub1).abs().max()) > 1e-3 * float(sub1.abs().max())


def test_gate_zero_with_full_box_makes_sub_a_copy_of_main(dit64):
    """Sub box = whole image and sub latents = main latents: with gate 0 every sub token has the content, RoPE and
    modulation of its main twin, so the sub prediction must equal the main prediction (not so with gate 1)."""
    inp = _double(_inputs(main_hw=(8, 12), sub_box=(0, 4, 0, 6)))
    inp.sub_latents = inp.latents.clone()
    with torch.no_grad():
        main0, sub0 = bridge_forward(dit64, inp, gate_override=0.0, zero_cond_t=True)
        main1, sub1 = bridge_forward(dit64, inp, gate_override=1.0, zero_cond_t=True)
    assert_close_scaled(sub0, main0, FP64_REL)
    assert float((sub1 - main1).abs().max()) > 1e-3 * float(main1.abs().max())


def test_ste_gates_route_sub_rope_per_block_and_token(dit):
    """Inspect the RoPE each block receives: main and edit tokens always keep theirs; each sub token gets its own
    RoPE where its gate is 1 and the main RoPE at its bbox cell where the gate is 0."""
    inp = _inputs(batch=2, sub_box=[(1, 3, 2, 5), (0, 2, 0, 3)], txt_lens=(7, 4), timesteps=(600.0, 300.0))
    ste = _random_ste(dit)
    spy = BlockSpy(dit)
    try:
        with torch.no_grad():
            _, _, gates = bridge_forward(dit, inp, ste=ste, zero_cond_t=True, return_gates=True)
    finally:
        spy.close()
    img_shapes = [(1, 4, 6), (1, 2, 3), (1, 4, 6), (1, 3, 3)]
    own, _ = dit.pos_embed(img_shapes, [7, 4], device=torch.device("cpu"))
    n_main, n_sub = 24, 6
    mixed = torch.cat(gates)
    assert bool((mixed == 0).any()) and bool((mixed == 1).any()), "test needs both gate values"
    assert len(spy.calls) == len(dit.transformer_blocks)
    for block_id, call in enumerate(spy.calls):
        freqs = torch.view_as_complex(call["image_rotary_emb"][0].contiguous())  # bridge_forward passes (cos, sin)
        assert freqs.shape == (2, 1, own.shape[0], own.shape[1])
        gate = gates[block_id] > 0.5  # exactness of the 0/1 values is checked in test_gate_values_are_exactly_0_or_1
        for b in range(2):
            f = freqs[b, 0]
            assert torch.equal(f[:n_main], own[:n_main])
            assert torch.equal(f[n_main + n_sub:], own[n_main + n_sub:])
            main_on_box = _main_rope_on_box(dit, (4, 6), tuple(inp.subyx[b].tolist()), 7)
            for j in range(n_sub):
                expected = own[n_main + j] if gate[b, j] else main_on_box[j]
                # gate·own + (1 - gate)·swapped with a gate of exactly 0 or 1 selects one of them exactly
                assert torch.equal(f[n_main + j], expected), f"block {block_id} sample {b} sub token {j}"


def test_ste_with_negative_bias_equals_gate_zero(dit):
    inp = _inputs()
    ste = STE.for_dit(dit).eval()
    for head in ste.heads:
        torch.nn.init.constant_(head.bias, -1.0)
    with torch.no_grad():
        a = bridge_forward(dit, inp, ste=ste, zero_cond_t=True)
        b = bridge_forward(dit, inp, gate_override=0.0, zero_cond_t=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sub_without_subyx_or_wrong_box_refused(dit):
    inp = _inputs()
    bad = copy.copy(inp)
    bad.subyx = None
    with pytest.raises(ValueError, match="without subyx"):
        bridge_forward(dit, bad)
    bad = copy.copy(inp)
    bad.subyx = torch.tensor([(0, 3, 0, 3)])
    with pytest.raises(ValueError, match="do not match"):
        bridge_forward(dit, bad)


# ---- zero_cond_t: modulation per token -----------------------------------------------------------------------------
@pytest.mark.parametrize("with_sub", [True, False])
def test_modulate_index_per_token(dit, with_sub):
    inp = _inputs(batch=2, txt_lens=(7, 5), timesteps=(700.0, 250.0), with_sub=with_sub)
    n_main, n_sub, n_edit = 24, 6 if with_sub else 0, 24 + 9
    spy = BlockSpy(dit)
    try:
        with torch.no_grad():
            bridge_forward(dit, inp, ste=STE.for_dit(dit) if with_sub else None, zero_cond_t=True)
            calls_on = list(spy.calls)
            spy.calls.clear()
            bridge_forward(dit, inp, zero_cond_t=False)
            calls_off = list(spy.calls)
    finally:
        spy.close()
    t = torch.tensor([700.0, 250.0]) / 1000
    temb_t = dit.time_text_embed(t, torch.float32)
    temb_0 = dit.time_text_embed(t * 0, torch.float32)
    for call in calls_on:
        idx = call["modulate_index"]
        assert idx.shape == (2, n_main + n_sub + n_edit)
        assert bool((idx[:, :n_main + n_sub] == 0).all()), "main and sub tokens must be modulated with t"
        assert bool((idx[:, n_main + n_sub:] == 1).all()), "edit tokens must be modulated with t = 0"
        temb = call["temb"]
        assert temb.shape[0] == 4
        torch.testing.assert_close(temb[:2], temb_t)  # chunk 0: t (also the text stream's)
        torch.testing.assert_close(temb[2:], temb_0)  # chunk 1: t = 0
    for call in calls_off:
        assert call["modulate_index"] is None
        torch.testing.assert_close(call["temb"], temb_t)


def test_modulation_per_token_values(dit):
    """Hook `_modulate` of block 0: rows with index 0 get t's shift/scale, rows with index 1 get t=0's."""
    inp = _inputs(batch=1, timesteps=(800.0,))
    block = dit.transformer_blocks[0]
    seen = []
    original = block._modulate

    def spy(x, mod_params, index=None):
        out = original(x, mod_params, index)
        if index is not None:
            seen.append((x, mod_params, index, out))
        return out

    block._modulate = spy
    try:
        with torch.no_grad():
            bridge_forward(dit, inp, ste=STE.for_dit(dit), zero_cond_t=True)
    finally:
        del block._modulate
    assert seen
    x, mod, index, (y, gate) = seen[0]
    shift, scale, g = mod.chunk(3, dim=-1)
    n_noisy = 24 + 6
    torch.testing.assert_close(y[0, :n_noisy], x[0, :n_noisy] * (1 + scale[0]) + shift[0])
    torch.testing.assert_close(y[0, n_noisy:], x[0, n_noisy:] * (1 + scale[1]) + shift[1])
    torch.testing.assert_close(gate[0, :n_noisy], g[0].expand(n_noisy, -1))
    torch.testing.assert_close(gate[0, n_noisy:], g[1].expand(y.shape[1] - n_noisy, -1))


# ---- batching ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_cond_t", [True, False])
@pytest.mark.parametrize("route", ["ste", "none", "plain"])
def test_batch_equals_per_sample(dit64, zero_cond_t, route):
    """float64: batching and padding change only the summation order."""
    dit = dit64
    inp = _double(_inputs(batch=3, sub_box=[(1, 3, 2, 5), (0, 2, 0, 3), (2, 4, 3, 6)], txt_lens=(7, 3, 11),
                          timesteps=(900.0, 500.0, 40.0), with_sub=route != "plain"))
    ste = _random_ste(dit).double() if route == "ste" else None
    with torch.no_grad():
        main, sub = bridge_forward(dit, inp, ste=ste, zero_cond_t=zero_cond_t)
        for i in range(3):
            m_i, s_i = bridge_forward(dit, _select(inp, i), ste=ste, zero_cond_t=zero_cond_t)
            assert_close_scaled(main[i:i + 1], m_i, FP64_REL, f"main {i}")
            if route == "plain":
                assert sub is None and s_i is None
            else:
                assert_close_scaled(sub[i:i + 1], s_i, FP64_REL, f"sub {i}")


def test_shared_edit_latents_broadcast_over_batch(dit):
    inp = _inputs(batch=2, txt_lens=(5, 5))
    shared = copy.copy(inp)
    shared.edit_latents = [e[:1] for e in inp.edit_latents]
    full = copy.copy(inp)
    full.edit_latents = [e[:1].expand(2, -1, -1, -1).clone() for e in inp.edit_latents]
    with torch.no_grad():
        a = bridge_forward(dit, shared, zero_cond_t=True)
        b = bridge_forward(dit, full, zero_cond_t=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_scalar_timestep_broadcasts_and_wrong_count_refused(dit):
    inp = _inputs(batch=2, txt_lens=(5, 5), timesteps=(300.0, 300.0))
    one = copy.copy(inp)
    one.timestep = torch.tensor([300.0])
    with torch.no_grad():
        a = bridge_forward(dit, inp, zero_cond_t=True)
        b = bridge_forward(dit, one, zero_cond_t=True)
    assert torch.equal(a[0], b[0])
    bad = copy.copy(inp)
    bad.timestep = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="timestep"):
        bridge_forward(dit, bad)


# ---- gradients -----------------------------------------------------------------------------------------------------
def _grads(dit, ste, inp, **kw):
    for p in list(dit.parameters()) + list(ste.parameters()):
        p.grad = None
    x = inp.latents.clone().requires_grad_(True)
    run = copy.copy(inp)
    run.latents = x
    main, sub = bridge_forward(dit, run, ste=ste, zero_cond_t=True, **kw)
    loss = main.square().mean() + sub.square().mean()
    loss.backward()
    out = {"latents": x.grad.clone()}
    out.update({f"dit.{n}": p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None})
    out.update({f"ste.{n}": p.grad.clone() for n, p in ste.named_parameters() if p.grad is not None})
    return loss.detach(), out


@pytest.fixture()
def trainable(tiny_pipe):
    dit = copy.deepcopy(tiny_pipe.dit).train().requires_grad_(True)
    ste = _random_ste(dit, std=0.3).train().requires_grad_(True)
    return dit, ste


@pytest.fixture()
def trainable64(tiny_pipe):
    dit = copy.deepcopy(tiny_pipe.dit).double().train().requires_grad_(True)
    ste = _random_ste(dit, std=0.3).double().train().requires_grad_(True)
    return dit, ste


@pytest.mark.parametrize("last_n", [None, 1, 2])
def test_gradient_checkpointing_same_gradients(trainable64, last_n):
    """Recomputation runs the same float64 ops; only gradient accumulation order may differ."""
    dit, ste = trainable64
    inp = _double(_inputs(batch=2, txt_lens=(7, 4), timesteps=(600.0, 100.0), sub_box=[(1, 3, 2, 5), (0, 2, 0, 3)]))
    loss_a, ga = _grads(dit, ste, inp)
    loss_b, gb = _grads(dit, ste, inp, use_gradient_checkpointing=True, checkpoint_last_n=last_n)
    assert torch.equal(loss_a, loss_b)
    assert set(ga) == set(gb)
    assert any(k.startswith("ste.heads") for k in ga) and any(k.startswith("dit.") for k in ga)
    for k in ga:
        assert_close_scaled(gb[k], ga[k], FP64_REL, k)


@pytest.mark.parametrize("last_n, expected", [(None, [0, 1, 2]), (1, [2]), (2, [1, 2]), (0, []), (10, [0, 1, 2])])
def test_checkpoint_last_n_selects_blocks(trainable, monkeypatch, last_n, expected):
    dit, ste = trainable
    assert len(dit.transformer_blocks) == 3
    seen = []
    real = bridge_dit.checkpoint

    def counting(fn, block, block_id, *args, **kw):
        seen.append(block_id)
        return real(fn, block, block_id, *args, **kw)

    monkeypatch.setattr(bridge_dit, "checkpoint", counting)
    inp = _inputs()
    main, sub = bridge_forward(dit, inp, ste=ste, zero_cond_t=True, use_gradient_checkpointing=True,
                               checkpoint_last_n=last_n)
    (main.mean() + sub.mean()).backward()
    assert seen == expected
    seen.clear()
    with torch.no_grad():  # no recomputation without autograd
        bridge_forward(dit, inp, ste=ste, zero_cond_t=True, use_gradient_checkpointing=True)
    assert seen == []


def test_straight_through_gradient_reaches_fresh_ste_head(tiny_pipe):
    dit = tiny_pipe.dit
    ste = STE.for_dit(dit).train().requires_grad_(True)
    inp = _inputs()
    main, sub, gates = bridge_forward(dit, inp, ste=ste, zero_cond_t=True, return_gates=True)
    assert all(bool((g == 1).all()) for g in gates), "a fresh STE must give gate 1 everywhere"
    (main.square().mean() + sub.square().mean()).backward()
    for i, head in enumerate(ste.heads):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, f"head {i} weight"
        assert head.bias.grad is not None and head.bias.grad.abs() > 0, f"head {i} bias"
    # the head is zero, so nothing flows further down yet
    assert all(p.grad is None or not p.grad.any() for p in ste.ste_blocks.parameters())
    assert not any(p.requires_grad for p in dit.parameters())


def test_gate_values_are_exactly_0_or_1(dit):
    """DESIGN: gate = 1[logit >= 0] in the forward pass. `hard + soft - soft.detach()` rounds (1 + s) - s to
    1 - 2**-24 for many s, so a 'gate 1' sub token gets a blend of its own and the swapped RoPE."""
    from diffsynth_edit.ste import straight_through_gate

    logits = torch.linspace(-4, 4, 801)
    gate = straight_through_gate(logits)
    assert set(gate.unique().tolist()) <= {0.0, 1.0}, sorted(set(gate.unique().tolist()))[:4]
    inp = _inputs()
    with torch.no_grad():
        _, _, gates = bridge_forward(dit, inp, ste=_random_ste(dit), zero_cond_t=True, return_gates=True)
    assert all(set(g.unique().tolist()) <= {0.0, 1.0} for g in gates)


def test_gate_forward_is_hard_and_backward_sigmoid():
    from diffsynth_edit.ste import straight_through_gate

    logits = torch.tensor([-2.0, -1e-3, 0.0, 0.5, 3.0], requires_grad=True)
    gate = straight_through_gate(logits)
    assert gate.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    gate.sum().backward()
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, s * (1 - s))


# ---- the STE module ------------------------------------------------------------------------------------------------
def test_ste_key_names_and_count(dit):
    ste = STE.for_dit(dit)
    sd = ste.state_dict()
    n = len(dit.transformer_blocks)
    assert len(sd) == 15 * n
    block0 = sorted(k for k in sd if k.startswith(("ste_blocks.0.", "heads.0.")))
    assert block0 == sorted([
        "ste_blocks.0.proj_down.weight", "ste_blocks.0.proj_down.bias",
        "ste_blocks.0.encoder.layers.0.self_attn.in_proj_weight",
        "ste_blocks.0.encoder.layers.0.self_attn.in_proj_bias",
        "ste_blocks.0.encoder.layers.0.self_attn.out_proj.weight",
        "ste_blocks.0.encoder.layers.0.self_attn.out_proj.bias",
        "ste_blocks.0.encoder.layers.0.linear1.weight", "ste_blocks.0.encoder.layers.0.linear1.bias",
        "ste_blocks.0.encoder.layers.0.linear2.weight", "ste_blocks.0.encoder.layers.0.linear2.bias",
        "ste_blocks.0.encoder.layers.0.norm1.weight", "ste_blocks.0.encoder.layers.0.norm2.weight",
        "ste_blocks.0.encoder.norm.weight", "heads.0.weight", "heads.0.bias"])
    assert sd["ste_blocks.0.proj_down.weight"].shape == (64, dit.img_in.out_features)
    assert sd["ste_blocks.0.encoder.layers.0.self_attn.in_proj_weight"].shape == (192, 64)
    assert sd["heads.0.weight"].shape == (1, 64)
    for i in range(n):
        assert not sd[f"heads.{i}.weight"].any() and not sd[f"heads.{i}.bias"].any()


def test_ste_train_and_eval_agree_no_dropout(dit):
    ste = _random_ste(dit)
    for m in ste.modules():
        assert not isinstance(m, torch.nn.Dropout)
        assert not isinstance(m, torch.nn.TransformerEncoderLayer)
    h = torch.randn(2, 40, dit.img_in.out_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ste.train()
        a = [ste.logits(h, i) for i in range(ste.num_blocks)]
        a2 = [ste.logits(h, i) for i in range(ste.num_blocks)]
        ste.eval()
        b = [ste.logits(h, i) for i in range(ste.num_blocks)]
    for x, x2, y in zip(a, a2, b):
        assert x.shape == (2, 40)
        assert torch.equal(x, x2) and torch.equal(x, y)


def test_ste_rows_equal_full_logits_and_gradients(dit):
    """The DiT asks only for the sub tokens' gates: restricting the queries to those rows gives the same logits and,
    for a loss on those rows, the same parameter gradients (also with a second encoder layer, which must then see
    all tokens). float64 inside; `logits` returns float32, so the comparisons allow float32 rounding scaled to the
    values (gradients reach about 80 here: an absolute 1e-6 in float32 failed on some CPUs)."""
    h = torch.randn(2, 40, dit.img_in.out_features, generator=torch.Generator().manual_seed(5)).double()
    rows = slice(25, 37)
    for extra_layer in (False, True):
        ste = _random_ste(dit).double().requires_grad_(True)
        if extra_layer:
            enc = ste.ste_blocks[1].encoder
            enc.layers.append(STEEncoderLayer().double())
            torch.nn.init.normal_(enc.layers[1].self_attn.in_proj_weight, std=0.3)
        full = ste.logits(h, 1)[:, rows]
        part = ste.logits(h, 1, rows)
        assert part.shape == (2, 12)
        assert_close_scaled(part, full, 1e-6, "logits")
        grads = []
        for out in (full, part):
            ste.zero_grad()
            (out.sin().sum()).backward(retain_graph=True)
            grads.append({n: p.grad.clone() for n, p in ste.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
        for n in grads[0]:
            assert_close_scaled(grads[1][n], grads[0][n], 1e-6, n)
        assert torch.equal(ste(h, 1, rows), (part >= 0).float())


def test_ste_per_sample_independent(dit):
    """The STE attends within a sample only: batching does not mix samples."""
    ste = _random_ste(dit)
    h = torch.randn(3, 30, dit.img_in.out_features, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ste.logits(h, 1)
        for i in range(3):
            assert_close_scaled(ste.logits(h[i:i + 1], 1), full[i:i + 1], FP32_REL, f"sample {i}")


def test_full_size_ste_parameter_count():
    with torch.device("meta"):
        ste = STE(num_blocks=60, in_dim=3072)
    assert sum(p.numel() for p in ste.parameters()) == 13_313_340
    assert len(ste.state_dict()) == 15 * 60
