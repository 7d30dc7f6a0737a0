"""Phase-1 cache: equality with the editor, resume after a kill, stale detection, failures, verify, two ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from numerics import FP32_REL, assert_close_scaled

REPO = Path(__file__).resolve().parents[1]

# The cache encodes VAE inputs in batches, the editor one by one: conv kernels differ by batch size (≈1e-5 of the
# latents' scale).
LATENT_REL = 1e-4


# ---- helpers -------------------------------------------------------------------------------------------------------
def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> str:
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)
    return path.name


def make_sample(root: Path, name: str, w: int, h: int, seed: int, mask_box=None, ref_size=None,
                prompt: str | None = None) -> dict:
    """Source (noise), target (source with a coloured box), optional mask (the box) and extra reference."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    tgt = src.copy()
    entry = {"prompt": prompt or f"Picture 1 is the image to modify. Paint the box {name}.", "id": name,
             "edit_type": "recolor"}
    if mask_box is not None:
        y1, y2, x1, x2 = mask_box
        tgt[y1:y2, x1:x2] = (200, 30 + seed % 200, 60)
        m = np.zeros((h, w), np.uint8)
        m[y1:y2, x1:x2] = 255
        entry["back_mask"] = _png(root / f"{name}_mask.png", m, "L")
    else:
        tgt[: h // 2] = 255 - tgt[: h // 2]
    entry["image"] = _png(root / f"{name}_target.png", tgt)
    entry["edit_image"] = [_png(root / f"{name}_source.png", src)]
    if ref_size is not None:
        rw, rh = ref_size
        entry["edit_image"].append(_png(root / f"{name}_ref.png", rng.integers(0, 256, (rh, rw, 3), dtype=np.uint8)))
    return entry


def write_dataset(root: Path, entries: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "dataset.json"
    path.write_text(json.dumps(entries, indent=1))
    return path


def simple_dataset(root: Path, n: int = 3, size: tuple[int, int] = (32, 32)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return write_dataset(root, [make_sample(root, f"s{i}", *size, seed=i, mask_box=(4, 12, 6, 20)) for i in range(n)])


def run_inproc(capsys, *args: str) -> tuple[int, str]:
    from diffsynth_edit.cache.cli import main_cache

    rc = main_cache([*map(str, args), "--progress", "false"])
    out = capsys.readouterr()
    return rc, out.out + out.err


def cache_args(dataset: Path, cache_dir: Path, tiny_root: Path, *extra) -> list[str]:
    return ["--dataset", str(dataset), "--cache-dir", str(cache_dir), "--model-root", str(tiny_root), *map(str, extra)]


def sub_env(**extra) -> dict:
    env = {**os.environ, "DIFFSYNTH_SKIP_DOWNLOAD": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_sub(args: list[str], env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_2511.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sample_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / "samples").glob("*.safetensors"))


def verify(cache_dir: Path, capsys) -> tuple[int, str]:
    from diffsynth_edit.cache.cli import main_verify

    rc = main_verify(["--cache-dir", str(cache_dir)])
    out = capsys.readouterr()
    return rc, out.out + out.err


# ---- equality with the editor --------------------------------------------------------------------------------------
def test_entry_equals_editor_prepare(tiny_root, tiny_pipe, tmp_path, capsys):
    from diffsynth_edit.cache import open_cache
    from diffsynth_edit.editing.editor import EditRequest, EditSettings, Editor, fit_image, to_rgb
    from diffsynth_edit.encoding import vae_encode, white_latents
    from diffsynth_edit.prompts import edit_prompt

    data = tmp_path / "data"
    data.mkdir()
    entries = [
        make_sample(data, "masked_ref", 64, 64, 1, mask_box=(8, 24, 20, 44), ref_size=(48, 32)),
        make_sample(data, "nomask", 64, 64, 2),
        make_sample(data, "wide", 48, 32, 3, mask_box=(3, 17, 5, 30)),
        make_sample(data, "resized", 80, 80, 4, mask_box=(40, 70, 10, 30)),  # 80² > max_pixels: scaled to 64²
        # written by hand without the prompt prefix: encoded as the builder's prompts are (prompts.edit_prompt)
        make_sample(data, "raw_prompt", 32, 32, 5, mask_box=(4, 20, 8, 24), prompt="Make the box green."),
        # an odd size whose 16-px rounding changes the aspect ratio (67x35 -> 64x32), with its own mask: the
        # editor's mask rule (a mask of the source's own size is resized) holds in the cache too
        make_sample(data, "odd_size", 67, 35, 6, mask_box=(5, 30, 10, 50)),
    ]
    dataset = write_dataset(data, entries)
    max_pixels = 64 * 64
    rc, out = run_inproc(capsys, *cache_args(dataset, tmp_path / "cache", tiny_root, "--dtype", "fp32",
                                             "--max-pixels", max_pixels, "--batch-size", 3))
    assert rc == 0, out
    index = open_cache(tmp_path / "cache")
    assert index.variant == "2511" and index.zero_cond_t is True and len(index) == len(entries)
    assert [e.id for e in index.entries] == [e["id"] for e in entries]
    editor = Editor(tiny_pipe, variant="2511")
    settings = EditSettings(max_pixels=max_pixels)
    for info, e in zip(index.entries, entries):
        s = index.load(index.entries.index(info))
        # the instruction as a user types it in the app or on the command line: no prefix
        typed = e["prompt"].removeprefix("Picture 1 is the image to modify. ")
        req = EditRequest(image=Image.open(data / e["edit_image"][0]), prompt=typed,
                          mask=Image.open(data / e["back_mask"]) if "back_mask" in e else None,
                          references=[Image.open(data / p) for p in e["edit_image"][1:]])
        prep = editor.prepare(req, settings)
        w, h = prep.size
        assert s.size == (h, w) == info.size
        assert info.num_edit == len(s.edit_latents) == len(prep.edit_latents)
        for got, want in zip(s.edit_latents, prep.edit_latents):
            assert_close_scaled(got, want[0].float(), LATENT_REL)
        assert_close_scaled(s.prompt_emb, prep.prompt_emb[0], FP32_REL)
        assert_close_scaled(s.nega_prompt_emb, prep.nega_emb[0], FP32_REL)
        assert torch.equal(s.prompt_emb_mask, prep.prompt_mask[0].cpu().long())
        assert torch.equal(s.nega_prompt_emb_mask, prep.nega_mask[0].cpu().long())
        assert torch.equal(s.subyx, prep.subyx[0]) and s.subyx.dtype == torch.long
        torch.testing.assert_close(s.mask_latent, prep.mask_latent[0].cpu().float())
        # target at the source's size; ref_gt crop = target through the mask onto white; white sub start
        target = fit_image(to_rgb(Image.open(data / e["image"])), max_pixels)[0]
        assert_close_scaled(s.input_latents, vae_encode(tiny_pipe, [target])[0][0], LATENT_REL)
        white = Image.new("RGB", target.size, (255, 255, 255))
        pasted = target if prep.mask is None else Image.composite(target, white, prep.mask)
        crop = pasted.crop(prep.box.pil_box())
        assert info.sub_size == (prep.box.height, prep.box.width)
        assert_close_scaled(s.sub_input_latents, vae_encode(tiny_pipe, [crop])[0][0], LATENT_REL)
        assert_close_scaled(s.sub_noise, white_latents(tiny_pipe, prep.box.width, prep.box.height)[0], LATENT_REL)
        assert s.metadata["prompt"] == edit_prompt(e["prompt"]) and s.metadata["edit_type"] == "recolor"
        assert s.metadata["prompt"].startswith("Picture 1 is the image to modify. ")
    assert index.entries[3].size == (64, 64)  # resized
    assert index.entries[5].size == (32, 64)  # 67x35 fitted to 64x32, its mask with it
    assert index.entries[1].sub_size == (64, 64)  # no mask: whole image
    rc, out = verify(tmp_path / "cache", capsys)
    assert rc == 0, out


# ---- reader errors -------------------------------------------------------------------------------------------------
def test_open_cache_errors(tmp_path):
    from diffsynth_edit.cache import CacheError, open_cache

    with pytest.raises(CacheError, match="does not exist"):
        open_cache(tmp_path / "nope")
    with pytest.raises(CacheError, match=r"no manifest.json in .*train_2511.py cache` first"):
        open_cache(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        open_cache(tmp_path)


def test_preset_and_overrides():
    from diffsynth_edit.cache.config import CacheConfig
    from diffsynth_edit.config import parse_config

    for v in ("2511", "2509"):
        cfg = parse_config(CacheConfig, ["--preset", str(REPO / f"configs/cache_{v}.toml"), "--dtype", "fp32",
                                         "--limit", "2"], section="cache")
        assert cfg.variant == v and cfg.dtype == "fp32" and cfg.limit == 2 and cfg.max_pixels == 1048576
    with pytest.raises(SystemExit):
        parse_config(CacheConfig, ["--variant", "2512", "--dataset", "x.json"], section="cache")


# ---- interrupted run resumed ---------------------------------------------------------------------------------------
def test_killed_run_resumes(tiny_root, tmp_path, capsys, monkeypatch):
    from diffsynth_edit.cache import CacheError, open_cache

    dataset = simple_dataset(tmp_path / "data", n=5)
    cache = tmp_path / "cache"
    log = tmp_path / "writes.log"
    args = cache_args(dataset, cache, tiny_root, "--batch-size", 1, "--num-workers", 1, "--manifest-every", 0)
    # SIGKILL while the 3rd entry's temporary file is complete but not yet renamed
    r = run_sub(["cache", *args, "--progress", "false"],
                sub_env(DIFFSYNTH_EDIT_CACHE_TEST_KILL="during:3", DIFFSYNTH_EDIT_CACHE_TEST_LOG=log))
    assert r.returncode == -9, r.stdout + r.stderr
    assert len(sample_files(cache)) == 2 and list((cache / "samples").glob(".*.tmp"))
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(cache)
    partial = open_cache(cache, allow_incomplete=True)  # the incremental manifest lists only finished files
    assert [e.id for e in partial.entries] == ["s0", "s1"] and partial.load(1).id == "s1"
    rc, out = verify(cache, capsys)
    assert rc == 1 and "incomplete" in out
    # run again (in-process): finishes the rest, skips the valid entries
    monkeypatch.setenv("DIFFSYNTH_EDIT_CACHE_TEST_LOG", str(log))
    rc, out = run_inproc(capsys, *args)
    assert rc == 0 and "encoded 3, skipped 2 valid, failed 0" in out, out
    written = [line.split()[1] for line in log.read_text().splitlines()]
    assert sorted(written) == [f"s{i}" for i in range(5)]  # every sample encoded exactly once over both runs
    assert len(sample_files(cache)) == 5 and not list((cache / "samples").glob(".*.tmp"))
    assert len(open_cache(cache)) == 5
    rc, out = verify(cache, capsys)
    assert rc == 0, out


# ---- stale detection -----------------------------------------------------------------------------------------------
def test_stale_entries_are_reencoded(tiny_root, tmp_path, capsys):
    from diffsynth_edit.cache import open_cache
    from diffsynth_edit.variants import VariantMismatchError

    data = tmp_path / "data"
    dataset = simple_dataset(data, n=3)
    cache = tmp_path / "cache"
    args = cache_args(dataset, cache, tiny_root)
    rc, out = run_inproc(capsys, *args)
    assert rc == 0 and "encoded 3, skipped 0" in out, out
    first = sample_files(cache)
    rc, out = run_inproc(capsys, *args)
    assert rc == 0 and "encoded 0, skipped 3" in out, out
    assert sample_files(cache) == first

    # image bytes: one pixel of s0's target changes
    p = data / "s0_target.png"
    arr = np.asarray(Image.open(p)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(p)
    rc, out = run_inproc(capsys, *args)
    assert rc == 0 and "encoded 1, skipped 2" in out and "removed 1 stale" in out, out
    after_image = sample_files(cache)
    assert len(after_image) == 3 and len(set(after_image) & set(first)) == 2

    # prompt
    entries = json.loads(dataset.read_text())
    entries[1]["prompt"] += " Carefully."
    dataset.write_text(json.dumps(entries))
    rc, out = run_inproc(capsys, *args)
    assert rc == 0 and "encoded 1, skipped 2" in out, out
    assert open_cache(cache).load(1).metadata["prompt"].endswith("Carefully.")

    # resolution policy
    rc, out = run_inproc(capsys, *args, "--max-pixels", 16 * 16)
    assert rc == 0 and "encoded 3, skipped 0" in out and "removed 3 stale" in out, out
    index = open_cache(cache)
    assert all(e.size == (16, 16) for e in index.entries)
    assert index.manifest["resolution_policy"]["max_pixels"] == 256

    # variant: refused in the same folder, a new folder gets new files
    rc, out = run_inproc(capsys, *args, "--max-pixels", 16 * 16, "--variant", "2509")
    assert rc == 2 and "made for Qwen-Image-Edit-2511" in out, out
    with pytest.raises(VariantMismatchError):
        open_cache(cache).check_variant("2509")
    cache09 = tmp_path / "cache_2509"
    rc, out = run_inproc(capsys, *cache_args(dataset, cache09, tiny_root, "--max-pixels", 16 * 16,
                                             "--variant", "2509"))
    assert rc == 0, out
    idx09 = open_cache(cache09)
    assert idx09.variant == "2509" and idx09.zero_cond_t is False
    assert not set(sample_files(cache09)) & set(sample_files(cache))


# ---- bad samples ---------------------------------------------------------------------------------------------------
def test_bad_samples_reported_others_cached(tiny_root, tmp_path, capsys):
    from diffsynth_edit.cache import open_cache

    data = tmp_path / "data"
    data.mkdir()
    entries = [make_sample(data, f"s{i}", 32, 32, seed=i, mask_box=(4, 12, 4, 12)) for i in range(5)]
    (data / entries[1]["edit_image"][0]).unlink()  # missing source
    (data / entries[2]["back_mask"]).write_bytes(b"this is not a png")  # corrupt mask
    Image.new("L", (32, 32), 0).save(data / entries[3]["back_mask"])  # empty mask
    dataset = write_dataset(data, entries)
    cache = tmp_path / "cache"
    rc, out = run_inproc(capsys, *cache_args(dataset, cache, tiny_root))
    assert rc == 1, out
    assert "encoded 2, skipped 0 valid, failed 3" in out
    assert f"id s1 (index 1): edit_image.0 {data / 's1_source.png'}: file not found" in out
    assert f"id s2 (index 2): back_mask {data / 's2_mask.png'}: cannot read image" in out
    assert "id s3 (index 3): back_mask" in out and "mask is empty" in out
    index = open_cache(cache)
    assert [e.id for e in index.entries] == ["s0", "s4"]
    assert [f["id"] for f in index.manifest["failed"]] == ["s1", "s2", "s3"]
    rc, out = run_inproc(capsys, *cache_args(dataset, cache, tiny_root, "--allow-failures", "true"))
    assert rc == 0 and "encoded 0, skipped 2 valid, failed 3" in out, out


# ---- verify --------------------------------------------------------------------------------------------------------
def test_verify_catches_truncated_and_nan(tiny_root, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    dataset = simple_dataset(tmp_path / "data", n=3, size=(48, 32))
    cache = tmp_path / "cache"
    rc, out = run_inproc(capsys, *cache_args(dataset, cache, tiny_root))
    assert rc == 0, out
    rc, out = verify(cache, capsys)
    assert rc == 0 and "3 entries checked, all valid" in out, out
    files = [cache / "samples" / f for f in sample_files(cache)]
    truncated, nan = files[0], files[1]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    tensors = load_file(str(nan))
    with safe_open(str(nan), "pt") as f:
        meta = f.metadata()
    tensors["prompt_emb"][0, 0] = float("nan")
    save_file(tensors, str(nan), metadata=meta)
    rc, out = verify(cache, capsys)
    assert rc == 1, out
    assert f"{truncated}: " in out and "truncated" in out
    assert f"{nan}: " in out and "prompt_emb: 1 non-finite value(s)" in out
    assert "2 bad file(s)" in out
    # the next cache run re-encodes the truncated entry (its header check fails); the NaN one needs deleting
    rc, out = run_inproc(capsys, *cache_args(dataset, cache, tiny_root))
    assert rc == 0 and "encoded 1, skipped 2" in out, out


# ---- two ranks -----------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port for the launcher's rendezvous (a fixed one collides with a parallel test run)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_encodes_each_sample_once(tiny_root, tmp_path, capsys):
    from diffsynth_edit.cache import open_cache

    dataset = simple_dataset(tmp_path / "data", n=5, size=(32, 32))
    cache = tmp_path / "cache"
    log = tmp_path / "writes.log"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(REPO / "train_2511.py"), "cache",
           *cache_args(dataset, cache, tiny_root, "--progress", "false", "--num-workers", 1)]
    r = subprocess.run(cmd, cwd=REPO, env=sub_env(ACCELERATE_USE_CPU="true", DIFFSYNTH_EDIT_CACHE_TEST_LOG=log),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "encoded 5, skipped 0 valid, failed 0" in r.stdout
    assert "encoded per rank: [3, 2]" in r.stdout
    writes = [line.split() for line in log.read_text().splitlines()]
    assert sorted(i for _, i in writes) == [f"s{i}" for i in range(5)]  # each sample exactly once
    assert {rank for rank, _ in writes} == {"0", "1"}
    assert len(open_cache(cache)) == 5 and len(sample_files(cache)) == 5
    # One merged manifest (rank 0's, complete, naming every sample) and nothing else left by either rank.
    from diffsynth_edit.cache.manifest import read_manifest

    manifest = read_manifest(cache)
    assert manifest["complete"] is True and len(manifest["entries"]) == 5
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json", "samples"]
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == sorted(["manifest.json", *sample_files(cache)])
    rc, out = verify(cache, capsys)
    assert rc == 0, out


# ---- format: the negative prompt stored as prefix + tail; older formats refused ------------------------------------
def test_negative_stored_as_prefix_and_tail(tiny_root, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    from diffsynth_edit.cache import CacheError, open_cache
    from diffsynth_edit.cache.manifest import FORMAT

    dataset = simple_dataset(tmp_path / "data", n=2)
    cache = tmp_path / "cache"
    rc, out = run_inproc(capsys, *cache_args(dataset, cache, tiny_root))
    assert rc == 0, out
    index = open_cache(cache)
    path = index.entries[0].path
    raw = load_file(str(path))
    assert "nega_prompt_emb" not in raw
    prefix, tail = int(raw["nega_prefix_len"][0]), raw["nega_prompt_emb_tail"]
    assert 0 < prefix and tail.shape[0] < 32 and raw["nega_prompt_emb_mask"].shape[0] == prefix + tail.shape[0]
    s = index.load(0)
    assert torch.equal(s.nega_prompt_emb, torch.cat([s.prompt_emb[:prefix], tail]))
    assert index.manifest["entries"]["s0"]["nega_len"] == s.nega_prompt_emb.shape[0]
    # a prefix longer than the prompt is caught by verify and by the reader
    raw["nega_prefix_len"] = torch.tensor([s.prompt_emb.shape[0] + 1])
    save_file(raw, str(path), metadata={"format": FORMAT})
    rc, out = verify(cache, capsys)
    assert rc == 1 and "nega_prefix_len" in out, out
    with pytest.raises(CacheError, match="nega_prefix_len"):
        index.load(0)
    # a cache of the previous format is refused with the way out, and a cache run re-encodes it
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["format"] = "qwen-edit-cache/1"
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"format 'qwen-edit-cache/1'.*re-create the cache"):
        open_cache(cache)
    rc, out = verify(cache, capsys)
    assert rc == 1 and "qwen-edit-cache/1" in out
    rc, out = run_inproc(capsys, *cache_args(dataset, cache, tiny_root))
    assert rc == 0, out
    assert open_cache(cache).manifest["format"] == FORMAT and len(open_cache(cache)) == 2
    # files of the previous format have other names (the format is part of every sample hash): all re-encoded
    from diffsynth_edit.cache import manifest as mf

    settings = mf.CacheSettings("2511", 1024, "bf16", "x")
    new = settings.fingerprint()
    monkeypatch.setattr(mf, "FORMAT", "qwen-edit-cache/1")
    assert settings.fingerprint() != new


def test_process_workers_write_identical_files(tiny_root, tmp_path):
    """Image preparation in worker processes (the CUDA default) gives byte-identical files to threads; the summary
    carries the per-stage timings."""
    from diffsynth_edit.cache.config import CacheConfig
    from diffsynth_edit.cache.encode import run_cache

    data = tmp_path / "data"
    dataset = simple_dataset(data, n=3)
    out = {}
    for mode in ("thread", "process"):
        cfg = CacheConfig(dataset=dataset, cache_dir=tmp_path / mode, model_root=tiny_root, dtype="fp32",
                          workers=mode, num_workers=2, batch_size=2, progress=False, fsync=mode == "thread")
        cfg.validate()
        summary = run_cache(cfg, log=lambda s: None)
        assert summary.ok and summary.encoded == 3
        assert "wait for prepared (device idle)" in summary.stages and "write.file" in summary.stages
        assert "stage seconds:" in summary.format()
        out[mode] = {p.name: _file_content(p) for p in (tmp_path / mode / "samples").glob("*.safetensors")}
    assert len(out["thread"]) == 3 and out["thread"].keys() == out["process"].keys()
    for name, (meta, tensors) in out["thread"].items():
        meta2, tensors2 = out["process"][name]
        assert meta == meta2 and tensors.keys() == tensors2.keys()
        for k in tensors:  # bit-identical tensors (safetensors orders the metadata map arbitrarily)
            assert tensors[k].dtype == tensors2[k].dtype and torch.equal(tensors[k], tensors2[k]), k


def _file_content(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_compiled_vae_failure_falls_back_to_eager_with_a_message(tiny_pipe, monkeypatch):
    """A compiler error in the first VAE batch must not end a long cache run: the encoder undoes the compile, says
    so, and encodes eagerly (same latents)."""
    from diffsynth_edit import encoding
    from diffsynth_edit.cache.encoder import SampleEncoder

    messages = []
    enc = SampleEncoder(tiny_pipe, torch.float32, batch_size=2, compile_vae=False, log=messages.append)
    pixels = [encoding.image_to_uint8(Image.new("RGB", (32, 32), (200, 10, 10)))]
    want = enc._vae_encode(pixels)
    enc.compiled_vae = True  # as on CUDA
    real, calls = encoding.vae_encode_uint8, []

    def flaky(pipe, px):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("inductor: something broke")
        return real(pipe, px)

    monkeypatch.setattr(encoding, "vae_encode_uint8", flaky)
    got = enc._vae_encode(pixels)
    assert torch.equal(got, want) and not enc.compiled_vae and len(calls) == 2
    assert len(messages) == 1 and "compiled VAE failed (RuntimeError: inductor: something broke)" in messages[0]
    assert "compile_vae = false" in messages[0]
    monkeypatch.setattr(encoding, "vae_encode_uint8", lambda *a: (_ for _ in ()).throw(RuntimeError("eager bug")))
    with pytest.raises(RuntimeError, match="eager bug"):  # eager errors are not swallowed
        enc._vae_encode(pixels)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the side stream exists on CUDA only"))])
def test_side_thread_sub_crops_equal_inline_encoding(tiny_sources, tmp_path, device):
    """Sub crops encoded by the side thread (on CUDA: on its own stream, the default there) give bit-identical
    entries to encoding them inline; same-size crops are batched; an error in the side thread reaches the caller."""
    from diffsynth_edit.cache.config import CacheConfig
    from diffsynth_edit.cache.encoder import SampleEncoder
    from diffsynth_edit.cache.samples import load_items, prepare_sample
    from diffsynth_edit.loading import load_pipeline

    pipe = load_pipeline(tiny_sources, device=device, torch_dtype=torch.float32)
    data = tmp_path / "data"
    data.mkdir()
    dataset = write_dataset(data, [
        make_sample(data, "a", 64, 64, 1, mask_box=(8, 24, 20, 44), ref_size=(48, 32)),
        make_sample(data, "b", 64, 64, 2, mask_box=(30, 46, 4, 28)),  # same crop size as "a": one batch
        make_sample(data, "c", 64, 64, 3, mask_box=(10, 50, 8, 30)),
        make_sample(data, "d", 64, 64, 4),  # no mask: the whole image is the crop
    ])
    cfg = CacheConfig(dataset=dataset, max_pixels=64 * 64)
    prepared = [prepare_sample(it, cfg.max_pixels, pipe) for it in load_items(cfg)]
    inline = SampleEncoder(pipe, torch.float32, batch_size=2, side_thread=False)
    side = SampleEncoder(pipe, torch.float32, batch_size=2, side_thread=True if device == "cpu" else None)
    assert inline._side_pool is None and side._side_pool is not None
    assert (side._side_stream is not None) == (device == "cuda")
    flags, real_subs = [], side._encode_subs

    def recording(samples):  # the attention flags the side thread's VAE sees
        flags.append(torch.backends.cuda.cudnn_sdp_enabled())
        out = real_subs(samples)
        flags.append(torch.backends.cuda.cudnn_sdp_enabled())
        return out

    side._encode_subs = recording
    try:
        want, got = inline.encode(prepared), side.encode(prepared)
        # constant for the whole step (the text encoder's switch on the main thread never flips it halfway)
        assert flags == [False, False] and torch.backends.cuda.cudnn_sdp_enabled()
        assert [sorted(w) for w in want] == [sorted(g) for g in got]
        for w, g in zip(want, got):
            for k in w:
                assert g[k].device.type == "cpu" and torch.equal(w[k], g[k]), k
        assert got[0]["sub_input_latents"].shape == got[1]["sub_input_latents"].shape != got[2]["sub_input_latents"].shape
        assert got[3]["sub_input_latents"].shape == got[3]["input_latents"].shape
        for g in got:
            assert g["sub_noise"].shape == g["sub_input_latents"].shape

        def broken(samples):
            raise RuntimeError("side thread failed")

        side._encode_subs = broken
        with pytest.raises(RuntimeError, match="side thread failed"):
            side.encode(prepared)
    finally:
        inline.close()
        side.close()


def test_worker_pool_starts_every_worker_at_once(tiny_pipe):
    """All workers start when the pool is made, even with a processor of megabytes (spawn would block the parent
    once per worker, and the executor would start the missing ones during a run); the processor file goes away with
    the pool."""
    import copy

    from diffsynth_edit.cache import workers as encode

    processor = copy.copy(tiny_pipe.processor)
    processor.ballast = bytes(4_000_000)  # the real Qwen processor pickles to several MB
    pool = encode._process_pool(3, processor)
    folder = encode._POOL[2]
    try:
        assert len(pool._processes) == 3
        assert (folder / "processor.pkl").stat().st_size > 4_000_000
        assert pool.submit(os.getpid).result(timeout=300) != os.getpid()
        assert encode._process_pool(3, processor) is pool  # kept for the next run of this process
    finally:
        encode._shutdown_pool()
    assert encode._POOL is None and not folder.exists()
