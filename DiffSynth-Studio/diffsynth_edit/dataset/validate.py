"""`validate`: check any dataset JSON/JSONL against the contract and the files it names.

Errors (exit 1): unreadable file, entry not an object, missing/ill-typed keys (`edit_image` must be a list), files
that do not exist or do not decode, size disagreements (image vs edit_image[0] vs back_mask vs ref_gt; ref_gt_crop
must be the size of the 16-aligned mask bbox), empty masks.
Warnings: empty prompt, size not a multiple of 16, duplicate ids, and "looks swapped": inside the mask the ref_gt
(crop) matches edit_image[0] better than `image` (the target should be what ref_gt shows, see DESIGN.md).
"""
from __future__ import annotations

import multiprocessing as mp
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import ConfigError
from ..geometry import ALIGN, binarize_mask, mask_bbox
from ..image_io import ImageDecodeError, decode_image, to_mask, to_rgb
from .schema import OPTIONAL_PATH_KEYS, DatasetFormatError, dataset_base_dir, read_records, resolve_path

SWAP_MARGIN = 2.0  # 0..255 units: how much better edit_image[0] must match ref_gt than `image` does


@dataclass
class ValidateConfig:
    """`generate_dataset_json_mp.py validate DATASET`: check a dataset JSON/JSONL and the files it names."""

    dataset: Path | None = field(default=None, metadata={"help": "dataset JSON/JSONL (also the positional argument)"})
    base_path: Path | None = field(default=None, metadata={"help": "resolve relative paths here (default: the "
                                                                    "JSON's folder)"})
    workers: int = field(default=0, metadata={"help": "worker processes (0 = all cores)"})
    swap_check: bool = field(default=True, metadata={"help": "warn where image / edit_image[0] look swapped"})
    strict: bool = field(default=False, metadata={"help": "treat warnings as errors"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    max_problems: int = field(default=200, metadata={"help": "print at most this many problems"})

    def validate(self) -> None:
        if self.dataset is None:
            raise ConfigError("give the dataset JSON to validate")
        if self.dataset.is_dir():
            raise ConfigError(f"{self.dataset} is a folder; give the dataset JSON/JSONL file")
        if self.workers < 0:
            raise ConfigError("`workers` must be >= 0")


@dataclass
class Issue:
    level: str  # error | warning
    index: int | None
    id: str | None
    key: str | None
    file: str | None
    message: str

    def format(self) -> str:
        parts = [f"{self.level}:"]
        if self.index is not None:
            parts.append(f"entry {self.index}" + (f" (id {self.id})" if self.id is not None else ""))
        if self.key:
            parts.append(f"`{self.key}`")
        if self.file:
            parts.append(str(self.file))
        return " ".join(parts) + f": {self.message}"


@dataclass
class ValidationReport:
    path: Path
    entries: int
    issues: list[Issue] = field(default_factory=list)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "warning"]

    def ok(self, strict: bool = False) -> bool:
        return not self.errors and not (strict and self.warnings)

    def format(self, max_lines: int = 200) -> str:
        lines = [i.format() for i in self.issues[:max_lines]]
        if len(self.issues) > max_lines:
            lines.append(f"... {len(self.issues) - max_lines} more")
        lines.append(f"{self.path}: {self.entries} entries, {len(self.errors)} errors, {len(self.warnings)} warnings"
                     + ("" if self.errors else " - OK"))
        return "\n".join(lines)


def _ident(rec: Any) -> str | None:
    if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)) and not isinstance(rec.get("id"), bool):
        return str(rec["id"])
    return None


_Add = Callable[[str, "str | None", "Path | str | None", str], None]  # (level, key, file, message)


def validate_record(rec: Any, index: int, base_dir: Path, swap_check: bool = True) -> list[Issue]:
    """Every problem of one entry (see the module docstring)."""
    ident = _ident(rec)
    issues: list[Issue] = []

    def add(level: str, key: str | None, file: Path | str | None, message: str) -> None:
        issues.append(Issue(level, index, ident, key, None if file is None else str(file), message))

    if not isinstance(rec, dict):
        add("error", None, None, f"must be a JSON object, got {type(rec).__name__}")
        return issues
    _check_prompt(rec.get("prompt"), add)
    paths = _entry_paths(rec, base_dir, add)
    arrays = _decode_entry_images(paths, add)
    ref_size = _check_sizes(arrays, paths, add)
    binary = _check_mask(arrays, paths, add)
    box = _expected_box(ref_size, binary, "back_mask" in paths)
    crop_size = _size(arrays, "ref_gt_crop")
    if box is not None and crop_size is not None and crop_size != (box.width, box.height):
        add("error", "ref_gt_crop", paths["ref_gt_crop"],
            f"size {crop_size[0]}x{crop_size[1]} differs from the 16-aligned mask bbox {box.width}x{box.height} "
            f"(x {box.x1}..{box.x2}, y {box.y1}..{box.y2})")
    if swap_check and box is not None and binary is not None:
        _check_swap(arrays, paths, binary, box, ref_size, add)
    return issues


