"""Loading: tiny model round trip through the real loader, explicit paths, missing weights, partial pipelines,
and the tiny model's module names against the real full-size architectures (built on the meta device)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsynth_edit.loading import COMPONENTS, MissingWeightsError, ModelSources, load_pipeline
from diffsynth_edit.variants import LORA_TARGETS_2509, LORA_TARGETS_2511, VARIANTS, get_variant

REAL_DIT_HASH = "0319a1cb19835fb510907dd3367c95ff"
REAL_VAE_HASH = "ed4ea5824d55ec3107b09815e318123a"

# Component -> (folder in the hub layout under the model root, repo that the hint must name)
LAYOUT = {
    "dit": ("Qwen/Qwen-Image-Edit-2511/transformer", "Qwen/Qwen-Image-Edit-2511"),
    "text_encoder": ("Qwen/Qwen-Image/text_encoder", "Qwen/Qwen-Image"),
    "vae": ("Qwen/Qwen-Image/vae", "Qwen/Qwen-Image"),
    "tokenizer": ("Qwen/Qwen-Image/tokenizer", "Qwen/Qwen-Image"),
    "processor": ("Qwen/Qwen-Image-Edit/processor", "Qwen/Qwen-Image-Edit"),
}


def _assert_bitwise_equal(model_sd: dict, file_sd: dict, what: str) -> None:
    assert set(model_sd) == set(file_sd), f"{what}: key sets differ: {sorted(set(model_sd) ^ set(file_sd))[:5]}"
    for k, v in file_sd.items():
        m = model_sd[k].detach().cpu()
        assert m.dtype == v.dtype, f"{what}.{k}: dtype {m.dtype} != {v.dtype}"
        assert torch.equal(m, v), f"{what}.{k} differs from the file"


# ---- round trip ----------------------------------------------------------------------------------------------------
def test_tiny_tree_has_hub_layout(tiny_root):
    assert (tiny_root / "tiny_models.json").is_file()
    for name, (folder, _) in LAYOUT.items():
        assert (tiny_root / folder).is_dir(), name
    assert (tiny_root / "Qwen/Qwen-Image-Edit-2509/transformer/diffusion_pytorch_model.safetensors").is_file()


def test_round_trip_weights_bit_for_bit(tiny_root, tiny_pipe):
    from diffsynth_edit.tiny import _text_encoder_to_hf_keys

    dit_file = load_file(str(tiny_root / LAYOUT["dit"][0] / "diffusion_pytorch_model.safetensors"))
    _assert_bitwise_equal(tiny_pipe.dit.state_dict(), dit_file, "dit")
    vae_file = load_file(str(tiny_root / LAYOUT["vae"][0] / "diffusion_pytorch_model.safetensors"))
    _assert_bitwise_equal(tiny_pipe.vae.state_dict(), vae_file, "vae")
    te_file = load_file(str(tiny_root / LAYOUT["text_encoder"][0] / "model.safetensors"))
    _assert_bitwise_equal(_text_encoder_to_hf_keys(tiny_pipe.text_encoder.state_dict()), te_file, "text_encoder")
    assert tiny_pipe.tokenizer is not None and tiny_pipe.processor is not None
    # loaded for inference: frozen, eval mode
    for m in (tiny_pipe.dit, tiny_pipe.vae, tiny_pipe.text_encoder):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())


def test_tiny_classes_are_the_loaded_ones(tiny_pipe):
    from diffsynth_edit.tiny import TinyQwenImageDiT, TinyQwenImageTextEncoder, TinyQwenImageVAE

    assert isinstance(tiny_pipe.dit, TinyQwenImageDiT)
    assert isinstance(tiny_pipe.text_encoder, TinyQwenImageTextEncoder)
    assert isinstance(tiny_pipe.vae, TinyQwenImageVAE)


def test_explicit_component_file_paths(tiny_root, tiny_pipe):
    r = tiny_root
    src = ModelSources(
        variant="2511",
        dit_path=r / LAYOUT["dit"][0] / "diffusion_pytorch_model.safetensors",
        text_encoder_path=r / LAYOUT["text_encoder"][0] / "model.safetensors",
        vae_path=r / LAYOUT["vae"][0] / "diffusion_pytorch_model.safetensors",
        tokenizer_path=r / LAYOUT["tokenizer"][0],
        processor_path=r / LAYOUT["processor"][0],
    )
    pipe = load_pipeline(src, torch_dtype=torch.float32)
    for name in ("dit", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(tiny_pipe, name).state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert pipe.tokenizer is not None and pipe.processor is not None


def test_explicit_paths_override_model_root(tiny_root, tmp_path):
    """An explicit path wins over the model root: a model root without a DiT still loads with --dit-path."""
    root = _partial_root(tiny_root, tmp_path / "root", drop="dit")
    src = ModelSources(variant="2511", model_root=root, dit_path=tiny_root / LAYOUT["dit"][0])
    pipe = load_pipeline(src, components=("dit",), torch_dtype=torch.float32)
    assert pipe.dit is not None


_FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from diffsynth_edit.loading import ModelSources, load_pipeline
    r = Path(sys.argv[1])
    src = ModelSources(variant="2511",
                       dit_path=r / "Qwen/Qwen-Image-Edit-2511/transformer",
                       text_encoder_path=r / "Qwen/Qwen-Image/text_encoder",
                       vae_path=r / "Qwen/Qwen-Image/vae",
                       tokenizer_path=r / "Qwen/Qwen-Image/tokenizer",
                       processor_path=r / "Qwen/Qwen-Image-Edit/processor")
    pipe = load_pipeline(src, torch_dtype=torch.float32)
    assert pipe.dit is not None and pipe.vae is not None and pipe.text_encoder is not None
    print("LOADED")
""")


