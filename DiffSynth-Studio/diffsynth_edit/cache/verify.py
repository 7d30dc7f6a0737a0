"""`python train_2511.py verify --cache-dir DIR`: load every entry and check keys, shapes, dtypes and finiteness."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .manifest import DTYPES, FORMAT, MANIFEST_NAME, SAMPLE_SUFFIX, SAMPLES_DIR, read_manifest
from .store import EDIT_PREFIX, NEGA_PREFIX, NEGA_TAIL, TENSOR_KEYS, CacheError, edit_keys, read_header


@dataclass
class VerifyReport:
    cache_dir: Path
    checked: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        bad = sorted({f for f, _ in self.problems})
        lines = [f"verify {self.cache_dir}: {self.checked} entries checked, "
                 + ("all valid" if self.ok else f"{len(bad)} bad file(s), {len(self.problems)} problem(s)")]
        lines += [f"  {f}: {r}" for f, r in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        if not self.ok:
            lines.append("re-run `python train_2511.py cache` with the same settings to rewrite bad entries "
                         "(delete them first if their file name is still valid)")
        return "\n".join(lines)


class _Want:
    """Checks one tensor's dtype, rank, shape and finiteness, appending each problem to `problems`."""

    def __init__(self, tensors: dict[str, torch.Tensor], problems: list[str]):
        self.tensors, self.p = tensors, problems

    def __call__(self, key: str, shape: list[int] | None, dt: torch.dtype, ndim: int | None = None) -> bool:
        t = self.tensors[key]
        ok = True
        if t.dtype != dt:
            self.p.append(f"{key}: dtype {t.dtype}, expected {dt}")
            ok = False
        if ndim is not None and t.dim() != ndim:
            self.p.append(f"{key}: shape {list(t.shape)}, expected {ndim} dims")
            return False
        if shape is not None and list(t.shape) != shape:
            self.p.append(f"{key}: shape {list(t.shape)}, expected {shape}")
            ok = False
        if t.is_floating_point() and not torch.isfinite(t).all():
            n = int((~torch.isfinite(t)).sum())
            self.p.append(f"{key}: {n} non-finite value(s) (NaN/Inf)")
            ok = False
        return ok


