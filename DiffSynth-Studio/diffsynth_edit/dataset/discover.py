"""Discovery (main process): pair the raw inputs by stem, read the instructions; every unusable stem is reported
(file + reason) and left out."""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..image_io import is_image_file
from .build_config import BuildConfig
from .records import Problem, SampleSpec, _err
from .schema import DatasetFormatError, read_numbered_records

_REF_RE = re.compile(r"^(?P<stem>.+)_(?P<n>\d+)$")


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
