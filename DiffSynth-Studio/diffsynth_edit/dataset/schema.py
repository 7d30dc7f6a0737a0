"""The dataset JSON: reading (JSON list or JSONL), path resolution, typed entries, atomic writing.

Contract (DESIGN.md, "Dataset JSON"): a list of objects with `prompt`, `image` (the TARGET), `edit_image` (a list;
[0] = source, then extra references), optional `back_mask` (white = edit), `ref_gt`, `ref_gt_crop`, `edit_type`,
`id`. Relative paths are relative to the JSON file's folder, or to `base_path` when given. Absolute paths are kept.
Unknown keys (e.g. `global_caption`) are kept in `DatasetEntry.extra`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..atomic import atomic_write_if_changed, json_text

DEFAULT_PROMPT_TEMPLATE = "Picture 1 is the image to modify. {instruction}"
PATH_KEYS = ("image", "back_mask", "ref_gt", "ref_gt_crop")  # plus every item of `edit_image`
OPTIONAL_PATH_KEYS = ("back_mask", "ref_gt", "ref_gt_crop")
KNOWN_KEYS = ("prompt", "image", "edit_image", "back_mask", "ref_gt", "ref_gt_crop", "edit_type", "id")
RECORD_KEY_ORDER = KNOWN_KEYS


class DatasetFormatError(ValueError):
    """The file is not a JSON list / JSONL of objects; the message names the file and line."""


@dataclass
class DatasetEntry:
    """One sample; every path is resolved (absolute when the JSON folder / base path is absolute)."""

    prompt: str
    image: Path
    edit_image: list[Path]
    back_mask: Path | None = None
    ref_gt: Path | None = None
    ref_gt_crop: Path | None = None
    edit_type: str | None = None
    id: str = ""
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> Path:
        """edit_image[0], the image to modify."""
        return self.edit_image[0]

    def to_record(self, base_dir: Path | str | None = None) -> dict[str, Any]:
        """The JSON object, paths relative to `base_dir` where possible."""
        def rel(p: Path | None) -> str | None:
            return None if p is None else relative_path(p, base_dir)

        rec: dict[str, Any] = {"prompt": self.prompt, "image": rel(self.image),
                               "edit_image": [rel(p) for p in self.edit_image]}
        for key in OPTIONAL_PATH_KEYS:
            if getattr(self, key) is not None:
                rec[key] = rel(getattr(self, key))
        if self.edit_type is not None:
            rec["edit_type"] = self.edit_type
        rec["id"] = self.id
        rec.update(self.extra)
        return rec


def relative_path(path: Path | str, base_dir: Path | str | None) -> str:
    """POSIX path of `path` relative to `base_dir` when it lies inside it; otherwise the absolute path (a path
    outside the dataset folder is not rewritten into `../..` chains). `base_dir=None` returns the path as is."""
    path = Path(path)
    if base_dir is None:
        return path.as_posix()
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(base_dir))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return absolute.as_posix()


def read_records(path: Path | str) -> list[Any]:
    """Raw items of a dataset file: a JSON list, or JSONL (one object per line; blank lines skipped).

    The format is sniffed from the content (a leading `[` means a JSON list). Items are returned as parsed, objects
    or not; `DatasetFormatError` names the file and line for unparsable text.
    """
    return [item for _, item in read_numbered_records(path)]


def read_numbered_records(path: Path | str,
                          on_bad_line: Callable[[int, str], None] | None = None) -> list[tuple[int, Any]]:
    """`read_records` with where each item is: (JSONL line number or position in a JSON list, item).

    `on_bad_line(line, message)`: a JSONL line that does not parse is reported there and skipped instead of
    stopping the read (the dataset builder reports every bad row of an instructions file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetFormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(data, list):
            raise DatasetFormatError(f"{path}: the top level must be a list of objects")
        return list(enumerate(data, 1))
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            if on_bad_line is None:
                raise DatasetFormatError(f"{path}: line {lineno} is not valid JSON: {e.msg}") from None
            on_bad_line(lineno, f"not valid JSON: {e.msg}")
    if not items and stripped and on_bad_line is None:
        raise DatasetFormatError(f"{path}: no JSON objects found")
    return items


def dataset_base_dir(path: Path | str, base_path: Path | str | None = None) -> Path:
    """The folder relative paths are resolved against."""
    return Path(base_path) if base_path is not None else Path(path).parent


def resolve_path(value: str | Path, base_dir: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def load_dataset_json(path: Path | str, base_path: Path | str | None = None, resolve: bool = True) -> list[dict]:
    """The dataset's objects as dicts (JSON or JSONL). With `resolve`, path values (strings) become absolute/joined
    path strings (relative to the JSON's folder or `base_path`); malformed values are left for the caller."""
    records = read_records(path)
    base = dataset_base_dir(path, base_path)
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: entry {i}: must be a JSON object, got {type(rec).__name__}")
        rec = dict(rec)
        if resolve:
            for key in PATH_KEYS:
                if isinstance(rec.get(key), str) and rec[key]:
                    rec[key] = str(resolve_path(rec[key], base))
            if isinstance(rec.get("edit_image"), list):
                rec["edit_image"] = [str(resolve_path(v, base)) if isinstance(v, str) and v else v
                                     for v in rec["edit_image"]]
        out.append(rec)
    return out


def _bad(path, index: int, key: str | None, message: str) -> ValueError:
    where = f"entry {index}" + (f", key `{key}`" if key else "")
    return ValueError(f"{path}: {where}: {message}")


def entry_from_record(rec: Any, index: int, base_dir: Path, source: Path | str = "<dataset>") -> DatasetEntry:
    """Validate the shape of one raw object and build the entry; ValueError names the index and key."""
    if not isinstance(rec, dict):
        raise _bad(source, index, None, f"must be a JSON object, got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if not isinstance(prompt, str):
        raise _bad(source, index, "prompt", "missing" if prompt is None else "must be a string")

    def path_value(key: str, value: Any, required: bool) -> Path | None:
        if value is None:
            if required:
                raise _bad(source, index, key, "missing")
            return None
        if not isinstance(value, str) or not value.strip():
            raise _bad(source, index, key, f"must be a non-empty path string, got {value!r}")
        return resolve_path(value, base_dir)

    image = path_value("image", rec.get("image"), True)
    edit = rec.get("edit_image")
    if edit is None:
        raise _bad(source, index, "edit_image", "missing")
    if not isinstance(edit, list):
        raise _bad(source, index, "edit_image", f"must be a list of paths (first = source), got {type(edit).__name__}")
    if not edit:
        raise _bad(source, index, "edit_image", "is an empty list (needs at least the source image)")
    edit_paths = [path_value(f"edit_image[{j}]", v, True) for j, v in enumerate(edit)]
    optional = {k: path_value(k, rec.get(k), False) for k in OPTIONAL_PATH_KEYS}
    edit_type = rec.get("edit_type")
    if edit_type is not None and not isinstance(edit_type, str):
        raise _bad(source, index, "edit_type", "must be a string")
    ident = rec.get("id")
    if ident is None:
        ident = image.stem
    elif isinstance(ident, (str, int)) and not isinstance(ident, bool):
        ident = str(ident)
    else:
        raise _bad(source, index, "id", "must be a string or an integer")
    extra = {k: v for k, v in rec.items() if k not in KNOWN_KEYS}
    return DatasetEntry(prompt=prompt, image=image, edit_image=edit_paths, edit_type=edit_type, id=ident,
                        index=index, extra=extra, **optional)


def load_dataset(path: Path | str, base_path: Path | str | None = None) -> list[DatasetEntry]:
    """Typed entries of a dataset JSON/JSONL. Raises DatasetFormatError (file) or ValueError (entry index + key).

    `id` defaults to the stem of `image` when absent.
    """
    records = read_records(path)
    base = dataset_base_dir(path, base_path)
    return [entry_from_record(rec, i, base, path) for i, rec in enumerate(records)]


def order_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Keys in the canonical order (known keys first, then the rest as given)."""
    out = {k: rec[k] for k in RECORD_KEY_ORDER if k in rec}
    out.update({k: v for k, v in rec.items() if k not in out})
    return out


def dataset_text(records: Iterable[dict[str, Any]], jsonl: bool = False) -> str:
    records = [order_record(r) for r in records]
    if jsonl:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return json_text(records, indent=2)


def save_dataset_json(path: Path | str, records: Iterable[dict[str, Any] | DatasetEntry], jsonl: bool | None = None,
                      base_dir: Path | str | None = None) -> bool:
    """Write the dataset atomically (JSONL when `jsonl` or the suffix is .jsonl); unchanged files are not rewritten.

    DatasetEntry items are converted with paths relative to `base_dir` (default: the file's folder).
    Returns True when the file was (re)written.
    """
    path = Path(path)
    if jsonl is None:
        jsonl = path.suffix.lower() == ".jsonl"
    base = Path(base_dir) if base_dir is not None else path.parent
    recs = [r.to_record(base) if isinstance(r, DatasetEntry) else r for r in records]
    return atomic_write_if_changed(path, dataset_text(recs, jsonl))
