"""Raw folders -> dataset JSON, in parallel, nothing lost (docs/dataset.md describes every input and flag).

Flow: `discover` pairs the inputs by stem in the main process (listing, duplicates, missing members, instruction
files) -> `process_sample` runs per sample in a multiprocessing pool (decode, resize, mask, filters, derived files,
sidecar) -> results sorted by id -> dataset JSON (+ JSONL, splits) and `<name>_report.json`, each written atomically
and only when its content changed.

Re-runs: each sample has a sidecar `<name>_files/meta/<id>.json` holding a key = hash(builder version, settings that
shape the outputs, id, instruction, edit_type, and the BYTES of every input file). When the key matches and every
output recorded in the sidecar still exists with its recorded size, the sample is reused without decoding. Content
hashing (not mtimes) means `touch` or a copy of the raw folders does not trigger work, while any edited input does.
Filter thresholds are not part of the key: the sidecar stores the measured mask area and background change, and
the filters are re-applied on every run.
"""
from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageStat

from ..atomic import atomic_write_bytes, atomic_write_if_changed, json_text
from ..config import ConfigError
from ..geometry import Box, EmptyMaskError, binarize_mask, fit_size, mask_bbox
from ..limits import aspect_problem
from .image_io import (FORMAT_EXTENSION, WHITE, DecodedImage, ImageDecodeError, atomic_save_image, decode_image,
                       is_image_file, to_mask, to_rgb)
from .schema import DEFAULT_PROMPT_TEMPLATE, DatasetFormatError, dataset_text, read_numbered_records, relative_path

BUILDER_VERSION = 1
ASPECT_TOLERANCE = 0.01  # relative aspect-ratio difference above which two images are a size mismatch
_REF_RE = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)$")
# zlib strategy for derived PNGs: run-length matching is faster than the default at level 1 and compresses the
# flat white areas of ref_gt and the 0/255 masks as well (measured: bench/RESULTS_dataset.md).
PNG_STRATEGY = zlib.Z_RLE


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class BuildConfig:
    """`generate_dataset_json_mp.py build`: raw folders -> dataset JSON (see docs/dataset.md)."""

    out: Path | None = field(default=None, metadata=_h("dataset JSON to write, e.g. data/mydataset.json (required)"))
    source_dir: Path | None = field(default=None, metadata=_h("folder of source images (paired layout)"))
    target_dir: Path | None = field(default=None, metadata=_h("folder of target images, matched by stem"))
    mask_dir: Path | None = field(default=None, metadata=_h("optional folder of masks (white = edited)"))
    ref_dir: Path | None = field(default=None, metadata=_h("optional folder of extra references <stem>_1.png, ..."))
    samples_dir: Path | None = field(default=None, metadata=_h(
        "one folder per sample with source.*, target.*, optional mask.*, ref_<n>.*, prompt.txt"))
    instructions: Path | None = field(default=None, metadata=_h(
        "CSV or JSONL with `stem`, `instruction` (optional) and `edit_type` (optional)"))
    instruction: str | None = field(default=None, metadata=_h("one instruction for every sample without its own"))
    prompt_template: str = field(default=DEFAULT_PROMPT_TEMPLATE, metadata=_h(
        "prompt template; {instruction} is replaced (default 'Picture 1 is the image to modify. {instruction}')"))
    max_pixels: int = field(default=1024 * 1024, metadata=_h("resize to at most this many pixels (1048576)"))
    diff_threshold: int = field(default=24, metadata=_h(
        "derived masks: per-pixel max abs RGB difference (0-255) above which a pixel is edited (24)"))
    mask_dilation: int = field(default=2, metadata=_h("derived masks: dilation radius in px, square (2)"))
    fixed_source: bool = field(default=False, metadata=_h(
        "write a fixed source (source inside the mask, target outside) and use it as edit_image[0]"))
    min_mask_area: float = field(default=0.001, metadata=_h("drop samples whose mask covers less (0.001)"))
    max_mask_area: float = field(default=0.95, metadata=_h("drop samples whose mask covers more (0.95)"))
    max_bg_change: float = field(default=0.1, metadata=_h(
        "drop samples whose mean abs difference outside the mask (0..1) is above this; 1 disables (0.1)"))
    test_fraction: float = field(default=0.0, metadata=_h("fraction of samples for <name>_test.json (0 = no split)"))
    test_per_type: int = field(default=0, metadata=_h("N test samples per edit_type instead of a fraction"))
    seed: int = field(default=42, metadata=_h("split seed (42)"))
    jsonl: bool = field(default=False, metadata=_h("also write .jsonl files beside the .json files"))
    workers: int = field(default=0, metadata=_h("worker processes (0 = all cores)"))
    strict: bool = field(default=False, metadata=_h("exit 1 on any bad input"))
    force: bool = field(default=False, metadata=_h("rebuild every sample, ignoring up-to-date sidecars"))
    progress: bool = field(default=True, metadata=_h("show a progress bar"))
    compress_level: int = field(default=1, metadata=_h("PNG compression level of derived files, 0-9 (1 = fast)"))

    def validate(self) -> None:
        if self.out is None:
            raise ConfigError("`out` is required (the dataset JSON to write, e.g. data/mydataset.json)")
        if self.out.suffix.lower() != ".json":
            raise ConfigError(f"`out` must end in .json (got {self.out}); use --jsonl for JSONL copies")
        paired = self.source_dir is not None or self.target_dir is not None
        if paired and self.samples_dir is not None:
            raise ConfigError("give either --source-dir/--target-dir or --samples-dir, not both")
        if not paired and self.samples_dir is None:
            raise ConfigError("give --source-dir and --target-dir, or --samples-dir")
        if paired and (self.source_dir is None or self.target_dir is None):
            raise ConfigError("--source-dir and --target-dir go together")
        if self.samples_dir is not None and (self.mask_dir or self.ref_dir):
            raise ConfigError("--mask-dir/--ref-dir belong to the paired layout, not --samples-dir")
        for name in ("source_dir", "target_dir", "mask_dir", "ref_dir", "samples_dir"):
            p = getattr(self, name)
            if p is not None and not p.is_dir():
                raise ConfigError(f"`{name}` {p} is not a folder")
        if self.instructions is not None and not self.instructions.is_file():
            raise ConfigError(f"`instructions` {self.instructions} is not a file")
        if "{instruction}" not in self.prompt_template:
            raise ConfigError("`prompt_template` must contain {instruction}")
        if self.max_pixels < 256:
            raise ConfigError("`max_pixels` must be at least 256 (16x16)")
        if not 0 <= self.diff_threshold <= 255:
            raise ConfigError("`diff_threshold` must be in 0..255")
        if self.mask_dilation < 0:
            raise ConfigError("`mask_dilation` must be >= 0")
        if not 0 <= self.min_mask_area <= self.max_mask_area <= 1:
            raise ConfigError("need 0 <= min_mask_area <= max_mask_area <= 1")
        if not 0 <= self.max_bg_change <= 1:
            raise ConfigError("`max_bg_change` must be in 0..1")
        if not 0 <= self.test_fraction < 1:
            raise ConfigError("`test_fraction` must be in [0, 1)")
        if self.test_per_type < 0:
            raise ConfigError("`test_per_type` must be >= 0")
        if self.test_fraction and self.test_per_type:
            raise ConfigError("give --test-fraction or --test-per-type, not both")
        if self.workers < 0:
            raise ConfigError("`workers` must be >= 0 (0 = all cores)")
        if not 0 <= self.compress_level <= 9:
            raise ConfigError("`compress_level` must be in 0..9")