def _check_prompt(prompt: Any, add: _Add) -> None:
    if prompt is None:
        add("error", "prompt", None, "missing")
    elif not isinstance(prompt, str):
        add("error", "prompt", None, f"must be a string, got {type(prompt).__name__}")
    elif not prompt.strip():
        add("warning", "prompt", None, "empty prompt")


def _entry_paths(rec: dict, base_dir: Path, add: _Add) -> dict[str, Path]:
    """key -> resolved path of every image the entry names (malformed values reported and left out)."""
    paths: dict[str, Path] = {}

    def path_of(key: str, value: Any, required: bool) -> None:
        if value is None:
            if required:
                add("error", key, None, "missing")
            return
        if not isinstance(value, str) or not value.strip():
            add("error", key, None, f"must be a path string, got {value!r}")
            return
        paths[key] = resolve_path(value, base_dir)

    path_of("image", rec.get("image"), True)
    edit = rec.get("edit_image")
    if edit is None:
        add("error", "edit_image", None, "missing")
    elif not isinstance(edit, list):
        add("error", "edit_image", edit if isinstance(edit, str) else None,
            f"must be a list of paths (first = source), got {type(edit).__name__}")
        if isinstance(edit, str) and edit.strip():
            paths["edit_image[0]"] = resolve_path(edit, base_dir)  # still check the file
    elif not edit:
        add("error", "edit_image", None, "empty list (needs at least the source image)")
    else:
        for j, v in enumerate(edit):
            path_of(f"edit_image[{j}]", v, True)
    for key in OPTIONAL_PATH_KEYS:
        path_of(key, rec.get(key), False)
    if "edit_type" in rec and rec["edit_type"] is not None and not isinstance(rec["edit_type"], str):
        add("error", "edit_type", None, "must be a string")
    return paths


def _decode_entry_images(paths: dict[str, Path], add: _Add) -> dict[str, np.ndarray]:
    """key -> decoded pixels (the mask as L, the others as RGB); missing or undecodable files reported."""
    arrays: dict[str, np.ndarray] = {}
    for key, path in paths.items():
        if not path.is_file():
            add("error", key, path, "file not found")
            continue
        try:
            dec = decode_image(path)
            img = to_mask(dec) if key == "back_mask" else to_rgb(dec)
        except ImageDecodeError as e:
            add("error", key, path, e.reason)
            continue
        arrays[key] = np.asarray(img)
    return arrays


def _size(arrays: dict[str, np.ndarray], key: str) -> tuple[int, int] | None:
    a = arrays.get(key)
    return None if a is None else (a.shape[1], a.shape[0])


def _check_sizes(arrays: dict[str, np.ndarray], paths: dict[str, Path], add: _Add) -> tuple[int, int] | None:
    """The size of `image` (None when it was not read); the source, mask and ref_gt must match it."""
    ref_size = _size(arrays, "image")
    if ref_size is not None:
        for key in ("edit_image[0]", "back_mask", "ref_gt"):
            s = _size(arrays, key)
            if s is not None and s != ref_size:
                add("error", key, paths[key], f"size {s[0]}x{s[1]} differs from image {ref_size[0]}x{ref_size[1]}")
        if ref_size[0] % ALIGN or ref_size[1] % ALIGN:
            add("warning", "image", paths["image"],
                f"size {ref_size[0]}x{ref_size[1]} is not a multiple of {ALIGN} (the bbox/crop check is skipped)")
    return ref_size


def _check_mask(arrays: dict[str, np.ndarray], paths: dict[str, Path], add: _Add) -> np.ndarray | None:
    """The binary mask, or None when there is none, it was not read, or it is empty (reported)."""
    if "back_mask" not in arrays:
        return None
    binary = binarize_mask(arrays["back_mask"])
    if not binary.any():
        add("error", "back_mask", paths["back_mask"], "mask is empty (no pixel above 127)")
        return None
    return binary


