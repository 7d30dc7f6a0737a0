"""The low-memory tier on CPU: fp8 base weights (exact against the dequantised weights), block swapping (exact
against the resident model, and its schedule), the trainer with both on, and the flags' errors."""
from __future__ import annotations

import copy
import csv

import pytest
import torch

from diffsynth_edit.block_swap import BlockSwapper
from diffsynth_edit.bridge_dit import DiTInputs, bridge_forward
from diffsynth_edit.config import ConfigError
from diffsynth_edit.fp8_base import dequantise, frozen_linears, quantise_frozen_blocks, to_fp8_linear
from diffsynth_edit.tiny import TinyQwenImageDiT
from diffsynth_edit.training.lora import inject_lora

F64_TOL = 1e-12  # float64: the fp8 path and the reference do the same operations; only summation order may differ


def _tiny_dit(dtype=torch.float64, layers=4, seed=0):
    torch.manual_seed(seed)
    dit = TinyQwenImageDiT(num_layers=layers).to(dtype)
    with torch.no_grad():
        for p in dit.parameters():  # random everything (the tiny default zeroes nothing here, but be explicit)
            p.normal_(0, 0.2)
    return dit.eval().requires_grad_(False)


def _inputs(dtype=torch.float64, seed=1) -> DiTInputs:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return DiTInputs(latents=r(1, 16, 8, 8), timestep=torch.tensor([600.0]), prompt_emb=r(1, 5, 64),
                     prompt_emb_mask=torch.ones(1, 5, dtype=torch.long), edit_latents=[r(1, 16, 8, 8)])


def _with_lora(dit, seed=2):
    params = inject_lora(dit, 4, 4.0, ["to_q", "img_mlp.net.2", "img_mod.1", "proj_out"], torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:  # B = 0 at init would leave A without gradient
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return params


def _loss_and_grads(dit, params, checkpointing=False, dtype=torch.float64):
    main, _ = bridge_forward(dit, _inputs(dtype), zero_cond_t=True, use_gradient_checkpointing=checkpointing)
    loss = (main ** 2).mean()
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


# ---- fp8 base ---------------------------------------------------------------------------------------------------
def test_fp8_linear_forward_backward_equal_dequantised_weight_float64():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24).double().requires_grad_(False)
    w = lin.weight.detach().clone()
    to_fp8_linear(lin)
    assert lin.fp8_weight.dtype == torch.float8_e4m3fn and lin.weight.numel() == 0
    w_deq = dequantise(lin.fp8_weight, lin.fp8_scale, torch.float64)
    # e4m3 keeps 3 mantissa bits: relative error ≤ 2^-4 for normal numbers, plus a subnormal floor
    assert bool(((w_deq - w).abs() <= w.abs() * 2 ** -4 + lin.fp8_scale.double() * 2 ** -9).all())
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = lin(x)
    y_ref = x_ref @ w_deq.t() + lin.bias
    assert (y - y_ref).abs().max() <= F64_TOL
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert (x.grad - x_ref.grad).abs().max() <= F64_TOL
    assert lin.weight.grad is None and lin.bias.grad is None


def test_fp8_refuses_trainable_linear():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="frozen linears only"):
        to_fp8_linear(lin)


def test_fp8_under_lora_equals_dequantised_dit_and_base_gets_no_grad():
    """peft's LoRA wraps the fp8 base layers: the loss and every LoRA gradient equal those of the same DiT whose
    frozen weights were replaced by their dequantised values (float64)."""
    dit = _tiny_dit()
    _with_lora(dit)
    ref = copy.deepcopy(dit)
    n = quantise_frozen_blocks(dit)
    assert n == 4 * 14  # per block: 8 attention, 2 x 2 MLP, 2 modulation linears
    for name, layer in dit.transformer_blocks.named_modules():
        if hasattr(layer, "fp8_weight"):
            ref.transformer_blocks.get_submodule(name).weight.data = dequantise(layer.fp8_weight, layer.fp8_scale,
                                                                                torch.float64)
    params = [p for n, p in dit.named_parameters() if "lora_" in n]
    ref_params = [p for n, p in ref.named_parameters() if "lora_" in n]
    loss, grads = _loss_and_grads(dit, params)
    ref_loss, ref_grads = _loss_and_grads(ref, ref_params)
    assert abs(loss - ref_loss) <= F64_TOL
    for g, rg in zip(grads, ref_grads):
        assert g is not None and bool(g.abs().sum() > 0)
        assert (g - rg).abs().max() <= F64_TOL * max(1.0, float(rg.abs().max()))
    assert all(not p.requires_grad for n, p in dit.named_parameters() if "lora_" not in n)
    assert all(p.dtype == torch.float64 for p in params)  # the LoRA keeps its own dtype