@dataclass(frozen=True)
class OutputLayout:
    """Where everything of one dataset goes, derived from the JSON path."""

    json_path: Path

    @property
    def base_dir(self) -> Path:
        return self.json_path.parent

    @property
    def name(self) -> str:
        return self.json_path.stem

    @property
    def files_dir(self) -> Path:
        return self.base_dir / f"{self.name}_files"

    @property
    def meta_dir(self) -> Path:
        return self.files_dir / "meta"

    @property
    def report_path(self) -> Path:
        return self.base_dir / f"{self.name}_report.json"

    def split_path(self, split: str, suffix: str = ".json") -> Path:
        return self.base_dir / f"{self.name}_{split}{suffix}"


@dataclass
class Problem:
    """One reported issue. kind: error (bad input, sample dropped), filtered (dropped by a filter), warning."""

    kind: str
    reason: str
    file: str | None
    id: str | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "id": self.id, "file": self.file, "detail": self.detail}

    def format(self) -> str:
        who = f"[{self.id}] " if self.id else ""
        where = f" {self.file}:" if self.file else ""
        return f"{self.kind} {self.reason}: {who}{where.strip()} {self.detail}".replace("  ", " ")


def _err(reason: str, file: Path | str | None, ident: str | None, detail: str) -> Problem:
    return Problem("error", reason, None if file is None else str(file), ident, detail)


class SampleError(Exception):
    def __init__(self, problem: Problem):
        super().__init__(problem.format())
        self.problem = problem


@dataclass
class SampleSpec:
    """A discovered sample: its input files and text (picklable, sent to a worker)."""

    id: str
    source: Path
    target: Path
    mask: Path | None
    refs: tuple[Path, ...]
    instruction: str
    edit_type: str | None = None