def test_explicit_component_directory_paths_in_fresh_process(tiny_root):
    """Weights given as folders (which `resolve_local` supports) must load in a process that has not registered the
    tiny models yet; the in-session registry would hide a failure, hence the subprocess."""
    env = dict(os.environ, DIFFSYNTH_SKIP_DOWNLOAD="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_SCRIPT, str(tiny_root)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "LOADED" in proc.stdout, proc.stderr[-2000:]


# ---- missing weights -----------------------------------------------------------------------------------------------
def _partial_root(tiny_root: Path, dest: Path, drop: str) -> Path:
    """A model root that links every tiny component except `drop`."""
    for name, (folder, _) in LAYOUT.items():
        if name == drop:
            continue
        target = dest / folder
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(tiny_root / folder, target_is_directory=True)
    (dest / "tiny_models.json").symlink_to(tiny_root / "tiny_models.json")
    return dest


@pytest.mark.parametrize("component", COMPONENTS)
def test_missing_component_names_it_and_how_to_get_it(tiny_root, tmp_path, component):
    root = _partial_root(tiny_root, tmp_path / "models", drop=component)
    with pytest.raises(MissingWeightsError) as info:
        load_pipeline(ModelSources(variant="2511", model_root=root), torch_dtype=torch.float32)
    msg = str(info.value)
    assert component.replace("_", " ") in msg, msg
    repo = LAYOUT[component][1]
    assert f"download {repo} " in msg, msg  # how to obtain it
    assert f"--{component.replace('_', '-')}-path" in msg, msg
    assert "--allow-download" in msg, msg
    assert str(root / LAYOUT[component][0]) in msg, msg  # where it looked


def test_missing_explicit_path_is_named(tmp_path, tiny_root):
    src = ModelSources(variant="2511", model_root=tiny_root, vae_path=tmp_path / "nope.safetensors")
    with pytest.raises(MissingWeightsError, match=r"vae weights .*nope\.safetensors"):
        load_pipeline(src, torch_dtype=torch.float32)


def test_nothing_given_and_no_download(tmp_path):
    with pytest.raises(MissingWeightsError, match="no --model-root or component path given"):
        load_pipeline(ModelSources(variant="2511"), components=("dit",))


def test_missing_weights_error_is_file_not_found():
    assert issubclass(MissingWeightsError, FileNotFoundError)


# ---- partial pipelines ---------------------------------------------------------------------------------------------
def test_load_only_text_encoder_and_vae(tiny_sources):
    pipe = load_pipeline(tiny_sources, components=("text_encoder", "vae"), torch_dtype=torch.float32)
    assert pipe.dit is None
    assert pipe.text_encoder is not None and pipe.vae is not None
    assert pipe.tokenizer is None and pipe.processor is None


def test_load_only_dit_needs_no_other_component(tiny_root, tmp_path):
    root = _partial_root(tiny_root, tmp_path / "models", drop="vae")
    pipe = load_pipeline(ModelSources(variant="2511", model_root=root), components=("dit",), torch_dtype=torch.float32)
    assert pipe.dit is not None and pipe.vae is None and pipe.text_encoder is None


def test_unknown_component_refused(tiny_sources):
    with pytest.raises(ValueError, match="unknown components"):
        load_pipeline(tiny_sources, components=("dit", "unet"))


def test_variant_2509_loads_its_own_dit_folder(tiny_root):
    pipe = load_pipeline(ModelSources(variant="2509", model_root=tiny_root), components=("dit",),
                         torch_dtype=torch.float32)
    assert pipe.dit is not None


# ---- real architectures on meta: hashes and module names -----------------------------------------------------------
@pytest.fixture(scope="module")
def real_models():
    from diffsynth.models.qwen_image_dit import QwenImageDiT
    from diffsynth.models.qwen_image_vae import QwenImageVAE

    with torch.device("meta"):
        return QwenImageDiT(), QwenImageVAE()


def test_real_architectures_hash_to_diffsynth_registry(real_models):
    from diffsynth.configs import MODEL_CONFIGS
    from diffsynth.core.loader.file import hash_state_dict_keys

    dit, vae = real_models
    assert hash_state_dict_keys(dit.state_dict()) == REAL_DIT_HASH
    assert hash_state_dict_keys(vae.state_dict()) == REAL_VAE_HASH
    registered = {c["model_hash"]: c["model_name"] for c in MODEL_CONFIGS}
    assert registered[REAL_DIT_HASH] == "qwen_image_dit"
    assert registered[REAL_VAE_HASH] == "qwen_image_vae"


def _norm(name: str) -> str:
    return re.sub(r"transformer_blocks\.\d+\.", "transformer_blocks.N.", name)


def _linear_names(model) -> set[str]:
    return {_norm(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _matches(model, target: str) -> set[str]:
    """peft's rule: exact name or `.target` suffix."""
    return {_norm(n) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (n == target or n.endswith("." + target))}


def test_tiny_dit_has_the_real_module_names(real_models, tiny_pipe):
    real, _ = real_models
    assert _linear_names(tiny_pipe.dit) == _linear_names(real)
    tiny_params = {_norm(k) for k in tiny_pipe.dit.state_dict()}
    real_params = {_norm(k) for k in real.state_dict()}
    assert tiny_params == real_params


@pytest.mark.parametrize("variant", ["2511", "2509"])
def test_every_lora_target_matches_tiny_and_real(real_models, tiny_pipe, variant):
    real, _ = real_models
    for target in get_variant(variant).lora_targets:
        tiny_hits, real_hits = _matches(tiny_pipe.dit, target), _matches(real, target)
        assert tiny_hits, f"{target} matches nothing in the tiny DiT"
        assert tiny_hits == real_hits, f"{target}: tiny {sorted(tiny_hits)} != real {sorted(real_hits)}"


# ---- variants ------------------------------------------------------------------------------------------------------
def test_variants_table():
    v11, v09 = get_variant("2511"), get_variant("Qwen-Image-Edit-2509")
    assert v11.zero_cond_t is True and v09.zero_cond_t is False
    assert v11.dit_repo == "Qwen/Qwen-Image-Edit-2511" and v09.dit_repo == "Qwen/Qwen-Image-Edit-2509"
    assert v11.text_encoder_repo == v11.vae_repo == v11.tokenizer_repo == "Qwen/Qwen-Image"
    assert v11.processor_repo == "Qwen/Qwen-Image-Edit"
    assert v11.lora_targets == LORA_TARGETS_2511 == (
        "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
        "img_mlp.net.0.proj", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2", "txt_mod.1",
        "img_in", "txt_in", "proj_out")
    assert v09.lora_targets == LORA_TARGETS_2509 == (
        "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
        "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")
    assert set(VARIANTS) == {"2511", "2509"}
    with pytest.raises(ValueError, match="unknown model variant"):
        get_variant("2512")


def test_variant_mismatch_check():
    from diffsynth_edit.variants import VariantMismatchError, check_same_variant

    check_same_variant("2511", None, "cache")
    check_same_variant("2511", "2511", "cache")
    with pytest.raises(VariantMismatchError, match="2509.*2511"):
        check_same_variant("2511", "2509", "checkpoint")
