"""LBM training on the tiny model: warm start keeps the STE, DeepSpeed traps, the sub stream's modulation, learning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_training import cache_dir, make_cfg, run  # noqa: F401  (module-scoped cache fixture)

REPO = Path(__file__).resolve().parents[1]


def test_warm_start_from_sft_keeps_ste(cache_dir, tiny_root, tmp_path):
    from diffsynth_edit.checkpoint import read_checkpoint
    from diffsynth_edit.training.loop import Trainer

    _, sft = run(make_cfg(cache_dir, tiny_root, tmp_path / "sft", max_steps=2, learning_rate=5e-2))
    ckpt = read_checkpoint(sft)
    assert any(float(v.abs().sum()) > 0 for k, v in ckpt.ste.items() if k.startswith("heads."))
    trainer = Trainer(make_cfg(cache_dir, tiny_root, tmp_path / "lbm", objective="lbm", init_from=sft))
    trainer.build()
    ste = trainer.unwrapped().ste.state_dict()
    for k, v in ckpt.ste.items():
        assert torch.equal(ste[k], v.float()), k
    lora = dict(trainer.unwrapped().dit.named_parameters())
    for name, (a, b) in ckpt.lora.modules.items():
        assert torch.allclose(lora[f"{name}.lora_B.default.weight"], b)


def test_shipped_deepspeed_configs_pass_the_trap_checks():
    from diffsynth_edit.training.distributed import deepspeed_config_problems

    for name in ("ds_zero2.json", "ds_zero3.json"):
        ds = json.loads((REPO / "configs" / name).read_text())
        assert deepspeed_config_problems(ds, "prodigy") == [], name
        assert deepspeed_config_problems(ds, "adamw", grad_clip=0.0) == [], name
        assert ds["gradient_clipping"] == 0.0 and ds["zero_force_ds_cpu_optimizer"] is False
    z3 = json.loads((REPO / "configs" / "ds_zero3.json").read_text())["zero_optimization"]
    assert z3["stage"] == 3 and z3["overlap_comm"] is True and z3["offload_optimizer"]["device"] == "none"
    assert z3["reduce_bucket_size"] == 500000000 and isinstance(z3["stage3_prefetch_bucket_size"], int)


@pytest.mark.parametrize("ds, message", [
    ({"gradient_clipping": "auto"}, "gradient_clipping"),
    ({"gradient_clipping": 1.0}, "gradient_clipping"),
    ({"gradient_clipping": 0.0, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "DeepSpeedCPUAdam"),
    ({"gradient_clipping": 0.0, "zero_optimization": {"reduce_bucket_size": "auto"}}, "hidden_size"),
])
def test_deepspeed_traps_are_refused_with_a_message(ds, message):
    from diffsynth_edit.training.distributed import deepspeed_config_problems

    problems = deepspeed_config_problems(ds, "prodigy")
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("clip_in_config, grad_clip, refused", [
    (0.0, 1.0, True),  # the preset asks for clipping that DeepSpeed would never do
    ("auto", 0.0, True),  # 'auto' clips at 1.0 although the run asked for none
    (1.0, 0.0, True),
    (1.0, 1.0, False),
    (0.0, 0.0, False),
])
def test_adamw_clipping_must_match_the_deepspeed_config(clip_in_config, grad_clip, refused):
    from diffsynth_edit.training.distributed import deepspeed_config_problems

    problems = deepspeed_config_problems({"gradient_clipping": clip_in_config}, "adamw", grad_clip)
    if refused:
        assert len(problems) == 1 and f"the run's grad_clip is {grad_clip}" in problems[0], problems
        assert f'"gradient_clipping": {float(grad_clip)}' in problems[0]
    else:
        assert problems == []


def test_sub_stream_is_modulated_like_main(tiny_pipe):
    """With zero_cond_t the noisy sub tokens take index 0 (t), like main; only edit tokens take t = 0."""
    from diffsynth_edit.bridge_dit import DiTInputs, bridge_forward

    seen = []
    block = tiny_pipe.dit.transformer_blocks[0]
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["modulate_index"].clone()),
                                             with_kwargs=True)
    try:
        inputs = DiTInputs(torch.randn(2, 16, 8, 8), torch.tensor([750.0, 250.0]), torch.randn(2, 10, 64),
                           torch.ones(2, 10, dtype=torch.long), [torch.randn(2, 16, 8, 8)], torch.randn(2, 16, 4, 4),
                           torch.tensor([[0, 2, 0, 2], [2, 4, 2, 4]]))
        with torch.no_grad():
            bridge_forward(tiny_pipe.dit, inputs, zero_cond_t=True)
    finally:
        handle.remove()
    index = seen[0]
    assert index.shape == (2, 16 + 4 + 16)
    assert index[:, :20].eq(0).all() and index[:, 20:].eq(1).all()


def test_lbm_learning_one_step_edit(cache_dir, tiny_root, tmp_path):
    """After LBM training, the 1-step edit's latent error to the target is at most half the source's."""
    from diffsynth_edit.editing.editor import EditSettings, Editor
    from diffsynth_edit.training.validation import prepared_from_cache

    cfg = make_cfg(cache_dir, tiny_root, tmp_path, objective="lbm", mode="plain", lora_rank=32, learning_rate=1e-2,
                   max_steps=100, batch_size=4, save_every=100, bridge_sigma=0.01)
    trainer, _ = run(cfg)
    trainer.eval_view()
    editor = Editor(trainer.pipe, variant="2511", mode="plain")
    edit_err, src_err = 0.0, 0.0
    for i in range(len(trainer.cache)):
        s = trainer.cache.load(i)
        x, _ = editor.sample(prepared_from_cache(trainer.pipe, s), EditSettings(sampler="lbm", steps=1, cfg_scale=1.0))
        edit_err += float(((x.cpu() - s.input_latents[None]) ** 2).mean())
        src_err += float(((s.edit_latents[0] - s.input_latents) ** 2).mean())
    assert edit_err <= 0.5 * src_err, (edit_err, src_err)