# ---- block swap -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_swapped_forward_backward_equals_resident(fp8, k):
    dit = _tiny_dit()
    _with_lora(dit)
    if fp8:
        quantise_frozen_blocks(dit)
    ref = copy.deepcopy(dit)
    swapper = BlockSwapper.attach(dit, k, "cpu")
    assert swapper.resident_blocks() == []
    params = [p for n, p in dit.named_parameters() if "lora_" in n]
    ref_params = [p for n, p in ref.named_parameters() if "lora_" in n]
    for _ in range(2):  # a second step starts from the state the first left
        loss, grads = _loss_and_grads(dit, params, checkpointing=True)
        ref_loss, ref_grads = _loss_and_grads(ref, ref_params, checkpointing=True)
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(g, rg) for g, rg in zip(grads, ref_grads))
    with torch.no_grad():  # editing: forwards only
        assert torch.equal(bridge_forward(dit, _inputs(), zero_cond_t=True)[0],
                           bridge_forward(ref, _inputs(), zero_cond_t=True)[0])


def test_attaching_again_replaces_the_swapper():
    """A second attach detaches the first (its hooks removed, its blocks back) before swapping anew, so hooks never
    stack; n = 0 only detaches."""
    dit = _tiny_dit()
    ref = copy.deepcopy(dit)
    BlockSwapper.attach(dit, 2, "cpu")
    second = BlockSwapper.attach(dit, 1, "cpu")
    assert dit._block_swapper is second and second.first == len(dit.transformer_blocks) - 1
    assert [len(b._forward_pre_hooks) for b in dit.transformer_blocks] == [1] * len(dit.transformer_blocks)
    with torch.no_grad():
        assert torch.equal(bridge_forward(dit, _inputs(), zero_cond_t=True)[0],
                           bridge_forward(ref, _inputs(), zero_cond_t=True)[0])
    assert BlockSwapper.attach(dit, 0, "cpu") is None and not hasattr(dit, "_block_swapper")
    assert [len(b._forward_pre_hooks) for b in dit.transformer_blocks] == [0] * len(dit.transformer_blocks)
    assert all(p.numel() > 0 for p in dit.parameters())


def test_swap_schedule_prefetches_one_ahead_and_frees_behind():
    """4 blocks, the last 3 swapped: forward loads i+1 on entering i and frees i on leaving (the last block stays
    for the backward); the recompute of block i loads i-1 and frees the blocks above i."""
    dit = _tiny_dit()
    params = _with_lora(dit)
    swapper = BlockSwapper.attach(dit, 3, "cpu")
    swapper.record = True
    _loss_and_grads(dit, params, checkpointing=True)
    log = swapper.log
    assert log[:9] == [("load", 1), ("run", 0), ("load", 2), ("run", 1), ("free", 1), ("load", 3), ("run", 2),
                       ("free", 2), ("run", 3)]
    backward = log[9:]
    assert backward == [("load", 2), ("run", 3), ("free", 3), ("load", 1), ("run", 2), ("free", 2), ("run", 1),
                        ("free", 1), ("run", 0)]
    resident = set()
    peak = 0
    for what, i in log:
        if what == "load":
            resident.add(i)
        elif what == "free":
            resident.discard(i)
        peak = max(peak, len(resident))
    assert peak == 2 and swapper.resident_blocks() == []


def test_swapped_block_without_checkpointing_fails_loudly():
    """Freed after its forward, a swapped block cannot serve a backward that kept its tensors: an error, never
    numbers from an empty placeholder."""
    dit = _tiny_dit()
    params = _with_lora(dit)
    BlockSwapper.attach(dit, 2, "cpu")
    with pytest.raises(RuntimeError):
        _loss_and_grads(dit, params, checkpointing=False)


# ---- the trainer ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tiny_root, tmp_path_factory):
    from edit_data import make_edit_dataset

    from diffsynth_edit.cache.config import CacheConfig
    from diffsynth_edit.cache.encode import run_cache

    root = tmp_path_factory.mktemp("lowmem_data")
    cfg = CacheConfig(dataset=make_edit_dataset(root / "raw", n=4, size=64), cache_dir=root / "cache",
                      model_root=tiny_root, variant="2511", dtype="fp32", device="cpu", progress=False)
    cfg.validate()
    run_cache(cfg)
    return cfg.cache_dir


def _train(cache_dir, tiny_root, out, **kw):
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.training.loop import Trainer

    base = dict(cache_dir=cache_dir, model_root=tiny_root, output_dir=out, run_name="run", lora_rank=4,
                optimizer="adamw", learning_rate=1e-3, gradient_accumulation=1, batch_size=2, max_steps=6,
                save_every=100, gradient_checkpointing=True, wandb=False, device="cpu", cfg_drop_prob=0.0)
    cfg = TrainConfig(**(base | kw))
    cfg.validate()
    trainer = Trainer(cfg)
    trainer.build()
    trainer.fit()
    with open(out / "run" / "metrics.csv") as f:
        return trainer, [float(r["loss"]) for r in csv.DictReader(f)]


