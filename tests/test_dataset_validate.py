"""`validate` and the dataset schema loader: each defect is caught and named (entry index/id, key, file)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsynth_edit.dataset.build_config import BuildConfig
from diffsynth_edit.dataset.builder import build_dataset
from diffsynth_edit.dataset.cli import main as cli_main
from diffsynth_edit.dataset.schema import (DatasetEntry, DatasetFormatError, load_dataset, load_dataset_json,
                                           save_dataset_json)
from diffsynth_edit.dataset.synthetic import make_sample_data
from diffsynth_edit.dataset.validate import validate_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A valid dataset (6 samples, 48 px) built from the synthetic sample data."""
    root = tmp_path_factory.mktemp("validate")
    data = make_sample_data(root / "raw", count=6, size=48, seed=11)
    s = build_dataset(BuildConfig(out=root / "ds" / "ds.json", source_dir=data.source_dir,
                                  target_dir=data.target_dir, mask_dir=data.mask_dir,
                                  instructions=data.instructions, workers=1, progress=False))
    assert len(s.records) == 6
    return root / "ds"


@pytest.fixture()
def ds(built, tmp_path) -> Path:
    """A private copy of the built dataset to break."""
    shutil.copytree(built, tmp_path / "ds")
    return tmp_path / "ds" / "ds.json"


def records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def rewrite(path: Path, recs: list[dict]) -> None:
    path.write_text(json.dumps(recs, indent=1))


def issues(path: Path, level: str | None = None, **kw):
    rep = validate_dataset(path, workers=1, **kw)
    return [i for i in rep.issues if level is None or i.level == level]


def test_a_good_dataset_passes(ds, capsys):
    assert issues(ds) == []
    assert cli_main(["validate", str(ds), "--workers", "1", "--progress", "false"]) == 0
    assert "6 entries, 0 errors, 0 warnings - OK" in capsys.readouterr().out


def test_missing_file(ds, capsys):
    recs = records(ds)
    (ds.parent / recs[2]["ref_gt"]).unlink()
    (err,) = issues(ds, "error")
    assert (err.index, err.id, err.key) == (2, recs[2]["id"], "ref_gt")
    assert err.file == str(ds.parent / recs[2]["ref_gt"]) and "not found" in err.message
    assert cli_main(["validate", str(ds), "--workers", "1", "--progress", "false"]) == 1
    out = capsys.readouterr().out
    assert f"entry 2 (id {recs[2]['id']})" in out and "`ref_gt`" in out and recs[2]["ref_gt"] in out


def test_undecodable_file(ds):
    recs = records(ds)
    target = ds.parent / recs[1]["image"]
    target.write_bytes(target.read_bytes()[:60])  # truncated
    errs = issues(ds, "error")
    assert [(e.index, e.key) for e in errs] == [(1, "image")]
    assert "cannot decode" in errs[0].message


def test_size_mismatch_of_source_mask_and_ref_gt(ds):
    recs = records(ds)
    Image.new("RGB", (32, 48), "gray").save(ds.parent / recs[0]["edit_image"][0])
    Image.new("L", (48, 32), 255).save(ds.parent / recs[3]["back_mask"])
    Image.new("RGB", (64, 48), "white").save(ds.parent / recs[4]["ref_gt"])
    got = {(e.index, e.key) for e in issues(ds, "error")}
    assert {(0, "edit_image[0]"), (3, "back_mask"), (4, "ref_gt")} <= got
    msg = next(e for e in issues(ds, "error") if e.index == 0).message
    assert "32x48" in msg and "48x48" in msg


def test_ref_gt_crop_must_be_the_bbox_size(ds):
    recs = records(ds)
    Image.new("RGB", (48, 48), "white").save(ds.parent / recs[5]["ref_gt_crop"])
    assert Image.open(ds.parent / recs[5]["back_mask"]).getbbox() != (0, 0, 48, 48)  # so 48x48 is wrong
    errs = issues(ds, "error")
    assert [(e.index, e.key) for e in errs] == [(5, "ref_gt_crop")] and "bbox" in errs[0].message


def test_empty_mask(ds):
    recs = records(ds)
    Image.new("L", (48, 48), 100).save(ds.parent / recs[2]["back_mask"])  # grey 100 < 127: nothing selected
    errs = issues(ds, "error")
    assert [(e.index, e.key) for e in errs] == [(2, "back_mask")] and "empty" in errs[0].message


def test_edit_image_must_be_a_list(ds):
    recs = records(ds)
    recs[4]["edit_image"] = recs[4]["edit_image"][0]
    rewrite(ds, recs)
    errs = issues(ds, "error")
    assert [(e.index, e.key) for e in errs] == [(4, "edit_image")] and "must be a list" in errs[0].message
    with pytest.raises(ValueError, match=r"entry 4, key `edit_image`"):
        load_dataset(ds)


def test_missing_keys_and_bad_types(ds):
    recs = records(ds)
    del recs[0]["prompt"]
    recs[1]["image"] = 5
    recs[2]["edit_image"] = []
    recs[3] = "not an object"
    rewrite(ds, recs)
    got = {(e.index, e.key) for e in issues(ds, "error")}
    assert got == {(0, "prompt"), (1, "image"), (2, "edit_image"), (3, None)}


