"""generate_dataset_json_mp.py build / sample-data and the image I/O beneath them (CPU, small images, fast)."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from diffsynth_edit import atomic
from diffsynth_edit.dataset import load_dataset
from diffsynth_edit.dataset.build_config import BuildConfig
from diffsynth_edit.dataset.builder import build_dataset, split_test_ids
from diffsynth_edit.dataset.cli import main as cli_main
from diffsynth_edit.dataset.masks import derive_mask
from diffsynth_edit.dataset.synthetic import make_sample_data
from diffsynth_edit.dataset.validate import validate_dataset
from diffsynth_edit.geometry import fit_size, mask_bbox
from diffsynth_edit.image_io import ImageDecodeError, open_mask, open_rgb

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# helpers

def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A textured RGB array (smooth gradient + mild noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 // max(w, 1) + 20, yy * 200 // max(h, 1) + 20, (xx + yy) % 90 + 80], -1)
    return np.clip(base + rng.integers(-3, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def save(arr_or_img, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path, **kw)
    return path


def box_mask(h: int, w: int, y1: int, y2: int, x1: int, x2: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 255
    return m


def make_raw_pair(root: Path, stem: str, h: int = 64, w: int = 64, box=(16, 40, 20, 44), seed: int = 0,
                  instruction: str | None = "Paint the box red.", mask: bool = True, ext: str = ".png") -> dict:
    """source/target differ (strongly) inside `box`; pixel-identical elsewhere. Returns the arrays."""
    src = rgb(h, w, seed)
    tgt = src.copy()
    y1, y2, x1, x2 = box
    tgt[y1:y2, x1:x2] = (230, 20, 20)
    save(src, root / "source" / f"{stem}{ext}")
    save(tgt, root / "target" / f"{stem}{ext}")
    if mask:
        save(box_mask(h, w, *box), root / "mask" / f"{stem}.png")
    if instruction is not None:
        (root / "source" / f"{stem}.txt").write_text(instruction + "\n", encoding="utf-8")
    return {"source": src, "target": tgt, "mask": box_mask(h, w, *box) > 127}


def build(tmp: Path, raw: Path | None = None, out: str = "out/ds.json", mask: bool = True, **kw):
    raw = raw or tmp / "raw"
    cfg = dict(out=tmp / out, source_dir=raw / "source", target_dir=raw / "target", workers=1, progress=False)
    if mask and (raw / "mask").is_dir():
        cfg["mask_dir"] = raw / "mask"
    cfg.update(kw)
    return build_dataset(BuildConfig(**cfg))


def report_of(summary) -> dict:
    return json.loads(summary.report_path.read_text())


def problems(summary, reason: str) -> list[dict]:
    return [p for p in report_of(summary)["problems"] if p["reason"] == reason]


def arr(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def files_under(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


# ---------------------------------------------------------------------------------------------------------------
# sample data


def test_sample_data_is_deterministic_and_edits_a_decent_region(tmp_path):
    a = make_sample_data(tmp_path / "a", count=9, size=64, seed=3)
    b = make_sample_data(tmp_path / "b", count=9, size=64, seed=3)
    c = make_sample_data(tmp_path / "c", count=9, size=64, seed=4)
    same = [(a.source_dir / f"{s}.png").read_bytes() == (b.source_dir / f"{s}.png").read_bytes() for s in a.stems]
    assert all(same)
    assert any((a.target_dir / f"{s}.png").read_bytes() != (c.target_dir / f"{s}.png").read_bytes() for s in a.stems)
    types = {row["edit_type"] for row in csv.DictReader((a.root / "edit_types.csv").open())}
    assert len(types) == 3  # recolour, add, remove all present in 9 samples
    for s in a.stems:
        m = arr(a.mask_dir / f"{s}.png") > 127
        src, tgt = arr(a.source_dir / f"{s}.png"), arr(a.target_dir / f"{s}.png")
        assert src.shape == (64, 64, 3) and 0.10 <= m.mean() <= 0.40
        assert np.array_equal(src[~m], tgt[~m])  # background untouched
        assert (src[m] != tgt[m]).any()  # something was edited
        assert (a.source_dir / f"{s}.txt").read_text().strip()


def test_sample_data_cli_then_build_then_validate(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert cli_main(["sample-data", "--out", str(raw), "--count", "5", "--size", "48"]) == 0
    out = tmp_path / "ds.json"
    rc = cli_main(["build", "--source-dir", str(raw / "source"), "--target-dir", str(raw / "target"),
                   "--mask-dir", str(raw / "mask"), "--instructions", str(raw / "edit_types.csv"),
                   "--out", str(out), "--workers", "1", "--progress", "false"])
    assert rc == 0
    assert len(json.loads(out.read_text())) == 5
    assert cli_main(["validate", str(out), "--workers", "1", "--progress", "false"]) == 0
    assert "5 entries, 0 errors" in capsys.readouterr().out


def test_sample_data_size_must_be_multiple_of_16(tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["sample-data", "--out", str(tmp_path / "x"), "--size", "50"])


def test_thin_entry_script_runs(tmp_path):
    raw = tmp_path / "raw"
    make_sample_data(raw, count=3, size=32)
    out = tmp_path / "ds.json"
    cmd = [sys.executable, str(REPO / "generate_dataset_json_mp.py"), "build", "--samples-dir", str(raw),
           "--instructions", str(raw / "edit_types.csv"), "--out", str(out), "--workers", "1"]
    # paired folders are not sample folders: every folder lacks source.*/target.* -> nothing written, exit 1
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "missing_source" in res.stdout
    cmd[3:5] = ["--source-dir", str(raw / "source"), "--target-dir", str(raw / "target")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(json.loads(out.read_text())) == 3


# ---------------------------------------------------------------------------------------------------------------
# layouts and keys


def test_paired_layout_entries_follow_the_contract(tmp_path):
    data = make_sample_data(tmp_path / "raw", count=6, size=64, seed=1)
    s = build(tmp_path, instructions=data.instructions)
    assert s.exit_code() == 0 and s.built == 6 and not s.errors
    records = json.loads((tmp_path / "out/ds.json").read_text())
    assert [r["id"] for r in records] == data.stems  # sorted by stem
    types = {row["stem"]: row["edit_type"] for row in csv.DictReader(data.instructions.open())}
    for r in records:
        assert list(r) == ["prompt", "image", "edit_image", "back_mask", "ref_gt", "ref_gt_crop", "edit_type", "id"]
        text = (data.source_dir / f"{r['id']}.txt").read_text().strip()
        assert r["prompt"] == f"Picture 1 is the image to modify. {text}"
        assert r["edit_type"] == types[r["id"]]
        assert isinstance(r["edit_image"], list) and len(r["edit_image"]) == 1
        for key in ("image", "back_mask", "ref_gt", "ref_gt_crop"):
            assert not Path(r[key]).is_absolute() and r[key].startswith("ds_files/")
        base = tmp_path / "out"
        # image is the TARGET, edit_image[0] the SOURCE
        assert np.array_equal(arr(base / r["image"]), arr(data.target_dir / f"{r['id']}.png"))
        assert np.array_equal(arr(base / r["edit_image"][0]), arr(data.source_dir / f"{r['id']}.png"))
        m = arr(base / r["back_mask"])
        assert Image.open(base / r["back_mask"]).mode == "L" and set(np.unique(m)) <= {0, 255}
    assert not validate_dataset(tmp_path / "out/ds.json").issues


def test_samples_dir_layout_with_refs_and_prompt_txt(tmp_path):
    data = make_sample_data(tmp_path / "raw", count=3, size=48, layout="samples", seed=2)
    first = tmp_path / "raw" / data.stems[0]
    save(rgb(40, 80, 5), first / "ref_2.png")
    save(rgb(32, 32, 6), first / "ref_1.jpg")  # already 16-aligned: copied as is
    s = build_dataset(BuildConfig(out=tmp_path / "ds.json", samples_dir=tmp_path / "raw",
                                  instructions=data.instructions, workers=1, progress=False))
    assert len(s.records) == 3 and not s.errors
    rec = s.records[0]
    assert rec["id"] == data.stems[0]
    assert rec["prompt"].endswith((first / "prompt.txt").read_text().strip())
    assert len(rec["edit_image"]) == 3 and rec["edit_image"][1].endswith("_1.jpg") \
        and rec["edit_image"][2].endswith("_2.png")
    assert Image.open(tmp_path / rec["edit_image"][2]).size == fit_size(80, 40)  # refs keep their own size


def test_instruction_sources_and_precedence(tmp_path):
    raw = tmp_path / "raw"
    make_raw_pair(raw, "a", instruction="from txt a")
    make_raw_pair(raw, "b", instruction="from txt b")
    make_raw_pair(raw, "c", instruction=None)
    make_raw_pair(raw, "d", instruction=None)
    table = raw / "meta.jsonl"
    table.write_text(json.dumps({"stem": "a", "instruction": "from jsonl a", "edit_type": "Recolor"}) + "\n"
                     + json.dumps({"stem": "c", "edit_type": "Add"}) + "\n")
    s = build(tmp_path, instructions=table, instruction="global", prompt_template="Edit: {instruction}!")
    by_id = {r["id"]: r for r in s.records}
    p = "Picture 1 is the image to modify. "  # prompts.edit_prompt's prefix around the template's wording
    assert by_id["a"]["prompt"] == p + "Edit: from jsonl a!" and by_id["a"]["edit_type"] == "Recolor"
    assert by_id["b"]["prompt"] == p + "Edit: from txt b!" and "edit_type" not in by_id["b"]
    assert by_id["c"]["prompt"] == p + "Edit: global!" and by_id["c"]["edit_type"] == "Add"
    assert by_id["d"]["prompt"] == p + "Edit: global!"
    csv_table = raw / "meta.csv"
    csv_table.write_text("stem,instruction,edit_type\nd,from csv d,Remove\n", encoding="utf-8")
    s2 = build(tmp_path, out="out2/ds.json", instructions=csv_table)
    by_id = {r["id"]: r for r in s2.records}
    assert by_id["d"]["prompt"].endswith("from csv d") and by_id["d"]["edit_type"] == "Remove"
    # c has no text anywhere without --instruction
    assert [p["id"] for p in problems(s2, "missing_instruction")] == ["c"]


def test_ref_dir_pairs_refs_by_stem_and_number(tmp_path):
    raw = tmp_path / "raw"
    make_raw_pair(raw, "x")
    make_raw_pair(raw, "y")
    save(rgb(20, 100, 1), raw / "refs" / "x_10.png")
    save(rgb(64, 64, 2), raw / "refs" / "x_2.png")
    save(rgb(64, 64, 3), raw / "refs" / "x_1.webp", lossless=True)
    save(rgb(64, 64, 4), raw / "refs" / "zzz_1.png")  # no pair: warned
    s = build(tmp_path, ref_dir=raw / "refs", max_pixels=48 * 48)
    x = next(r for r in s.records if r["id"] == "x")
    assert [Path(p).name.rsplit(".", 1)[0] for p in x["edit_image"][1:]] == ["x_1", "x_2", "x_3"]
    sizes = [Image.open(tmp_path / "out" / p).size for p in x["edit_image"][1:]]
    assert sizes == [fit_size(64, 64, 48 * 48), fit_size(64, 64, 48 * 48), fit_size(100, 20, 48 * 48)]
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= 48 * 48 for w, h in sizes)
    y = next(r for r in s.records if r["id"] == "y")
    assert len(y["edit_image"]) == 1
    assert [p["file"] for p in problems(s, "unused_file")] == [str(raw / "refs" / "zzz_1.png")]


def test_corrupt_reference_rejects_its_sample_without_leftovers(tmp_path):
    raw = tmp_path / "raw"
    make_raw_pair(raw, "x")
    make_raw_pair(raw, "y")
    (raw / "refs").mkdir()
    (raw / "refs" / "y_1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    s = build(tmp_path, ref_dir=raw / "refs")
    assert [r["id"] for r in s.records] == ["x"]
    (p,) = problems(s, "decode_error")
    assert p["id"] == "y" and p["file"] == str(raw / "refs" / "y_1.png")
    assert not [f for f in files_under(tmp_path / "out" / "ds_files") if f.stem.startswith("y")]


# ---------------------------------------------------------------------------------------------------------------
# image formats and modes


def test_open_rgb_handles_modes_exif_and_alpha(tmp_path):
    base = rgb(32, 48, 1)
    rgba = np.dstack([base, np.full((32, 48), 255, np.uint8)])
    rgba[:, :10, 3] = 0  # transparent strip -> white
    save(rgba, tmp_path / "rgba.png")
    out = np.asarray(open_rgb(tmp_path / "rgba.png"))
    assert out.shape == (32, 48, 3) and (out[:, :10] == 255).all() and np.array_equal(out[:, 10:], base[:, 10:])

    grey16 = (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)
    save(grey16, tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and out.shape == (32, 48, 3)
    assert np.array_equal(out[..., 0], np.round(grey16 / 257).astype(np.uint8))

    pal = Image.fromarray(base).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    out = np.asarray(open_rgb(tmp_path / "pal.png"))
    assert (out[np.asarray(pal) == 0] == 255).all()

    save(Image.fromarray(base).convert("L"), tmp_path / "grey.jpg", quality=95)
    assert open_rgb(tmp_path / "grey.jpg").mode == "RGB"

    im = Image.fromarray(base)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = open_rgb(tmp_path / "rot.jpg")
    assert out.size == (32, 48)
    assert np.array_equal(np.asarray(out), np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg"))))


def test_open_mask_alpha_rules(tmp_path):
    strokes = np.zeros((16, 16, 4), np.uint8)
    strokes[4:8, 4:8] = 255  # white, opaque strokes on a transparent background
    save(strokes, tmp_path / "strokes.png")
    m = np.asarray(open_mask(tmp_path / "strokes.png"))
    assert (m[4:8, 4:8] == 255).all() and m.sum() == 16 * 255
    matte = np.zeros((16, 16, 4), np.uint8)
    matte[2:5, 2:5, 3] = 255  # black everywhere, alpha = the region
    save(matte, tmp_path / "matte.png")
    m = np.asarray(open_mask(tmp_path / "matte.png"))
    assert (m[2:5, 2:5] == 255).all() and m.sum() == 9 * 255
    red = np.zeros((16, 16, 4), np.uint8)
    red[3:9, 5:7] = (255, 0, 0, 255)  # a red brush on a transparent layer (luminance 76 would binarise to nothing)
    save(red, tmp_path / "red.png")
    m = np.asarray(open_mask(tmp_path / "red.png"))
    assert (m[3:9, 5:7] == 255).all() and m.sum() == 12 * 255
    opaque = np.zeros((16, 16, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[0:4, 0:2, :3] = 255  # opaque alpha: the luminance is the mask
    save(opaque, tmp_path / "opaque.png")
    m = np.asarray(open_mask(tmp_path / "opaque.png"))
    assert (m[0:4, 0:2] == 255).all() and m.sum() == 8 * 255
    # the editor (and so the cache and the app) reads every one of these masks the same way
    from diffsynth_edit.editing.editor import prepare_mask

    for name in ("strokes", "matte", "red", "opaque"):
        got, _ = prepare_mask(Image.open(tmp_path / f"{name}.png"), (16, 16))
        assert np.array_equal(np.asarray(got), (np.asarray(open_mask(tmp_path / f"{name}.png")) > 127) * 255), name


def test_open_rejects_corrupt_and_truncated_files(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    good = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(good, "PNG")
    (tmp_path / "trunc.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    for name in ("junk.png", "trunc.png"):
        with pytest.raises(ImageDecodeError) as e:
            open_rgb(tmp_path / name)
        assert name in str(e.value) and "cannot decode" in str(e.value)


def test_build_accepts_every_common_format_and_mode(tmp_path):
    raw = tmp_path / "raw"
    h, w = 48, 64
    cases = {}
    for stem, ext, conv in [("png_rgba", ".png", "RGBA"), ("jpeg", ".jpg", "RGB"), ("webp", ".webp", "RGB"),
                            ("grey", ".png", "L"), ("palette", ".png", "P")]:
        src = rgb(h, w, 1)
        tgt = src.copy()
        tgt[8:32, 8:40] = (20, 200, 30)
        kw = {"quality": 95} if ext == ".jpg" else {"lossless": True} if ext == ".webp" else {}
        for name, a in (("source", src), ("target", tgt)):
            img = Image.fromarray(a).convert(conv)
            save(img, raw / name / f"{stem}{ext}", **kw)
        save(box_mask(h, w, 8, 32, 8, 40), raw / "mask" / f"{stem}.png")
        cases[stem] = tgt
    s = build(tmp_path, instruction="Make it green.")
    assert not s.errors and len(s.records) == 5
    for r in s.records:
        out = Image.open(tmp_path / "out" / r["image"])
        assert out.mode == "RGB" and out.size == (w, h)
    rgba = next(r for r in s.records if r["id"] == "png_rgba")
    assert np.array_equal(arr(tmp_path / "out" / rgba["image"]), cases["png_rgba"])


def test_exif_rotated_source_pairs_with_an_upright_target(tmp_path):
    raw = tmp_path / "raw"
    upright = rgb(64, 32, 3)  # 32 wide, 64 high as displayed
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # stored 64x32; orientation 6 turns it back upright
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    save(im, raw / "source" / "a.jpg", exif=exif.tobytes(), quality=100, subsampling=0)
    tgt = upright.copy()
    tgt[8:24, 8:24] = (250, 250, 0)
    save(tgt, raw / "target" / "a.png")
    s = build(tmp_path, instruction="x", max_bg_change=1.0)
    assert not s.errors, s.format()
    src_out = Image.open(tmp_path / "out" / s.records[0]["edit_image"][0])
    assert src_out.size == (32, 64) and s.records[0]["edit_image"][0].endswith(".png")  # re-encoded, upright
    assert np.abs(np.asarray(src_out).astype(int) - upright).mean() < 3  # JPEG-close to the upright pixels


# ---------------------------------------------------------------------------------------------------------------
# masks, ref_gt, fixed source, resizing


def test_mask_derivation_threshold_and_dilation(tmp_path):
    raw = tmp_path / "raw"
    src = rgb(64, 64, 0)
    tgt = src.astype(np.int16)
    tgt[20:30, 24:36] += 100  # the edit
    tgt += 10  # global change below the threshold (24)
    tgt = np.clip(tgt, 0, 255).astype(np.uint8)
    save(src, raw / "source" / "a.png")
    save(tgt, raw / "target" / "a.png")
    s = build(tmp_path, instruction="x", max_bg_change=1.0)
    m = arr(tmp_path / "out" / s.records[0]["back_mask"]) > 127
    expected = np.zeros((64, 64), bool)
    expected[18:32, 22:38] = True  # the 10x12 edit dilated by 2 px
    assert np.array_equal(m, expected)
    assert report_of(s)["problems"] == []
    # dilation 0 and a threshold above the edit: derived mask is empty -> reported, nothing written
    s0 = build(tmp_path, out="o0/ds.json", instruction="x", mask_dilation=0, max_bg_change=1.0)
    assert np.array_equal(arr(tmp_path / "o0" / s0.records[0]["back_mask"]) > 127, np.pad(
        np.ones((10, 12), bool), ((20, 34), (24, 28))))
    s2 = build(tmp_path, out="o2/ds.json", instruction="x", diff_threshold=120)
    (p,) = problems(s2, "empty_mask")
    assert p["id"] == "a" and "derived mask is empty" in p["detail"] and s2.exit_code() == 1
    # the function itself
    assert derive_mask(src, src).sum() == 0


def test_ref_gt_and_crop_geometry(tmp_path):
    raw = tmp_path / "raw"
    pair = make_raw_pair(raw, "a", h=64, w=96, box=(21, 37, 35, 50))
    s = build(tmp_path)
    r = s.records[0]
    base = tmp_path / "out"
    mask = arr(base / r["back_mask"]) > 127
    ref = arr(base / r["ref_gt"])
    crop = arr(base / r["ref_gt_crop"])
    assert ref.shape == (64, 96, 3)
    assert (ref[~mask] == 255).all() and np.array_equal(ref[mask], pair["target"][mask])
    box = mask_bbox(mask, (64, 96))
    assert (box.y1, box.y2, box.x1, box.x2) == (16, 48, 32, 64)  # 16-aligned outward
    assert crop.shape == (box.height, box.width, 3)
    assert np.array_equal(crop, ref[box.y1:box.y2, box.x1:box.x2])


def test_fixed_source_background_is_the_target(tmp_path):
    raw = tmp_path / "raw"
    src = rgb(64, 64, 0)
    tgt = np.clip(src.astype(np.int16) + 6, 0, 255).astype(np.uint8)  # background drifts slightly
    tgt[16:40, 16:40] = (10, 10, 240)
    save(src, raw / "source" / "a.png")
    save(tgt, raw / "target" / "a.png")
    save(box_mask(64, 64, 16, 40, 16, 40), raw / "mask" / "a.png")
    s = build(tmp_path, instruction="x", fixed_source=True)
    r = s.records[0]
    assert r["edit_image"][0].startswith("ds_files/fixed/")
    fixed = arr(tmp_path / "out" / r["edit_image"][0])
    mask = arr(tmp_path / "out" / r["back_mask"]) > 127
    assert np.array_equal(fixed[~mask], tgt[~mask])  # pixel-identical background
    assert np.array_equal(fixed[mask], src[mask])
    assert not (tmp_path / "out/ds_files/source").exists()


def test_resizing_to_max_pixels_16_aligned(tmp_path):
    raw = tmp_path / "raw"
    tgt = rgb(100, 200, 1)
    save(tgt, raw / "target" / "a.png")
    save(rgb(100, 201, 2), raw / "source" / "a.png")  # 0.5 % aspect difference: resized, not rejected
    save(box_mask(100, 200, 20, 60, 50, 120), raw / "mask" / "a.png")
    s = build(tmp_path, instruction="x", max_pixels=64 * 64, max_bg_change=1.0)
    assert not s.errors, s.format()
    r = s.records[0]
    want = fit_size(200, 100, 64 * 64)
    assert want[0] * want[1] <= 64 * 64 and want[0] % 16 == 0 and want[1] % 16 == 0
    for key in ("image", "back_mask", "ref_gt"):
        assert Image.open(tmp_path / "out" / r[key]).size == want
    assert Image.open(tmp_path / "out" / r["edit_image"][0]).size == want
    assert set(np.unique(arr(tmp_path / "out" / r["back_mask"]))) == {0, 255}  # NEAREST keeps it binary
    assert np.array_equal(arr(tmp_path / "out" / r["image"]),
                          np.asarray(Image.fromarray(tgt).resize(want, Image.LANCZOS)))


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_every_bad_input_is_reported_and_the_rest_completes(tmp_path, capsys):
    raw = tmp_path / "raw"
    make_raw_pair(raw, "good1")
    make_raw_pair(raw, "good2")
    make_raw_pair(raw, "corrupt")
    (raw / "target" / "corrupt.png").write_bytes(b"\x89PNG garbage")
    make_raw_pair(raw, "trunc")
    data = (raw / "source" / "trunc.png").read_bytes()
    (raw / "source" / "trunc.png").write_bytes(data[: len(data) // 2])
    make_raw_pair(raw, "notarget")
    (raw / "target" / "notarget.png").unlink()
    make_raw_pair(raw, "nosource")
    (raw / "source" / "nosource.png").unlink()
    make_raw_pair(raw, "aspect")
    save(rgb(64, 40), raw / "source" / "aspect.png")
    make_raw_pair(raw, "emptymask")
    save(np.zeros((64, 64), np.uint8), raw / "mask" / "emptymask.png")
    make_raw_pair(raw, "badutf8")
    (raw / "source" / "badutf8.txt").write_bytes(b"caf\xe9 au lait\xff")
    make_raw_pair(raw, "dup")
    save(rgb(64, 64), raw / "source" / "dup.jpg")
    make_raw_pair(raw, "maskaspect")
    save(box_mask(32, 64, 0, 10, 0, 10), raw / "mask" / "maskaspect.png")

    s = build(tmp_path)
    assert sorted(r["id"] for r in s.records) == ["good1", "good2"]
    rep = report_of(s)
    got = {(p["id"], p["reason"]): p for p in rep["problems"]}
    expect = {
        ("corrupt", "decode_error"): raw / "target" / "corrupt.png",
        ("trunc", "decode_error"): raw / "source" / "trunc.png",
        ("notarget", "missing_target"): raw / "source" / "notarget.png",
        ("nosource", "missing_source"): raw / "target" / "nosource.png",
        ("aspect", "size_mismatch"): raw / "source" / "aspect.png",
        ("maskaspect", "size_mismatch"): raw / "mask" / "maskaspect.png",
        ("emptymask", "empty_mask"): raw / "mask" / "emptymask.png",
        ("badutf8", "bad_prompt_file"): raw / "source" / "badutf8.txt",
        ("dup", "duplicate_stem"): raw / "source" / "dup.jpg",
    }
    for key, file in expect.items():
        assert key in got, f"{key} not reported: {sorted(got)}"
        assert got[key]["file"] == str(file) and got[key]["kind"] == "error" and got[key]["detail"]
    assert "dup.png" in got[("dup", "duplicate_stem")]["detail"]
    assert "UTF-8" in got[("badutf8", "bad_prompt_file")]["detail"]
    assert rep["counts"]["written"] == 2 and rep["counts"]["errors"]["decode_error"] == 2
    assert s.exit_code() == 0 and s.exit_code(strict=True) == 1
    printed = s.format()
    assert "decode_error" in printed and str(raw / "target" / "corrupt.png") in printed
    # the CLI: exit 0 with the summary printed, 1 under --strict
    argv = ["build", "--source-dir", str(raw / "source"), "--target-dir", str(raw / "target"),
            "--mask-dir", str(raw / "mask"), "--out", str(tmp_path / "cli/ds.json"), "--workers", "1",
            "--progress", "false"]
    assert cli_main(argv) == 0
    assert "missing_target" in capsys.readouterr().out
    assert cli_main(argv + ["--strict"]) == 1


def test_missing_mask_is_derived_with_a_warning(tmp_path):
    raw = tmp_path / "raw"
    make_raw_pair(raw, "a")
    make_raw_pair(raw, "b")
    (raw / "mask" / "b.png").unlink()
    s = build(tmp_path)
    assert len(s.records) == 2
    (w,) = problems(s, "mask_missing")
    assert w["id"] == "b" and w["kind"] == "warning"
    assert s.exit_code(strict=True) == 0  # warnings are not bad input


def test_filters_count_each_reason(tmp_path):
    raw = tmp_path / "raw"
    make_raw_pair(raw, "ok")
    make_raw_pair(raw, "tiny", box=(10, 11, 10, 11))  # 1/4096 of the image < 0.001
    make_raw_pair(raw, "huge", box=(0, 64, 0, 63))
    pair = make_raw_pair(raw, "bg")
    noisy = pair["target"].astype(np.int16) + np.where(pair["mask"][..., None], 0, 60)
    save(np.clip(noisy, 0, 255).astype(np.uint8), raw / "target" / "bg.png")
    s = build(tmp_path)
    assert [r["id"] for r in s.records] == ["ok"]
    assert report_of(s)["counts"]["filtered"] == {"background_changed": 1, "mask_too_large": 1, "mask_too_small": 1}
    assert {p["id"]: p["reason"] for p in report_of(s)["problems"]} == {
        "tiny": "mask_too_small", "huge": "mask_too_large", "bg": "background_changed"}
    s2 = build(tmp_path, max_bg_change=1.0, min_mask_area=0.0, max_mask_area=1.0)
    assert len(s2.records) == 4 and s2.built == 3  # filters re-applied from the sidecars; "ok" reused


# ---------------------------------------------------------------------------------------------------------------
# splits, JSONL, workers


def test_splits_are_reproducible_by_seed(tmp_path):
    data = make_sample_data(tmp_path / "raw", count=12, size=32, seed=0)

    def run(out, **kw):
        s = build(tmp_path, out=out, instructions=data.instructions, **kw)
        train = json.loads((tmp_path / out).with_name(Path(out).stem + "_train.json").read_text())
        test = json.loads((tmp_path / out).with_name(Path(out).stem + "_test.json").read_text())
        return s, [r["id"] for r in train], [r["id"] for r in test]

    s, train, test = run("a/ds.json", test_fraction=0.25, seed=7)
    assert len(test) == 3 and len(train) == 9 and sorted(train + test) == data.stems
    _, train2, test2 = run("b/other.json", test_fraction=0.25, seed=7)
    assert test2 == test and train2 == train
    seeds = {tuple(run(f"s{k}/ds.json", test_fraction=0.25, seed=k)[2]) for k in range(4)}
    assert len(seeds) > 1  # the seed matters
    _, train3, test3 = run("c/ds.json", test_per_type=1, seed=7)
    types = {r["id"]: r["edit_type"] for r in s.records}
    assert sorted(types[i] for i in test3) == sorted(set(types.values()))  # one per edit type
    assert split_test_ids(s.records, test_per_type=1, seed=7) == set(test3)


def test_jsonl_and_workers_give_the_same_dataset(tmp_path):
    data = make_sample_data(tmp_path / "raw", count=6, size=32, seed=5)
    s1 = build(tmp_path, out="one/ds.json", instructions=data.instructions, jsonl=True)
    s2 = build(tmp_path, out="two/ds.json", instructions=data.instructions, workers=2)
    assert s1.records == [{**r} for r in s2.records]
    lines = (tmp_path / "one/ds.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == json.loads((tmp_path / "one/ds.json").read_text())
    a = load_dataset(tmp_path / "one/ds.json")
    b = load_dataset(tmp_path / "one/ds.jsonl")
    assert a == b and a[0].image == tmp_path / "one" / s1.records[0]["image"]


# ---------------------------------------------------------------------------------------------------------------
# re-runs and atomicity


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino) for p in files_under(root)}


def test_rerun_rewrites_nothing_and_rebuilds_only_changed_samples(tmp_path):
    data = make_sample_data(tmp_path / "raw", count=5, size=32, seed=9)
    first = build(tmp_path, instructions=data.instructions, test_fraction=0.4, jsonl=True)
    assert first.built == 5
    before = _snapshot(tmp_path / "out")
    again = build(tmp_path, instructions=data.instructions, test_fraction=0.4, jsonl=True)
    assert again.built == 0 and again.reused == 5 and again.written_files == []
    assert _snapshot(tmp_path / "out") == before
    # touching an input changes nothing (content hash, not mtime)
    os.utime(data.target_dir / f"{data.stems[1]}.png")
    assert build(tmp_path, instructions=data.instructions, test_fraction=0.4, jsonl=True).built == 0
    # editing one input rebuilds that sample only
    tgt = arr(data.target_dir / f"{data.stems[2]}.png").copy()
    tgt[0, 0] = 255 - tgt[0, 0]
    save(tgt, data.target_dir / f"{data.stems[2]}.png")
    third = build(tmp_path, instructions=data.instructions, test_fraction=0.4, jsonl=True)
    assert third.built == 1 and third.reused == 4
    # a changed setting that shapes the outputs rebuilds everything
    assert build(tmp_path, instructions=data.instructions, fixed_source=True).built == 5
    # a deleted derived file is rebuilt
    (tmp_path / "out" / third.records[0]["ref_gt"]).unlink()
    assert build(tmp_path, instructions=data.instructions, fixed_source=True).built == 1


class Crash(BaseException):
    """Stands for a kill in the middle of a write (not caught by the builder's per-sample error handling)."""


def test_crash_while_replacing_the_json_keeps_the_previous_json(tmp_path, monkeypatch):
    data = make_sample_data(tmp_path / "raw", count=3, size=32)
    build(tmp_path, instructions=data.instructions)
    json_path = tmp_path / "out" / "ds.json"
    old = json_path.read_bytes()
    make_sample_data(tmp_path / "raw", count=4, size=32)  # one more sample -> the JSON must change
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == json_path:
            raise Crash()
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(Crash):
        build(tmp_path, instructions=data.instructions)
    assert json_path.read_bytes() == old
    assert not [p for p in files_under(tmp_path / "out") if p.name.endswith(".tmp")]
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert len(build(tmp_path, instructions=data.instructions).records) == 4


def test_crash_midway_through_an_image_write_leaves_no_partial_file(tmp_path, monkeypatch):
    data = make_sample_data(tmp_path / "raw", count=4, size=32)
    real_save = Image.Image.save
    calls = {"n": 0}

    def flaky_save(self, fp, format=None, **params):
        calls["n"] += 1
        if calls["n"] == 7:  # the third sample's first derived file (3 PNG saves per sample): half, then die
            buf = io.BytesIO()
            real_save(self, buf, format=format, **params)
            Path(fp).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise Crash()
        return real_save(self, fp, format=format, **params)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(Crash):
        build(tmp_path, instructions=data.instructions)
    out = tmp_path / "out"
    assert not (out / "ds.json").exists()  # no half-written JSON
    written = files_under(out)
    assert written and not [p for p in written if p.name.endswith(".tmp")]
    for p in written:
        if p.suffix == ".png":
            Image.open(p).load()  # every file that exists is complete
    monkeypatch.setattr(Image.Image, "save", real_save)
    s = build(tmp_path, instructions=data.instructions)
    assert len(s.records) == 4 and s.reused >= 1 and s.built <= 3
    assert not validate_dataset(out / "ds.json").errors


def test_atomic_helpers(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic.atomic_write_text(p, "one")
    assert atomic.atomic_write_if_changed(p, "one") is False
    assert atomic.atomic_write_if_changed(p, "two") is True and p.read_text() == "two"
    assert oct(p.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert p.read_text() == "two" and os.listdir(p.parent) == ["f.txt"]


def test_an_interrupted_cleanup_leaves_the_temporary_file_to_remove_unfinished_temp_files(tmp_path, monkeypatch):
    """A signal can cut short `atomic_path`'s own removal of a failed write's temporary file; the file then stays
    registered and `remove_unfinished_temp_files` removes it. Finished and cleanly failed writes leave nothing
    registered; a forked child does not remove its parent's unfinished files."""
    import pathlib

    from diffsynth_edit import atomic

    p = tmp_path / "f.txt"
    atomic.atomic_write_text(p, "one")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(p) as tmp:
            raise RuntimeError("boom")
    assert atomic.remove_unfinished_temp_files() == []

    def interrupted_unlink(self, missing_ok=False):
        raise KeyboardInterrupt  # as a signal's exception arriving just before the removal

    monkeypatch.setattr(pathlib.Path, "unlink", interrupted_unlink)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(p) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    monkeypatch.undo()
    assert tmp.exists() and sorted(x.name for x in tmp_path.iterdir()) == sorted(["f.txt", tmp.name])

    pid = os.fork()
    if pid == 0:  # the child: nothing of its own to remove
        os._exit(len(atomic.remove_unfinished_temp_files()))
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 and tmp.exists()

    assert atomic.remove_unfinished_temp_files() == [tmp]
    assert os.listdir(tmp_path) == ["f.txt"] and p.read_text() == "one"
    assert atomic.remove_unfinished_temp_files() == []
    assert atomic.final_name_of_temp(tmp.name) == "f.txt"
    assert atomic.final_name_of_temp("f.txt") is None and atomic.final_name_of_temp(".f.txt.tmp") is None


def test_sigterm_raises_removes_the_temporary_file_whose_cleanup_the_signal_cut_short(tmp_path, monkeypatch):
    """SIGTERM arriving while `atomic_path` removes a failed write's temporary file: `Terminated` leaves
    `sigterm_raises` with the file removed (the dataset workers and the cache CLI rely on this)."""
    import pathlib
    import time

    from diffsynth_edit.atomic import atomic_path
    from diffsynth_edit.lifetime import Terminated, sigterm_raises

    def unlink_as_sigterm_arrives(self, missing_ok=False):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, before any removal
        time.sleep(10)
        raise AssertionError("SIGTERM did not raise")

    p = tmp_path / "f.txt"
    with pytest.raises(Terminated):
        with sigterm_raises():
            with atomic_path(p) as tmp:
                monkeypatch.setattr(pathlib.Path, "unlink", unlink_as_sigterm_arrives)
                raise OSError(28, "No space left on device")
    monkeypatch.undo()
    assert not tmp.exists() and os.listdir(tmp_path) == []


def test_instructions_file_bad_rows_reported_with_their_lines(tmp_path):
    """A JSONL instructions file: unparsable lines and rows without a stem are reported (file:line) and skipped,
    the good rows used; a JSON list that does not parse stops with a message naming the file."""
    raw = tmp_path / "raw"
    make_raw_pair(raw, "a", instruction=None)
    make_raw_pair(raw, "b", instruction=None)
    table = raw / "meta.jsonl"
    table.write_text(json.dumps({"stem": "a", "instruction": "paint it"}) + "\n{not json\n\n"
                     + json.dumps({"instruction": "no stem"}) + "\n"
                     + json.dumps({"stem": "b", "instruction": "blur it"}) + "\n")
    s = build(tmp_path, instructions=table)
    by_id = {r["id"]: r for r in s.records}
    assert by_id["a"]["prompt"].endswith("paint it") and by_id["b"]["prompt"].endswith("blur it")
    where = sorted(p["file"] for p in problems(s, "bad_instructions_row"))
    assert where == [f"{table}:2", f"{table}:4"]
    from diffsynth_edit.config import ConfigError

    broken = raw / "meta.json"
    broken.write_text('[{"stem": "a",\n "instruction": ]')
    with pytest.raises(ConfigError, match=r"instructions file .*meta\.json: invalid JSON at line 2"):
        build(tmp_path, out="o2/ds.json", instructions=broken)