def _expected_box(ref_size: tuple[int, int] | None, binary: np.ndarray | None, has_mask: bool):
    """The 16-aligned mask bbox ref_gt_crop must have (the whole image without a mask); None when unknown."""
    if ref_size is None or ref_size[0] % ALIGN or ref_size[1] % ALIGN:
        return None
    if binary is not None and binary.shape == (ref_size[1], ref_size[0]):
        return mask_bbox(binary, (ref_size[1], ref_size[0]))
    if not has_mask:
        return mask_bbox(None, (ref_size[1], ref_size[0]))
    return None


def _check_swap(arrays: dict[str, np.ndarray], paths: dict[str, Path], binary: np.ndarray, box,
                ref_size: tuple[int, int] | None, add: _Add) -> None:
    """Warn when, inside the mask, ref_gt matches the source better than `image` (image and source swapped)."""
    if "image" not in arrays or "edit_image[0]" not in arrays or _size(arrays, "edit_image[0]") != ref_size:
        return
    ref = None
    if _size(arrays, "ref_gt_crop") == (box.width, box.height):
        ref = arrays["ref_gt_crop"]
    elif _size(arrays, "ref_gt") == ref_size:
        ref = arrays["ref_gt"][box.y1:box.y2, box.x1:box.x2]
    if ref is None:
        return
    inside = binary[box.y1:box.y2, box.x1:box.x2]
    ref_in = ref[inside].astype(np.int16)
    d_img = float(np.abs(arrays["image"][box.y1:box.y2, box.x1:box.x2][inside] - ref_in).mean())
    d_src = float(np.abs(arrays["edit_image[0]"][box.y1:box.y2, box.x1:box.x2][inside] - ref_in).mean())
    if d_src + SWAP_MARGIN < d_img:
        add("warning", "image", paths["image"],
            f"looks swapped: inside the mask ref_gt matches edit_image[0] (mean abs diff {d_src:.1f}) "
            f"better than image ({d_img:.1f}); `image` must be the TARGET and edit_image[0] the SOURCE")


_WORKER: tuple[Path, bool] | None = None


def _init(base_dir: Path, swap_check: bool) -> None:
    global _WORKER
    _WORKER = (base_dir, swap_check)


def _check(item: tuple[int, Any]) -> list[Issue]:
    assert _WORKER is not None
    index, rec = item
    try:
        return validate_record(rec, index, *_WORKER)
    except Exception as e:  # never let one entry stop the check
        return [Issue("error", index, _ident(rec), None, None, f"validator failed: {type(e).__name__}: {e}")]


def validate_dataset(path: Path | str, base_path: Path | str | None = None, workers: int = 1,
                     swap_check: bool = True, progress: bool = False) -> ValidationReport:
    """Check the file and every entry; never raises for bad data (the report lists it)."""
    path = Path(path)
    try:
        records = read_records(path)
    except DatasetFormatError as e:
        return ValidationReport(path, 0, [Issue("error", None, None, None, str(path), str(e).split(": ", 1)[-1])])
    report = ValidationReport(path, len(records))
    if not records:
        report.issues.append(Issue("error", None, None, None, str(path), "the dataset has no entries"))
        return report
    base = dataset_base_dir(path, base_path)
    from tqdm import tqdm

    from .builder import available_cpus

    n = min(workers or available_cpus(), len(records))
    items = list(enumerate(records))
    results: list[list[Issue]] = []
    with tqdm(total=len(items), desc="validate", unit="entry", disable=not progress, file=sys.stderr) as bar:
        if n <= 1:
            _init(base, swap_check)
            for it in items:
                results.append(_check(it))
                bar.update(1)
        else:
            with mp.get_context().Pool(n, initializer=_init, initargs=(base, swap_check)) as pool:
                for res in pool.imap(_check, items, chunksize=4):
                    results.append(res)
                    bar.update(1)
    for res in results:
        report.issues.extend(res)
    ids = Counter(i for i in (_ident(r) for r in records) if i is not None)
    for index, rec in enumerate(records):
        ident = _ident(rec)
        if ident is not None and ids[ident] > 1:
            report.issues.append(Issue("warning", index, ident, "id", None, f"id used by {ids[ident]} entries"))
    report.issues.sort(key=lambda i: (-1 if i.index is None else i.index, i.level != "error"))
    return report