def test_training_with_fp8_and_swap_tracks_the_plain_run(cache_dir, tiny_root, tmp_path):
    _, plain = _train(cache_dir, tiny_root, tmp_path / "plain")
    _, swap_only = _train(cache_dir, tiny_root, tmp_path / "swap", blocks_to_swap=2)
    trainer, low = _train(cache_dir, tiny_root, tmp_path / "low", fp8_base=True, blocks_to_swap=2)
    assert swap_only == plain  # swapping moves tensors, nothing else
    dit = trainer.unwrapped().dit
    assert any(hasattr(m, "fp8_weight") for m in dit.modules())
    assert dit._block_swapper.first == len(dit.transformer_blocks) - 2
    # fp8 rounds each base weight by ≤ 2^-4 relative; on the tiny model the loss moves by well under 2 %
    for a, b in zip(low, plain):
        assert abs(a - b) <= 0.02 * abs(b), (low, plain)
    assert low != plain


# ---- flags ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, flag", [
    (dict(blocks_to_swap=-1), "--blocks-to-swap must be an integer ≥ 0"),
    (dict(blocks_to_swap=2, gradient_checkpointing=False), "--blocks-to-swap needs --gradient-checkpointing"),
    (dict(blocks_to_swap=4, checkpoint_last_n=2), "--checkpoint-last-n ≥ 4"),
    (dict(blocks_to_swap=2, compile_blocks=True), "--compile-blocks"),
])
def test_bad_low_memory_flags_are_refused(kw, flag):
    from diffsynth_edit.training.config import TrainConfig

    with pytest.raises(ConfigError, match=flag):
        TrainConfig(**kw).validate()


def test_too_many_swapped_blocks_is_refused_naming_the_flag(tmp_path):
    from types import SimpleNamespace

    from diffsynth_edit.low_memory import apply_low_memory

    with pytest.raises(ConfigError, match=r"--blocks-to-swap 4: the model has 4 blocks"):
        apply_low_memory(_tiny_dit(), SimpleNamespace(fp8_base=False, blocks_to_swap=4), "cpu")


def test_cli_bad_blocks_to_swap_exits_with_one_line(cache_dir, tiny_root, tmp_path, capsys):
    from diffsynth_edit.training.cli import main_train

    with pytest.raises(SystemExit) as e:
        main_train(["--cache-dir", str(cache_dir), "--model-root", str(tiny_root), "--output-dir", str(tmp_path),
                    "--blocks-to-swap", "-3", "--device", "cpu", "--wandb", "false"])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--blocks-to-swap" in err[0]


@pytest.mark.parametrize("preset, rank, mode", [("train_2511_24g.toml", 32, "plain"), ("train_2511_48g.toml", 512,
                                                                                         "bridge")])
def test_low_memory_presets_parse_and_validate(preset, rank, mode):
    from pathlib import Path

    from diffsynth_edit.config import parse_config
    from diffsynth_edit.training.config import TrainConfig
    from diffsynth_edit.variants import LORA_TARGETS_UPSTREAM

    path = Path(__file__).resolve().parents[1] / "configs" / preset
    cfg = parse_config(TrainConfig, ["--preset", str(path)], section="train")
    assert cfg.fp8_base and cfg.blocks_to_swap == 20 and cfg.gradient_checkpointing
    assert (cfg.lora_rank, cfg.mode) == (rank, mode)
    if rank == 32:
        assert tuple(cfg.lora_targets) == LORA_TARGETS_UPSTREAM
    with pytest.raises(SystemExit):  # a bad override of the preset's value is refused at parse time
        parse_config(TrainConfig, ["--preset", str(path), "--blocks-to-swap", "x"], section="train")


# ---- editing ----------------------------------------------------------------------------------------------------
def _edit(editor):
    import numpy as np
    from PIL import Image

    from diffsynth_edit.editing.request import EditRequest, EditSettings

    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8))
    ref = Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8))
    return editor.edit(EditRequest(image=image, prompt="turn the square red", references=[ref]),
                       EditSettings(steps=2, cfg_scale=2.0, seed=3)).latents


def _editor(tiny_root, **kw):
    from diffsynth_edit.editing.batch import build_editor
    from diffsynth_edit.editing.options import ModelOptions

    return build_editor(ModelOptions(model_root=tiny_root, device="cpu", **kw))


