"""Raw folders -> dataset JSON, in parallel, nothing lost (docs/dataset.md describes every input and flag).

Flow: `discover` pairs the inputs by stem in the main process (listing, duplicates, missing members, instruction
files) -> `build_sample.process_sample` runs per sample in worker processes (`workers`; decode, resize, mask, filters,
derived files, sidecar) -> results sorted by id -> dataset JSON (+ JSONL, splits) and `<name>_report.json`, each
written atomically and only when its content changed. Re-runs reuse up-to-date samples (`sidecar`).

Where: `build_config` (BuildConfig, OutputLayout, BuildSettings), `records` (what the stages pass on), `discover`,
`build_sample`, `masks` (derived mask, measures, filters), `sidecar`; this module runs the pool and writes the files.
"""
from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_all_if_changed, json_text
from ..output_errors import OutputWriteError
from .build_config import BUILDER_VERSION, BuildConfig, BuildSettings, OutputLayout
from .build_sample import process_sample
from .discover import discover
from .records import Problem, SampleResult, SampleSpec
from .schema import dataset_text
from .workers import run_in_workers


def build_dataset(cfg: BuildConfig) -> BuildSummary:
    """Run the whole build; see the module docstring. Never raises for bad input; raises ConfigError for bad
    configuration and `OutputWriteError` when an output cannot be written (full disk, read-only folder: nothing
    more is written, the previous dataset JSON stays, finished samples are reused by the next run)."""
    cfg.validate()
    layout = OutputLayout(Path(cfg.out))
    st = BuildSettings.from_config(cfg, layout)
    specs, problems = discover(cfg)
    n_found = len(specs) + len({p.id for p in problems if p.kind == "error" and p.id})

    results = run_samples(specs, st, cfg.workers, cfg.progress)

    for r in results:
        problems.extend(r.problems)
    records = [r.record for r in results if r.record is not None]
    counts: dict[str, Any] = {
        "samples": n_found,
        "written": len(records),
        "errors": dict(sorted(Counter(p.reason for p in problems if p.kind == "error").items())),
        "filtered": dict(sorted(Counter(p.reason for p in problems if p.kind == "filtered").items())),
        "warnings": dict(sorted(Counter(p.reason for p in problems if p.kind == "warning").items())),
    }
    files = _dataset_files(cfg, layout, records, counts) if records else []
    problems.sort(key=lambda p: (p.id or "", {"error": 0, "filtered": 1, "warning": 2}[p.kind], p.reason,
                                 p.file or ""))
    report = {"dataset": layout.json_path.name, "builder_version": BUILDER_VERSION,
              "settings": _report_settings(cfg), "counts": counts,
              "problems": [p.to_dict() for p in problems]}
    written = _write_together(files + [(layout.report_path, json_text(report))])
    return BuildSummary(layout.json_path, layout.report_path, records, problems, counts,
                        built=sum(r.status == "built" for r in results),
                        reused=sum(r.status == "reused" for r in results), written_files=written)


def _dataset_files(cfg: BuildConfig, layout: OutputLayout, records: list[dict[str, Any]],
                   counts: dict[str, Any]) -> list[tuple[Path, str]]:
    """(path, text) of the dataset JSON (+ JSONL) and the train/test splits. Adds the split sizes to `counts`."""
    files = [(layout.json_path, dataset_text(records))]
    if cfg.jsonl:
        files.append((layout.json_path.with_suffix(".jsonl"), dataset_text(records, jsonl=True)))
    test_ids = split_test_ids(records, cfg.test_fraction, cfg.test_per_type, cfg.seed)
    if cfg.test_fraction or cfg.test_per_type:
        parts = {"train": [r for r in records if r["id"] not in test_ids],
                 "test": [r for r in records if r["id"] in test_ids]}
        for name, recs in parts.items():
            files.append((layout.split_path(name), dataset_text(recs)))
            if cfg.jsonl:
                files.append((layout.split_path(name, ".jsonl"), dataset_text(recs, jsonl=True)))
        counts["splits"] = {k: len(v) for k, v in parts.items()}
    return files


def _write_together(files: list[tuple[Path, str]]) -> list[Path]:
    """The dataset files and the report, all or none (`atomic_write_all_if_changed`); a failed write is the run's
    `OutputWriteError` and every previous file stays as it was."""
    try:
        return atomic_write_all_if_changed(files)
    except OSError as e:
        raise OutputWriteError.from_os_error(e, e.filename) from None


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def run_samples(specs: list[SampleSpec], st: BuildSettings, workers: int = 0, progress: bool = True) -> list[SampleResult]:
    """Process every spec (`workers` processes, 0 = all cores; 1 = in this process); sorted by id. A sample whose
    worker died is a `worker_died` error; a failed output write raises `OutputWriteError` (see `workers`)."""
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
            def collect(res: SampleResult) -> None:
                results.append(res)
                bar.update(1)

            run_in_workers(specs, st, n, collect)
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

    @property
    def lost(self) -> list[Problem]:
        """Samples whose worker process died (killed, usually for memory): not bad input, but not built either."""
        return [p for p in self.problems if p.reason == "worker_died"]

    def exit_code(self, strict: bool = False) -> int:
        """1 when nothing was written, a worker died (samples missing), or with `strict` any bad input; else 0."""
        if not self.records or self.lost:
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