@dataclass(frozen=True)
class BuildSettings:
    """What a worker needs (picklable)."""

    base_dir: Path
    files_dir: Path
    prompt_template: str
    max_pixels: int
    diff_threshold: int
    mask_dilation: int
    fixed_source: bool
    compress_level: int
    min_mask_area: float
    max_mask_area: float
    max_bg_change: float
    force: bool

    @property
    def meta_dir(self) -> Path:
        return self.files_dir / "meta"

    def key(self) -> str:
        """The settings that shape a sample's outputs (not the filter thresholds, see the module docstring)."""
        return json.dumps([BUILDER_VERSION, relative_path(self.files_dir, self.base_dir), self.prompt_template,
                           self.max_pixels, self.diff_threshold, self.mask_dilation, self.fixed_source,
                           self.compress_level])

    @staticmethod
    def from_config(cfg: BuildConfig, layout: OutputLayout) -> "BuildSettings":
        return BuildSettings(layout.base_dir, layout.files_dir, cfg.prompt_template, cfg.max_pixels,
                             cfg.diff_threshold, cfg.mask_dilation, cfg.fixed_source, cfg.compress_level,
                             cfg.min_mask_area, cfg.max_mask_area, cfg.max_bg_change, cfg.force)


@dataclass
class SampleResult:
    id: str
    status: str  # built | reused | filtered | error
    record: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# discovery (main process)


