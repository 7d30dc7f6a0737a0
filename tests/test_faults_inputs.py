"""Bad inputs end in one line naming the flag, file or entry, exit code != 0 (issue 19 item 6)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_training import cache_dir  # noqa: F401  (module fixture reused)


def one_error_line(text: str) -> str:
    lines = re.findall(r"error: [^\r\n]*", text)
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def base_train_args(cache, tiny_root, out) -> list[str]:
    return ["--cache-dir", str(cache), "--model-root", str(tiny_root), "--output-dir", str(out), "--lora-rank", "4",
            "--optimizer", "adamw", "--learning-rate", "1e-3", "--gradient-accumulation", "1", "--max-steps", "1",
            "--gradient-checkpointing", "false", "--wandb", "false", "--device", "cpu"]


@pytest.mark.parametrize("flags, flag", [
    (["--save-every", "0"], "--save-every"), (["--log-every", "0"], "--log-every"),
    (["--learning-rate", "-1"], "--learning-rate"), (["--learning-rate", "0"], "--learning-rate"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--betas", "2,3"], "--betas"), (["--betas", "0.9"], "--betas"),
    (["--lora-alpha", "0"], "--lora-alpha"), (["--warmup-steps", "-5"], "--warmup-steps"),
    (["--keep-last", "-2"], "--keep-last"), (["--num-workers", "-1"], "--num-workers"),
    (["--device", "banana"], "--device"),
    (["--validate-every", "1", "--val-cache-dir", "x", "--val-samples", "0"], "--val-samples"),
    (["--validate-every", "1", "--val-cache-dir", "x", "--val-steps", "0"], "--val-steps"),
])
def test_train_refuses_bad_numbers_before_any_work(flags, flag, tmp_path, capsys):
    from diffsynth_edit.training.cli import main_train

    with pytest.raises(SystemExit) as e:
        main_train(["--cache-dir", str(tmp_path / "no-cache"), *flags])
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert flag in line, line


def _train(argv, capsys) -> tuple[int, str]:
    from diffsynth_edit.training.cli import main_train

    capsys.readouterr()
    code = main_train(argv)
    return code, one_error_line(capsys.readouterr().err)


def test_train_runtime_checks_name_the_flag(cache_dir, tiny_root, tmp_path, capsys):  # noqa: F811
    import torch

    args = base_train_args(cache_dir, tiny_root, tmp_path)
    code, line = _train(args + ["--lora-targets", "to_q,not_a_module"], capsys)
    assert code == 2 and "--lora-targets: not_a_module name(s) no module" in line, line  # to_q exists
    code, line = _train(args + ["--variant", "2509"], capsys)
    assert code == 2 and "--variant 2509" in line and "made for Qwen-Image-Edit-2511" in line, line
    if not torch.cuda.is_available():
        code, line = _train(args[:-2] + ["--device", "cuda"], capsys)
        assert code == 2 and "--device cuda" in line and "no CUDA" in line, line


def _entry_points(tmp_path):
    from diffsynth_edit.app.config import parse_app_config
    from diffsynth_edit.cache.cli import main_cache
    from diffsynth_edit.dataset.cli import main as dataset_main
    from diffsynth_edit.editing.cli import main as edit_main
    from diffsynth_edit.training.cli import main_train

    return {"train": lambda p: main_train(["--preset", str(p)]),
            "cache": lambda p: main_cache(["--preset", str(p)]),
            "edit": lambda p: edit_main(["edit", "--preset", str(p)]),
            "build": lambda p: dataset_main(["build", "--preset", str(p)]),
            "app": lambda p: parse_app_config(["--preset", str(p)])}


@pytest.mark.parametrize("command", ["train", "cache", "edit", "build", "app"])
@pytest.mark.parametrize("content, message", [
    (b"max_steps = 10\nrun_name = \"caf\xe9\"\n", "not UTF-8"),
    (b"[trian]\nmax_steps = 10\n", "unknown table [trian]"),
])
def test_bad_presets_are_one_line_in_every_cli(command, content, message, tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        _entry_points(tmp_path)[command](preset)
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and str(preset) in line, line


def test_preset_tables_of_other_commands_are_still_allowed(tmp_path):
    from diffsynth_edit.config import load_preset

    preset = tmp_path / "p.toml"
    preset.write_text("seed = 1\n[train]\nmax_steps = 3\n[cache]\nbatch_size = 2\n")
    assert load_preset(preset, "train") == {"seed": 1, "max_steps": 3}


def test_validate_a_folder_tiny_model_onto_a_file_and_negative_upload_limit(tmp_path, capsys):
    from diffsynth_edit.app.config import parse_app_config
    from diffsynth_edit.dataset.cli import main as dataset_main
    from diffsynth_edit.editing.cli import main as edit_main

    with pytest.raises(SystemExit) as e:
        dataset_main(["validate", str(tmp_path)])
    assert e.value.code == 2 and "is a folder" in one_error_line(capsys.readouterr().err)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        edit_main(["tiny-model", "--out", str(f)])
    assert e.value.code == 2 and f"--out {f} is a file" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as e:
        parse_app_config(["--max-file-mb", "-1"])
    assert e.value.code == 2 and "max-file-mb" in one_error_line(capsys.readouterr().err)


def test_export_onto_its_own_checkpoint_is_refused(tmp_path, capsys):
    from diffsynth_edit.training.cli import main_export

    ckpt = tmp_path / "run" / "step-000001.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"original")
    code = main_export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "run" / ".." / "run" / ckpt.name)])
    assert code == 2 and "--out" in one_error_line(capsys.readouterr().err)
    assert ckpt.read_bytes() == b"original"


def test_edit_and_evaluate_report_an_oversized_entry_and_do_the_rest(tiny_root, tmp_path, monkeypatch, capsys):
    """PIL's bomb limit lowered so that a 96x96 image is 'oversized' (a real 900 MP PNG is slow to make)."""
    from diffsynth_edit.editing.cli import main as edit_main

    rng = np.random.RandomState(0)
    records = []
    for i, size in enumerate((48, 96)):
        for d in ("src", "tgt"):
            (tmp_path / d).mkdir(exist_ok=True)
            Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(tmp_path / d / f"{i}.png")
        records.append({"prompt": "Picture 1 is the image to modify. Make it red.", "image": f"tgt/{i}.png",
                        "edit_image": [f"src/{i}.png"], "id": f"s{i}"})
    (tmp_path / "data.json").write_text(json.dumps(records))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # bomb error above 2 x 3000 pixels
    fast = ["--steps", "2", "--cfg", "1", "--device", "cpu", "--progress", "false", "--mode", "plain"]
    code = edit_main(["edit", "--dataset", str(tmp_path / "data.json"), "--model-root", str(tiny_root), "--out",
                      str(tmp_path / "out"), *fast])
    out = capsys.readouterr()
    assert code != 0 and (tmp_path / "out" / "s0.png").is_file() and not (tmp_path / "out" / "s1.png").exists()
    assert "edited 1" in out.out + out.err and "s1" in one_error_line(out.out + out.err)
    assert "too large" in out.out + out.err
    code = edit_main(["evaluate", "--dataset", str(tmp_path / "data.json"), "--model-root", str(tiny_root), "--out",
                      str(tmp_path / "eval"), "--lpips", "false", *fast])
    out = capsys.readouterr()
    assert code != 0 and "too large" in out.out + out.err and (tmp_path / "eval" / "images" / "s0.png").is_file()