def test_swapped_image_and_source_warns(ds, capsys):
    recs = records(ds)
    recs[1]["image"], recs[1]["edit_image"][0] = recs[1]["edit_image"][0], recs[1]["image"]
    rewrite(ds, recs)
    warns = issues(ds, "warning")
    assert [(w.index, w.key) for w in warns] == [(1, "image")] and "looks swapped" in warns[0].message
    assert not issues(ds, "error")
    assert not issues(ds, "warning", swap_check=False)
    assert cli_main(["validate", str(ds), "--workers", "1", "--progress", "false"]) == 0  # a warning only
    assert "looks swapped" in capsys.readouterr().out
    assert cli_main(["validate", str(ds), "--workers", "1", "--progress", "false", "--strict"]) == 1


def test_jsonl_and_unparsable_files(ds, tmp_path):
    recs = records(ds)
    jl = ds.with_suffix(".jsonl")
    jl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert issues(jl) == []
    bad = ds.parent / "bad.json"
    bad.write_text('[{"prompt": "x",')
    (err,) = issues(bad)
    assert err.level == "error" and err.file == str(bad) and "invalid JSON" in err.message
    badl = ds.parent / "bad.jsonl"
    badl.write_text(json.dumps(recs[0]) + "\n{oops\n")
    (err,) = issues(badl)
    assert "line 2" in err.message
    empty = ds.parent / "empty.json"
    empty.write_text("[]")
    assert "no entries" in issues(empty)[0].message


def test_multiprocess_validation_matches(ds):
    recs = records(ds)
    (ds.parent / recs[3]["image"]).unlink()
    one = [(i.index, i.key, i.message) for i in issues(ds)]
    two = [(i.index, i.key, i.message) for i in validate_dataset(ds, workers=2).issues]
    assert one == two and one[0][:2] == (3, "image")


# ---------------------------------------------------------------------------------------------------------------
# schema


def test_load_dataset_resolves_paths_and_keeps_extra_keys(tmp_path):
    rec = {"prompt": "p", "image": "imgs/t.png", "edit_image": ["imgs/s.png", "/abs/ref.png"], "back_mask": None,
           "global_caption": "kept", "id": 7}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.json").write_text(json.dumps([rec, {"prompt": "", "image": "b.png",
                                                              "edit_image": ["a.png"]}]))
    e0, e1 = load_dataset(tmp_path / "d" / "x.json")
    assert e0.image == tmp_path / "d" / "imgs/t.png" and e0.edit_image[1] == Path("/abs/ref.png")
    assert e0.back_mask is None and e0.id == "7" and e0.index == 0 and e0.extra == {"global_caption": "kept"}
    assert e1.id == "b" and e1.index == 1 and e1.source == tmp_path / "d" / "a.png"
    (f,) = [load_dataset(tmp_path / "d" / "x.json", base_path=tmp_path / "other")[0].image]
    assert f == tmp_path / "other" / "imgs/t.png"
    raw = load_dataset_json(tmp_path / "d" / "x.json")
    assert raw[0]["image"] == str(tmp_path / "d" / "imgs/t.png") and raw[0]["global_caption"] == "kept"
    out = tmp_path / "d" / "y.jsonl"
    assert save_dataset_json(out, [e0, e1]) is True
    assert save_dataset_json(out, [e0, e1]) is False  # unchanged: not rewritten
    assert load_dataset(out) == [e0, e1]
    assert json.loads(out.read_text().splitlines()[0])["image"] == "imgs/t.png"


@pytest.mark.parametrize("rec,key", [
    ({"image": "a", "edit_image": ["b"]}, "prompt"),
    ({"prompt": 1, "image": "a", "edit_image": ["b"]}, "prompt"),
    ({"prompt": "p", "edit_image": ["b"]}, "image"),
    ({"prompt": "p", "image": "a", "edit_image": "b"}, "edit_image"),
    ({"prompt": "p", "image": "a", "edit_image": ["b", 3]}, "edit_image[1]"),
    ({"prompt": "p", "image": "a", "edit_image": ["b"], "ref_gt": ""}, "ref_gt"),
    ({"prompt": "p", "image": "a", "edit_image": ["b"], "edit_type": 3}, "edit_type"),
])
def test_load_dataset_names_index_and_key(tmp_path, rec, key):
    good = {"prompt": "p", "image": "a", "edit_image": ["b"]}
    (tmp_path / "x.json").write_text(json.dumps([good, good, rec]))
    with pytest.raises(ValueError, match=rf"entry 2, key `{key.replace('[', '.').replace(']', '.')}`"):
        load_dataset(tmp_path / "x.json")


def test_load_dataset_rejects_non_list_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"prompt": "p"}) + "\n" + "[")
    with pytest.raises(DatasetFormatError, match="line 2"):
        load_dataset(tmp_path / "x.json")
    assert isinstance(DatasetEntry("p", Path("a"), [Path("b")]).to_record(), dict)