def _list_images(folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """stem -> file for the images directly in `folder`; stems with several files go to the second dict."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(folder.iterdir()):
        if p.is_file() and is_image_file(p):
            by_stem[p.stem].append(p)
    unique = {s: ps[0] for s, ps in by_stem.items() if len(ps) == 1}
    dups = {s: ps for s, ps in by_stem.items() if len(ps) > 1}
    return unique, dups


def _dup_problem(stem: str, paths: list[Path], what: str) -> Problem:
    names = ", ".join(p.name for p in paths)
    return _err("duplicate_stem", paths[0], stem,
                f"{len(paths)} {what} files share the stem '{stem}' ({names} in {paths[0].parent}); "
                "keep exactly one")


def _read_text_file(path: Path, ident: str | None, problems: list[Problem]) -> str | None:
    """Stripped UTF-8 text; None (and an error) when it cannot be decoded."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        problems.append(_err("bad_prompt_file", path, ident, f"cannot read: {e.strerror or e}"))
        return None
    try:
        return raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        problems.append(_err("bad_prompt_file", path, ident,
                             f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save as UTF-8"))
        return None


def read_instructions(path: Path, problems: list[Problem]) -> dict[str, tuple[str | None, str | None]]:
    """stem -> (instruction or None, edit_type or None) from a CSV (header: stem[,instruction][,edit_type]) or a
    JSONL / JSON-list file of objects with the same keys (`schema.read_numbered_records`). Bad rows are reported
    (file:line, or file:position in a JSON list) and skipped; a stem listed twice is reported and dropped."""
    rows: list[tuple[int, Any]] = []
    if path.suffix.lower() == ".csv":
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(f"instructions file {path} is not valid UTF-8 (offset {e.start})") from None
        reader = csv.DictReader(text.splitlines())
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "stem" not in cols or not ({"instruction", "edit_type"} & set(cols)):
            raise ConfigError(f"instructions file {path} needs a header with `stem` and `instruction` and/or "
                              f"`edit_type` (got {', '.join(cols) or 'nothing'})")
        for i, row in enumerate(reader, 2):
            rows.append((i, {(k or "").strip(): v for k, v in row.items()}))
    else:
        def bad_line(line: int, message: str) -> None:
            problems.append(_err("bad_instructions_row", f"{path}:{line}", None, message))

        try:
            rows = read_numbered_records(path, on_bad_line=bad_line)
        except DatasetFormatError as e:
            raise ConfigError(f"instructions file {e}") from None
    table: dict[str, tuple[str | None, str | None]] = {}
    seen_at: dict[str, int] = {}
    dropped: set[str] = set()
    for line, row in rows:
        if not isinstance(row, dict):
            problems.append(_err("bad_instructions_row", f"{path}:{line}", None, "not an object"))
            continue
        stem = row.get("stem", row.get("id"))
        stem = str(stem).strip() if stem is not None else ""
        if not stem:
            problems.append(_err("bad_instructions_row", f"{path}:{line}", None, "no `stem`"))
            continue
        instr = row.get("instruction")
        etype = row.get("edit_type")
        instr = str(instr).strip() if instr not in (None, "") else None
        etype = str(etype).strip() if etype not in (None, "") else None
        if stem in seen_at:
            problems.append(_err("duplicate_stem", f"{path}:{line}", stem,
                                 f"listed again (first at line {seen_at[stem]}); both rows ignored"))
            dropped.add(stem)
            continue
        seen_at[stem] = line
        table[stem] = (instr or None, etype or None)
    for stem in dropped:
        table.pop(stem, None)
    return table


def _pick_instruction(stem: str, table: dict, txt: Path | None, fallback: str | None,
                      problems: list[Problem]) -> tuple[str | None, bool]:
    """(instruction, ok). Precedence: instructions file > prompt text file > --instruction."""
    row = table.get(stem)
    if row and row[0]:
        return row[0], True
    if txt is not None and txt.is_file():
        text = _read_text_file(txt, stem, problems)
        if text is None:
            return None, False
        if text:
            return text, True
        if fallback:
            return fallback, True
        problems.append(_err("missing_instruction", txt, stem, "prompt file is empty"))
        return None, False
    if fallback:
        return fallback, True
    problems.append(_err("missing_instruction", txt, stem,
                         "no instruction: add this text file, a row in --instructions, or --instruction"))
    return None, False


def _discover_refs(ref_dir: Path, problems: list[Problem]) -> tuple[dict[str, list[Path]], set[str]]:
    groups: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for p in sorted(ref_dir.iterdir()):
        if not (p.is_file() and is_image_file(p)):
            continue
        m = _REF_RE.match(p.stem)
        if not m:
            problems.append(Problem("warning", "ignored_file", str(p), None,
                                    "reference files must be named <stem>_<n>.<ext>; ignored"))
            continue
        groups[m["stem"]][int(m["n"])].append(p)
    refs, bad = {}, set()
    for stem, by_n in groups.items():
        dup = [ps for ps in by_n.values() if len(ps) > 1]
        if dup:
            for ps in dup:
                problems.append(_dup_problem(stem, ps, "reference"))
            bad.add(stem)
            continue
        refs[stem] = [by_n[n][0] for n in sorted(by_n)]
    return refs, bad


def discover(cfg: BuildConfig) -> tuple[list[SampleSpec], list[Problem]]:
    """Pair the inputs; every unusable stem is reported (file + reason) and left out."""
    problems: list[Problem] = []
    table = read_instructions(cfg.instructions, problems) if cfg.instructions else {}
    specs: list[SampleSpec] = []
    if cfg.samples_dir is not None:
        for d in sorted(cfg.samples_dir.iterdir()):
            if not d.is_dir() or d.name.startswith("."):
                continue
            stem = d.name
            imgs, dups = _list_images(d)
            if dups:
                for name, ps in dups.items():
                    problems.append(_dup_problem(stem, ps, f"'{name}'"))
                continue
            src, tgt = imgs.get("source"), imgs.get("target")
            if src is None or tgt is None:
                missing = "source" if src is None else "target"
                problems.append(_err(f"missing_{missing}", d, stem, f"no {missing}.* image in this sample folder"))
                continue
            refs = sorted((int(m[1]), p) for name, p in imgs.items() if (m := re.fullmatch(r"ref_(\d+)", name)))
            instr, ok = _pick_instruction(stem, table, d / "prompt.txt", cfg.instruction, problems)
            if not ok:
                continue
            specs.append(SampleSpec(stem, src, tgt, imgs.get("mask"), tuple(p for _, p in refs), instr,
                                    table.get(stem, (None, None))[1]))
    else:
        src, dsrc = _list_images(cfg.source_dir)
        tgt, dtgt = _list_images(cfg.target_dir)
        masks, dmask = _list_images(cfg.mask_dir) if cfg.mask_dir else ({}, {})
        refs, bad_refs = _discover_refs(cfg.ref_dir, problems) if cfg.ref_dir else ({}, set())
        bad = set(bad_refs)
        for what, dups in (("source", dsrc), ("target", dtgt), ("mask", dmask)):
            for stem, ps in dups.items():
                problems.append(_dup_problem(stem, ps, what))
                bad.add(stem)
        stems = sorted(set(src) | set(tgt) | set(dsrc) | set(dtgt))
        for stem in stems:
            if stem in bad:
                continue
            if stem not in tgt:
                problems.append(_err("missing_target", src[stem], stem,
                                     f"no target image '{stem}.*' in {cfg.target_dir}"))
                continue
            if stem not in src:
                problems.append(_err("missing_source", tgt[stem], stem,
                                     f"no source image '{stem}.*' in {cfg.source_dir}"))
                continue
            mask = masks.get(stem)
            if cfg.mask_dir is not None and mask is None:
                problems.append(Problem("warning", "mask_missing", str(src[stem]), stem,
                                        f"no mask '{stem}.*' in {cfg.mask_dir}; derived from the difference"))
            instr, ok = _pick_instruction(stem, table, cfg.source_dir / f"{stem}.txt", cfg.instruction, problems)
            if not ok:
                continue
            specs.append(SampleSpec(stem, src[stem], tgt[stem], mask, tuple(refs.get(stem, ())), instr,
                                    table.get(stem, (None, None))[1]))
        known = set(src) | set(tgt)
        for stem, p in sorted(masks.items()):
            if stem not in known:
                problems.append(Problem("warning", "unused_file", str(p), stem, "mask without a source/target pair"))
        for stem, ps in sorted(refs.items()):
            if stem not in known:
                problems.append(Problem("warning", "unused_file", str(ps[0]), stem,
                                        "reference without a source/target pair"))
    return specs, problems


# ----------------------------------------------------------------------------------------------------------------
# per-sample work (worker processes)


def _as_image(x: Image.Image | np.ndarray) -> Image.Image:
    return x if isinstance(x, Image.Image) else Image.fromarray(np.ascontiguousarray(x))


def _as_l(mask: np.ndarray) -> Image.Image:
    """bool HxW -> L image 0/255."""
    return Image.fromarray(np.ascontiguousarray(mask).view(np.uint8) * np.uint8(255), "L")


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation of a bool mask by `radius` px (separable running max)."""
    if radius <= 0:
        return mask
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for s in range(1, min(radius, n - 1) + 1):
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - s), slice(s, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def derive_mask(source: Image.Image | np.ndarray, target: Image.Image | np.ndarray, threshold: int = 24,
                radius: int = 2, diff: Image.Image | None = None) -> np.ndarray:
    """Edited region (bool HxW) of two same-size RGB images: max over channels of |source - target| > threshold
    (0-255 units), then a square dilation by `radius` px."""
    if diff is None:
        diff = ImageChops.difference(_as_image(source), _as_image(target))
    r, g, b = diff.split()
    peak = ImageChops.lighter(ImageChops.lighter(r, g), b)
    return dilate(np.asarray(peak) > threshold, radius)


def background_change(source: Image.Image | np.ndarray, target: Image.Image | np.ndarray, mask: np.ndarray,
                      diff: Image.Image | None = None) -> float:
    """Mean |source - target| outside the mask in 0..1 (over pixels and channels); 0 when nothing is outside."""
    outside = ~mask
    n = int(np.count_nonzero(outside))
    if n == 0:
        return 0.0
    if diff is None:
        diff = ImageChops.difference(_as_image(source), _as_image(target))
    total = sum(ImageStat.Stat(diff, _as_l(outside)).sum)
    return float(total) / (n * 3 * 255.0)


def aspect_mismatch(size_a: tuple[int, int], size_b: tuple[int, int]) -> float:
    """Relative difference of the aspect ratios (w/h) of two sizes."""
    ra, rb = size_a[0] / size_a[1], size_b[0] / size_b[1]
    return abs(ra / rb - 1.0)


def check_filters(stats: dict[str, Any], st: BuildSettings) -> Problem | None:
    area, bg = stats["mask_area"], stats["bg_change"]
    if area < st.min_mask_area:
        return Problem("filtered", "mask_too_small", None, None,
                       f"mask covers {area:.4%} of the image (< --min-mask-area {st.min_mask_area})")
    if area > st.max_mask_area:
        return Problem("filtered", "mask_too_large", None, None,
                       f"mask covers {area:.2%} of the image (> --max-mask-area {st.max_mask_area})")
    if bg > st.max_bg_change:
        return Problem("filtered", "background_changed", None, None,
                       f"mean abs difference outside the mask is {bg:.4f} (> --max-bg-change {st.max_bg_change})")
    return None


def _hash_inputs(spec: SampleSpec, st: BuildSettings) -> tuple[str, dict[str, bytes]]:
    h = hashlib.blake2b(digest_size=16)
    h.update(st.key().encode())
    h.update(json.dumps([spec.id, spec.instruction, spec.edit_type, spec.mask is None]).encode())
    data: dict[str, bytes] = {}
    roles = [("target", spec.target), ("source", spec.source)]
    if spec.mask is not None:
        roles.append(("mask", spec.mask))
    roles += [(f"ref_{i}", p) for i, p in enumerate(spec.refs, 1)]
    for role, path in roles:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise SampleError(_err("read_error", path, spec.id, f"cannot read: {e.strerror or e}")) from None
        data[role] = raw
        h.update(role.encode())
        h.update(hashlib.blake2b(raw, digest_size=16).digest())
    return h.hexdigest(), data


def _read_sidecar(path: Path, key: str) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or not isinstance(meta.get("stats"), dict):
        return None
    return meta


def _outputs_ok(outputs: dict[str, int], base_dir: Path) -> bool:
    for rel, size in outputs.items():
        try:
            if (base_dir / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _write_sidecar(st: BuildSettings, ident: str, key: str, stats: dict, record: dict | None,
                   outputs: dict[str, int]) -> None:
    meta = {"version": BUILDER_VERSION, "key": key, "stats": stats, "record": record, "outputs": outputs}
    atomic_write_bytes(st.meta_dir / f"{ident}.json", json_text(meta).encode(), fsync=False)


def process_sample(spec: SampleSpec, st: BuildSettings) -> SampleResult:
    """Build (or reuse) one sample. Bad input becomes an error result, never an exception (Ctrl-C excepted)."""
    try:
        return _process(spec, st)
    except SampleError as e:
        return SampleResult(spec.id, "error", problems=[e.problem])
    except Exception as e:  # a bug or an unexpected I/O failure: report it, keep the run going
        return SampleResult(spec.id, "error", problems=[_err("internal_error", spec.source, spec.id,
                                                             f"{type(e).__name__}: {e}")])


def _decode(path: Path, raw: bytes, ident: str) -> DecodedImage:
    try:
        return decode_image(path, raw)
    except ImageDecodeError as e:
        raise SampleError(_err("decode_error", path, ident, e.reason)) from None


def _rgb(dec: DecodedImage, path: Path, ident: str) -> Image.Image:
    try:
        return to_rgb(dec)
    except ImageDecodeError as e:
        raise SampleError(_err("decode_error", path, ident, e.reason)) from None


def _check_size(path: Path, size: tuple[int, int], ref_size: tuple[int, int], ident: str, what: str) -> None:
    if size != ref_size and aspect_mismatch(size, ref_size) > ASPECT_TOLERANCE:
        raise SampleError(_err("size_mismatch", path, ident,
                               f"{what} is {size[0]}x{size[1]} but the target is {ref_size[0]}x{ref_size[1]} "
                               f"(aspect ratios differ by {aspect_mismatch(size, ref_size):.1%} > 1%)"))


def _process(spec: SampleSpec, st: BuildSettings) -> SampleResult:
    key, raw = _hash_inputs(spec, st)
    sidecar = st.meta_dir / f"{spec.id}.json"
    if not st.force:
        meta = _read_sidecar(sidecar, key)
        if meta is not None:
            verdict = check_filters(meta["stats"], st)
            if verdict is not None:
                verdict.id, verdict.file = spec.id, str(spec.target)
                return SampleResult(spec.id, "filtered", problems=[verdict], stats=meta["stats"])
            if meta.get("record") and _outputs_ok(meta.get("outputs") or {}, st.base_dir):
                return SampleResult(spec.id, "reused", meta["record"], stats=meta["stats"])

    tgt_dec = _decode(spec.target, raw["target"], spec.id)
    src_dec = _decode(spec.source, raw["source"], spec.id)
    tgt_img, src_img = _rgb(tgt_dec, spec.target, spec.id), _rgb(src_dec, spec.source, spec.id)
    if aspect_problem(*tgt_img.size):  # the cache and the editor refuse it: refuse it here, where it enters
        raise SampleError(_err("bad_aspect", spec.target, spec.id, aspect_problem(*tgt_img.size)))
    size = fit_size(tgt_img.width, tgt_img.height, st.max_pixels)
    _check_size(spec.source, src_img.size, tgt_img.size, spec.id, "the source")
    if tgt_img.size != size:
        tgt_img = tgt_img.resize(size, Image.LANCZOS)
    if src_img.size != size:
        src_img = src_img.resize(size, Image.LANCZOS)
    diff = ImageChops.difference(src_img, tgt_img)

    if spec.mask is not None:
        mask_dec = _decode(spec.mask, raw["mask"], spec.id)
        try:
            mask_img = to_mask(mask_dec)
        except ImageDecodeError as e:
            raise SampleError(_err("decode_error", spec.mask, spec.id, e.reason)) from None
        _check_size(spec.mask, mask_img.size, tgt_dec.size, spec.id, "the mask")
        if mask_img.size != size:
            mask_img = mask_img.resize(size, Image.NEAREST)
        binary = binarize_mask(mask_img)
    else:
        binary = derive_mask(src_img, tgt_img, st.diff_threshold, st.mask_dilation, diff=diff)
    area = float(np.count_nonzero(binary)) / binary.size
    if area == 0.0:
        if spec.mask is not None:
            raise SampleError(_err("empty_mask", spec.mask, spec.id, "mask is empty (no pixel above 127)"))
        raise SampleError(_err("empty_mask", spec.target, spec.id,
                               f"derived mask is empty: source and target differ nowhere by more than "
                               f"{st.diff_threshold}/255"))
    stats = {"mask_area": round(area, 6), "bg_change": round(background_change(src_img, tgt_img, binary, diff), 6),
             "size": list(size), "mask_derived": spec.mask is None}
    verdict = check_filters(stats, st)
    if verdict is not None:
        verdict.id, verdict.file = spec.id, str(spec.target)
        _write_sidecar(st, spec.id, key, stats, None, {})
        return SampleResult(spec.id, "filtered", problems=[verdict], stats=stats)

    try:
        box: Box = mask_bbox(binary, (size[1], size[0]))
    except EmptyMaskError:  # pragma: no cover - area > 0 above
        raise SampleError(_err("empty_mask", spec.mask or spec.target, spec.id, "mask is empty")) from None
    refs = []  # decoded before anything is written, so a bad reference leaves no outputs behind
    for i, ref_path in enumerate(spec.refs, 1):  # references keep their own size (fitted, 16-aligned)
        ref_dec = _decode(ref_path, raw[f"ref_{i}"], spec.id)
        ref_img = _rgb(ref_dec, ref_path, spec.id)
        ref_size = fit_size(ref_img.width, ref_img.height, st.max_pixels)
        refs.append((ref_img.resize(ref_size, Image.LANCZOS) if ref_img.size != ref_size else ref_img, ref_dec))
    outputs: dict[str, int] = {}
    files = st.files_dir

    def put(kind: str, name: str, img: Image.Image | np.ndarray, dec: DecodedImage | None = None,
            data: bytes | None = None, expect: tuple[int, int] = size) -> str:
        """Write one output; an input that already is exactly these pixels (8-bit RGB PNG/JPEG/WebP, upright, of
        the right size) is copied byte for byte instead of re-encoded."""
        if dec is not None and data is not None and dec.format in FORMAT_EXTENSION and dec.is_plain_rgb() \
                and dec.size == expect:
            path = files / kind / f"{name}{FORMAT_EXTENSION[dec.format]}"
            atomic_write_bytes(path, data, fsync=False)
        else:
            path = files / kind / f"{name}.png"
            atomic_save_image(img, path, compress_level=st.compress_level, compress_type=PNG_STRATEGY)
        rel = relative_path(path, st.base_dir)
        outputs[rel] = path.stat().st_size
        return rel

    image_rel = put("target", spec.id, tgt_img, tgt_dec, raw["target"])
    mask_l = _as_l(binary)
    if st.fixed_source:  # source inside the mask, target outside: the background is the target's, pixel for pixel
        edit0 = put("fixed", spec.id, Image.composite(src_img, tgt_img, mask_l))
    else:
        edit0 = put("source", spec.id, src_img, src_dec, raw["source"])
    edit_rest = [put("refs", f"{spec.id}_{i}", img, dec, raw[f"ref_{i}"], expect=img.size)
                 for i, (img, dec) in enumerate(refs, 1)]
    mask_rel = put("mask", spec.id, mask_l)
    ref_gt = Image.composite(tgt_img, Image.new("RGB", size, WHITE), mask_l)  # the target on white
    ref_gt_rel = put("ref_gt", spec.id, ref_gt)
    crop_rel = put("ref_gt_crop", spec.id, ref_gt.crop(box.pil_box()))

    record: dict[str, Any] = {
        "prompt": st.prompt_template.replace("{instruction}", spec.instruction),
        "image": image_rel,
        "edit_image": [edit0] + edit_rest,
        "back_mask": mask_rel,
        "ref_gt": ref_gt_rel,
        "ref_gt_crop": crop_rel,
    }
    if spec.edit_type:
        record["edit_type"] = spec.edit_type
    record["id"] = spec.id
    _write_sidecar(st, spec.id, key, stats, record, outputs)
    return SampleResult(spec.id, "built", record, stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# the run (main process)

_WORKER_SETTINGS: BuildSettings | None = None


def _init_worker(st: BuildSettings) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = st


def _work(spec: SampleSpec) -> SampleResult:
    assert _WORKER_SETTINGS is not None
    return process_sample(spec, _WORKER_SETTINGS)


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def run_samples(specs: list[SampleSpec], st: BuildSettings, workers: int = 0, progress: bool = True) -> list[SampleResult]:
    """Process every spec (pool of `workers` processes, 0 = all cores; 1 = in this process); sorted by id."""
    from tqdm import tqdm

    n = min(workers or available_cpus(), max(1, len(specs)))
    bar = tqdm(total=len(specs), desc="samples", unit="sample", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    results: list[SampleResult] = []
    try:
        if n <= 1:
            for spec in specs:
                results.append(process_sample(spec, st))
                bar.update(1)
        else:
            with mp.get_context().Pool(n, initializer=_init_worker, initargs=(st,)) as pool:
                for res in pool.imap_unordered(_work, specs, chunksize=1):
                    results.append(res)
                    bar.update(1)
    finally:
        bar.close()
    results.sort(key=lambda r: r.id)
    return results


def split_test_ids(records: list[dict], test_fraction: float = 0.0, test_per_type: int = 0,
                   seed: int = 42) -> set[str]:
    """Ids of the test split. Each id gets a rank = hash(seed, id), so the split depends only on the seed and the
    ids (not on order or worker timing); the lowest ranks (overall, or within each edit_type) go to test."""
    def rank(ident: str) -> str:
        return hashlib.blake2b(f"{seed}\0{ident}".encode(), digest_size=16).hexdigest()

    ids = [r["id"] for r in records]
    if test_fraction > 0:
        k = int(round(len(ids) * test_fraction))
        if len(ids) >= 2:
            k = min(max(k, 1), len(ids) - 1)
        return set(sorted(ids, key=rank)[:k])
    if test_per_type > 0:
        groups: dict[str, list[str]] = defaultdict(list)
        for r in records:
            groups[r.get("edit_type") or ""].append(r["id"])
        return {i for g in groups.values() for i in sorted(g, key=rank)[:test_per_type]}
    return set()


@dataclass
class BuildSummary:
    json_path: Path
    report_path: Path
    records: list[dict[str, Any]]
    problems: list[Problem]
    counts: dict[str, Any]
    built: int = 0
    reused: int = 0
    written_files: list[Path] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.kind == "error"]

    def exit_code(self, strict: bool = False) -> int:
        if not self.records:
            return 1
        return 1 if strict and self.errors else 0

    def format(self, max_lines: int = 30) -> str:
        c = self.counts
        lines = [f"{self.json_path}: {len(self.records)} samples written ({self.built} built, {self.reused} up to "
                 f"date) of {c['samples']} found; {sum(c['errors'].values())} errors, "
                 f"{sum(c['filtered'].values())} filtered, {sum(c['warnings'].values())} warnings"]
        for kind in ("errors", "filtered", "warnings"):
            if c[kind]:
                lines.append(f"  {kind}: " + ", ".join(f"{k} {v}" for k, v in sorted(c[kind].items())))
        if "splits" in c:
            lines.append("  splits: " + ", ".join(f"{k} {v}" for k, v in c["splits"].items()))
        shown = [p for p in self.problems if p.kind != "warning"] + [p for p in self.problems if p.kind == "warning"]
        for p in shown[:max_lines]:
            lines.append("  " + p.format())
        if len(shown) > max_lines:
            lines.append(f"  ... {len(shown) - max_lines} more")
        lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)


def _report_settings(cfg: BuildConfig) -> dict[str, Any]:
    skip = {"workers", "progress", "force", "strict"}
    out = {}
    for k, v in asdict(cfg).items():
        if k not in skip:
            out[k] = str(v) if isinstance(v, Path) else v
    return out


def build_dataset(cfg: BuildConfig) -> BuildSummary:
    """Run the whole build; see the module docstring. Never raises for bad input (only for bad configuration)."""
    cfg.validate()
    layout = OutputLayout(Path(cfg.out))
    st = BuildSettings.from_config(cfg, layout)
    specs, problems = discover(cfg)
    n_found = len(specs) + len({p.id for p in problems if p.kind == "error" and p.id})
    results = run_samples(specs, st, cfg.workers, cfg.progress)
    for r in results:
        problems.extend(r.problems)
    records = [r.record for r in results if r.record is not None]
    written: list[Path] = []

    def write(path: Path, text: str) -> None:
        if atomic_write_if_changed(path, text):
            written.append(path)

    counts: dict[str, Any] = {
        "samples": n_found,
        "written": len(records),
        "errors": dict(sorted(Counter(p.reason for p in problems if p.kind == "error").items())),
        "filtered": dict(sorted(Counter(p.reason for p in problems if p.kind == "filtered").items())),
        "warnings": dict(sorted(Counter(p.reason for p in problems if p.kind == "warning").items())),
    }
    if records:
        write(layout.json_path, dataset_text(records))
        if cfg.jsonl:
            write(layout.json_path.with_suffix(".jsonl"), dataset_text(records, jsonl=True))
        test_ids = split_test_ids(records, cfg.test_fraction, cfg.test_per_type, cfg.seed)
        if cfg.test_fraction or cfg.test_per_type:
            parts = {"train": [r for r in records if r["id"] not in test_ids],
                     "test": [r for r in records if r["id"] in test_ids]}
            for name, recs in parts.items():
                write(layout.split_path(name), dataset_text(recs))
                if cfg.jsonl:
                    write(layout.split_path(name, ".jsonl"), dataset_text(recs, jsonl=True))
            counts["splits"] = {k: len(v) for k, v in parts.items()}
    problems.sort(key=lambda p: (p.id or "", {"error": 0, "filtered": 1, "warning": 2}[p.kind], p.reason,
                                 p.file or ""))
    report = {"dataset": layout.json_path.name, "builder_version": BUILDER_VERSION,
              "settings": _report_settings(cfg), "counts": counts,
              "problems": [p.to_dict() for p in problems]}
    write(layout.report_path, json_text(report))
    return BuildSummary(layout.json_path, layout.report_path, records, problems, counts,
                        built=sum(r.status == "built" for r in results),
                        reused=sum(r.status == "reused" for r in results), written_files=written)