def test_lbm_steps_and_aspect_have_one_limit_each(tmp_path, capsys):
    from diffsynth_edit.dataset.builder import BuildConfig, build_dataset
    from diffsynth_edit.editing.cli import main as edit_main
    from diffsynth_edit.editing.editor import EditInputError, EditSettings, fit_image
    from diffsynth_edit.limits import LBM_MAX_STEPS, MAX_ASPECT

    assert LBM_MAX_STEPS == 4 and MAX_ASPECT == 16.0
    EditSettings(sampler="lbm", steps=4).validate()
    with pytest.raises(EditInputError, match="LBM 1–4"):
        EditSettings(sampler="lbm", steps=5).validate()
    img = tmp_path / "i.png"
    Image.new("RGB", (32, 32)).save(img)
    with pytest.raises(SystemExit) as e:
        edit_main(["edit", "--image", str(img), "--prompt", "x", "--out", str(tmp_path / "o"), "--sampler", "lbm",
                   "--steps", "8"])
    assert e.value.code == 2 and "steps=8" in one_error_line(capsys.readouterr().err)
    # 17:1 enters neither the builder nor the editor; 16:1 enters both
    raw = tmp_path / "raw"
    for stem, (w, h) in {"wide": (272, 16), "ok": (256, 16)}.items():
        for d in ("source", "target"):
            (raw / d).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (w, h), (40, 90, 200 if d == "target" else 10)).save(raw / d / f"{stem}.png")
    s = build_dataset(BuildConfig(out=tmp_path / "ds.json", source_dir=raw / "source", target_dir=raw / "target",
                                  instruction="Make it blue.", max_mask_area=1.0, workers=1,
                                  progress=False))
    assert [r["id"] for r in s.records] == ["ok"]
    problems = [p for p in json.loads(s.report_path.read_text())["problems"] if p["id"] == "wide"]
    assert problems and problems[0]["reason"] == "bad_aspect" and "16:1" in problems[0]["detail"], problems
    fit_image(Image.new("RGB", (256, 16)), 4096)
    with pytest.raises(EditInputError, match="16:1"):
        fit_image(Image.new("RGB", (272, 16)), 4096)


def test_tiny_registry_names_only_the_workspace_tiny_classes(tiny_root, tmp_path):
    from diffsynth_edit.loading import MissingWeightsError, register_tiny_models

    registry = json.loads((tiny_root / "tiny_models.json").read_text())
    registry["models"]["qwen_image_vae"]["class"] = "os.system"
    (tmp_path / "tiny_models.json").write_text(json.dumps(registry))
    with pytest.raises(MissingWeightsError, match=r"'qwen_image_vae' names class 'os.system'"):
        register_tiny_models(tmp_path)
    (tmp_path / "tiny_models.json").write_text("{not json")
    with pytest.raises(MissingWeightsError, match="not a tiny-model registry"):
        register_tiny_models(tmp_path)
    shutil.copy(tiny_root / "tiny_models.json", tmp_path / "tiny_models.json")
    assert register_tiny_models(tmp_path)