def test_editor_with_swapped_dit_and_text_encoder_equals_resident(tiny_root):
    plain = _edit(_editor(tiny_root))
    editor = _editor(tiny_root, blocks_to_swap=2, text_encoder_blocks_to_swap=1)
    assert editor.pipe.dit._block_swapper.first == 1 and editor.pipe.text_encoder._block_swapper.first == 1
    assert editor.hot_swap  # LoRAs cannot be merged into host-resident or fp8 weights
    assert torch.equal(_edit(editor), plain)
    assert torch.equal(_edit(editor), plain)  # again, from the state the first edit left


def test_editor_with_fp8_base_stays_close_to_bf16(tiny_root):
    plain = _edit(_editor(tiny_root))
    low = _edit(_editor(tiny_root, fp8_base=True, blocks_to_swap=2))
    assert not torch.equal(low, plain)
    # fp8 weights (relative rounding ≤ 2^-4) over two CFG steps of the tiny model: within 5 % of the latents' scale
    assert float((low - plain).abs().max()) <= 0.05 * float(plain.abs().max())


@pytest.mark.parametrize("args, message", [
    (["--text-encoder-blocks-to-swap", "2"], "--text-encoder-blocks-to-swap 2: the model has 2 blocks"),
    (["--blocks-to-swap", "3"], "--blocks-to-swap 3: the model has 3 blocks"),
    (["--blocks-to-swap", "-1"], "--blocks-to-swap must be an integer ≥ 0"),
])
def test_edit_cli_bad_low_memory_flags(tiny_root, tmp_path, capsys, args, message):
    from PIL import Image

    from diffsynth_edit.editing.cli import main

    src = tmp_path / "s.png"
    Image.new("RGB", (64, 64), "white").save(src)
    rc = main(["edit", "--image", str(src), "--prompt", "x", "--model-root", str(tiny_root), "--out",
               str(tmp_path / "out"), "--device", "cpu", "--steps", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and message in err[0], err


def test_editor_hot_loads_a_checkpoint_onto_swapped_fp8_blocks(cache_dir, tiny_root, tmp_path):
    """A trained checkpoint (LoRA + STE) runs beside swapped blocks exactly as beside resident ones (both hot-loaded),
    and beside fp8 blocks close to that."""
    from diffsynth_edit.editing.editor import Editor
    from diffsynth_edit.loading import ModelSources, load_pipeline

    trainer, _ = _train(cache_dir, tiny_root, tmp_path / "ckpt", max_steps=2)
    ckpt = sorted((tmp_path / "ckpt" / "run").rglob("*.safetensors"))
    ckpt = [p for p in ckpt if "state" not in p.parts][-1]
    resident = Editor(load_pipeline(ModelSources(model_root=tiny_root), torch_dtype=torch.float32), hot_swap=True)
    resident.load_checkpoint(ckpt)
    assert resident.ste is not None
    expected = _edit(resident)
    swapped = _editor(tiny_root, blocks_to_swap=2, checkpoint=ckpt)
    assert swapped.ste is not None and torch.equal(_edit(swapped), expected)
    low = _edit(_editor(tiny_root, blocks_to_swap=2, fp8_base=True, checkpoint=ckpt))
    assert float((low - expected).abs().max()) <= 0.05 * float(expected.abs().max())


# ---- phase 1 ----------------------------------------------------------------------------------------------------
def test_cache_with_swapped_text_encoder_layers_is_identical(cache_dir, tiny_root, tmp_path):
    from diffsynth_edit.cache.config import CacheConfig
    from diffsynth_edit.cache.encode import run_cache
    from diffsynth_edit.cache.store import open_cache

    plain = open_cache(cache_dir)
    cfg = CacheConfig(dataset=cache_dir.parent / "raw" / "dataset.json", cache_dir=tmp_path / "cache",
                      model_root=tiny_root, variant="2511", dtype="fp32", device="cpu", progress=False,
                      text_encoder_blocks_to_swap=1)
    cfg.validate()
    assert run_cache(cfg).encoded == 4
    swapped = open_cache(cfg.cache_dir)
    for i in range(4):
        a, b = vars(plain.load(i)), vars(swapped.load(i))
        assert a.keys() == b.keys()
        tensors = 0
        for k in a:
            pairs = zip(a[k], b[k]) if isinstance(a[k], (list, tuple)) else [(a[k], b[k])]
            for x, y in pairs:
                if isinstance(x, torch.Tensor):
                    assert torch.equal(x, y), k
                    tensors += 1
        assert tensors >= 3  # prompt embedding and mask, latents


def test_cache_refuses_negative_text_encoder_swap():
    from diffsynth_edit.cache.config import CacheConfig

    with pytest.raises(ConfigError, match="--text-encoder-blocks-to-swap must be an integer ≥ 0"):
        CacheConfig(dataset="x.json", text_encoder_blocks_to_swap=-2).validate()