def check_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], dtype: torch.dtype,
                  record: dict[str, Any] | None = None) -> list[str]:
    """Problems of one sample's tensors (empty list = valid)."""
    p: list[str] = []
    missing = [k for k in TENSOR_KEYS if k not in tensors]
    ek = edit_keys(tensors)
    if not ek:
        missing.append(EDIT_PREFIX + "0")
    if missing:
        return [f"missing keys {missing}"]
    extra = [k for k in tensors if k not in TENSOR_KEYS and not k.startswith(EDIT_PREFIX)]
    if extra:
        p.append(f"unexpected keys {extra}")
    if ek != [f"{EDIT_PREFIX}{i}" for i in range(len(ek))]:
        p.append(f"edit latents are not numbered 0..{len(ek) - 1}: {ek}")
    want = _Want(tensors, p)
    if not want("size", [2], torch.int64):
        return p
    h, w = (int(v) for v in tensors["size"].tolist())
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        return p + [f"size {h}x{w} is not a positive multiple of 16"]
    lat = [16, h // 8, w // 8]
    want("input_latents", lat, dtype)
    want(EDIT_PREFIX + "0", lat, dtype)
    for k in ek[1:]:
        if want(k, None, dtype, ndim=3) and (tensors[k].shape[0] != 16 or min(tensors[k].shape[1:]) < 2):
            p.append(f"{k}: shape {list(tensors[k].shape)} is not a [16, h, w] latent")
    _check_prompts(want, dtype)
    if want("subyx", [4], torch.int64):
        y1, y2, x1, x2 = (int(v) for v in tensors["subyx"].tolist())
        if not (0 <= y1 < y2 <= h // 16 and 0 <= x1 < x2 <= w // 16):
            p.append(f"subyx {[y1, y2, x1, x2]} is not a box inside the {h // 16}x{w // 16} token grid")
        else:
            sub = [16, (y2 - y1) * 2, (x2 - x1) * 2]
            want("sub_input_latents", sub, dtype)
            want("sub_noise", sub, dtype)
    if want("mask_latent", [1, h // 8, w // 8], torch.float32):
        m = tensors["mask_latent"]
        if m.min() < 0 or m.max() > 1:
            p.append("mask_latent: values outside [0, 1]")
    if meta.get("format") != FORMAT:
        p.append(f"header format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("num_edit") not in (None, str(len(ek))):
        p.append(f"header says {meta.get('num_edit')} edit images, file has {len(ek)}")
    if record is not None:
        _check_record(p, tensors, meta, record, (h, w), len(ek))
    return p


def _check_prompts(want: _Want, dtype: torch.dtype) -> None:
    """The prompt and negative embeddings and masks (the negative is prompt_emb[:prefix] + its tail; its mask
    covers both)."""
    tensors, p = want.tensors, want.p
    dims = []
    prefix = 0
    if want(NEGA_PREFIX, [1], torch.int64):
        prefix = int(tensors[NEGA_PREFIX][0])
        L = tensors["prompt_emb"].shape[0] if tensors["prompt_emb"].dim() == 2 else 0
        if not 0 <= prefix <= L:
            p.append(f"{NEGA_PREFIX}: {prefix} outside the prompt's {L} rows")
            prefix = 0
    for emb, mask, extra in (("prompt_emb", "prompt_emb_mask", 0), (NEGA_TAIL, "nega_prompt_emb_mask", prefix)):
        if want(emb, None, dtype, ndim=2):
            L, D = tensors[emb].shape
            dims.append(D)
            if L + extra == 0:
                p.append(f"{emb}: empty")
            if want(mask, [L + extra], torch.int64) and not ((tensors[mask] == 0) | (tensors[mask] == 1)).all():
                p.append(f"{mask}: values other than 0/1")
    if len(set(dims)) > 1:
        p.append(f"prompt_emb and {NEGA_TAIL} widths differ: {dims}")


def _check_record(p: list[str], tensors: dict[str, torch.Tensor], meta: dict[str, str], record: dict[str, Any],
                  hw: tuple[int, int], num_edit: int) -> None:
    """The manifest record against the file (the sub-crop size only when the file itself is valid so far)."""
    h, w = hw
    if list(record.get("size", [])) != [h, w]:
        p.append(f"manifest size {record.get('size')} != file size {[h, w]}")
    if int(record.get("num_edit", -1)) != num_edit:
        p.append(f"manifest num_edit {record.get('num_edit')} != {num_edit}")
    if "subyx" in tensors and len(p) == 0:
        y1, y2, x1, x2 = (int(v) for v in tensors["subyx"].tolist())
        if list(record.get("sub_size", [])) != [(y2 - y1) * 16, (x2 - x1) * 16]:
            p.append(f"manifest sub_size {record.get('sub_size')} != subyx box {[(y2 - y1) * 16, (x2 - x1) * 16]}")
    if record.get("hash") is not None and meta.get("hash") != record.get("hash"):
        p.append(f"header hash {meta.get('hash')!r} != manifest hash {record.get('hash')!r}")


def verify_file(path: Path, dtype: torch.dtype, record: dict | None = None) -> list[str]:
    from safetensors.torch import load_file

    if not path.is_file():
        return ["missing"]
    try:
        _, meta = read_header(path)
        tensors = load_file(str(path))
    except CacheError as e:
        return [str(e).removeprefix(f"{path}: ")]
    except Exception as e:  # safetensors raises its own error type for malformed files
        return [f"cannot load: {type(e).__name__}: {e}"]
    problems = check_tensors(tensors, meta, dtype, record)
    if record is not None and path.stem != record.get("hash", path.stem):
        problems.append(f"file name {path.name} does not match the manifest hash {record.get('hash')}")
    return problems


def verify_cache(cache_dir: Path | str, progress: bool = False) -> VerifyReport:
    cache_dir = Path(cache_dir)
    report = VerifyReport(cache_dir)
    mpath = str(cache_dir / MANIFEST_NAME)
    try:
        manifest = read_manifest(cache_dir)
    except ValueError as e:
        report.problems.append((mpath, str(e)))
        return report
    if manifest is None:
        report.problems.append((mpath, "missing: run `python train_2511.py cache` first"))
        return report
    if manifest.get("format") != FORMAT:
        report.problems.append((mpath, f"format {manifest.get('format')!r}, expected {FORMAT!r}"))
        return report
    dtype_name = DTYPES.get(str(manifest.get("dtype")))
    if dtype_name is None:
        report.problems.append((mpath, f"unknown dtype {manifest.get('dtype')!r}"))
        return report
    dtype = getattr(torch, dtype_name)
    if not manifest.get("complete", False):
        report.problems.append((mpath, "incomplete: the cache run was interrupted; run it again to finish"))
    entries = manifest.get("entries") or {}
    if not isinstance(entries, dict):
        report.problems.append((mpath, "entries is not an object"))
        return report
    if manifest.get("failed"):
        report.warnings.append(f"{len(manifest['failed'])} sample(s) failed when the cache was made (not cached): "
                               + ", ".join(str(f.get('id')) for f in manifest["failed"][:10]))
    listed: set[str] = set()
    checked: dict[str, list[str]] = {}
    items = list(entries.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, unit="entry", desc="verify")
    for sid, rec in items:
        file = rec.get("file") if isinstance(rec, dict) else None
        if not file:
            report.problems.append((mpath, f"entry {sid!r} has no file"))
            continue
        listed.add(file)
        if file not in checked:  # identical samples share a file
            checked[file] = verify_file(cache_dir / file, dtype, rec)
            report.checked += 1
        report.problems += [(str(cache_dir / file), f"(id {sid}) {r}") for r in checked[file]]
    samples = cache_dir / SAMPLES_DIR
    if samples.is_dir():
        unlisted = [p.name for p in samples.glob("*" + SAMPLE_SUFFIX) if f"{SAMPLES_DIR}/{p.name}" not in listed]
        if unlisted:
            report.warnings.append(f"{len(unlisted)} file(s) in {samples} are not in the manifest (stale; the next "
                                   f"cache run removes them): " + ", ".join(sorted(unlisted)[:5]))
    return report
