"""Step 1 of a cache run: hash every sample's inputs and settings, find the files that are already complete."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .dist import _Dist
from .manifest import sample_hash
from .samples import _Item
from .store import quick_check, read_header
from .summary import Failure
from .writer import entry_record


@dataclass
class ScanResult:
    valid: dict[int, dict] = field(default_factory=dict)  # index -> record of a complete file already there
    failures: list[Failure] = field(default_factory=list)  # inputs that cannot be read
    pending: list[_Item] = field(default_factory=list)  # to encode: sorted by index, one sample per distinct hash
    seconds: float = 0.0  # this rank's hashing and checking


def scan_items(items: list[_Item], fingerprint: str, cache_dir: Path, dist: _Dist, num_workers: int) -> ScanResult:
    """Hash and check every sample, each rank a stride share, then every rank has the whole picture (sets each
    item's `hash`). Identical inputs hash to the same file: only the first of them is pending."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=num_workers) as ex:
        scanned = list(ex.map(lambda it: (it.index, *_scan_item(it, fingerprint, cache_dir)),
                              items[dist.rank::dist.world]))
    out = ScanResult(seconds=time.perf_counter() - t0)
    results = {idx: (h, rec, err) for part in dist.all_gather(scanned) for idx, h, rec, err in part}
    pending: list[_Item] = []
    for it in items:
        h, rec, err = results[it.index]
        it.hash = h
        if err is not None:
            out.failures.append(Failure(it.id, it.index, err))
        elif rec is not None:
            out.valid[it.index] = rec
        else:
            pending.append(it)
    pending.sort(key=lambda it: it.index)
    seen_hash: set[str] = set()
    for it in pending:
        if it.hash not in seen_hash:
            seen_hash.add(it.hash)
            out.pending.append(it)
    return out


def _scan_item(item: _Item, fingerprint: str, cache_dir: Path) -> tuple[str | None, dict | None, str | None]:
    """(hash, record if a valid file exists, failure reason)."""
    try:
        h = sample_hash(fingerprint, item.prompt, item.input_files(), item.id, item.edit_type)
    except FileNotFoundError as e:
        role = next((r for r, p in item.input_files() if str(p) == e.filename), "input")
        return None, None, f"{role} {e.filename}: file not found"
    except OSError as e:
        return None, None, f"cannot read {e.filename}: {e.strerror}"
    item.hash = h
    path = cache_dir / item.file
    if not path.is_file() or quick_check(path, expected_hash=h) is not None:
        return h, None, None
    table, _ = read_header(path)
    shapes = {k: list(v["shape"]) for k, v in table.items()}
    try:
        return h, entry_record(item, shapes, path.stat().st_size), None
    except (KeyError, ValueError):
        return h, None, None
