#!/usr/bin/env python
"""Dataset builder throughput: samples/s at 1 worker and at all cores on 1-megapixel (1024x1024) pairs with masks,
derived files written (target, source, mask, ref_gt, ref_gt_crop). Median of --runs runs, each into a fresh output
folder (nothing reused). Prints a table and appends it to bench/RESULTS_dataset.md (unless --no-record).

    python bench/bench_dataset.py                       # PNG and JPEG inputs, 24 samples, 3 runs
    python bench/bench_dataset.py --count 48 --formats png --fixed-source
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import PIL

from diffsynth_edit.dataset.build_config import BuildConfig
from diffsynth_edit.dataset.builder import available_cpus, build_dataset
from diffsynth_edit.dataset.synthetic import make_sample_data

RESULTS = Path(__file__).resolve().parent / "RESULTS_dataset.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_seconds() -> float:
    """CPU time (user + sys) of this process and of its reaped children (the pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_run(raw: Path, out_root: Path, workers: int, fixed: bool, force: bool = True) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one build."""
    cfg = BuildConfig(out=out_root / "bench.json", source_dir=raw / "source", target_dir=raw / "target",
                      mask_dir=raw / "mask", instructions=raw / "edit_types.csv", workers=workers,
                      fixed_source=fixed, progress=False, force=force)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    summary = build_dataset(cfg)
    dt, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    if summary.errors or len(summary.records) != len(list((raw / "target").iterdir())):
        raise SystemExit("benchmark build did not write every sample:\n" + summary.format())
    return dt, cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=24, help="samples per run (default 24)")
    ap.add_argument("--size", type=int, default=1024, help="image side (default 1024)")
    ap.add_argument("--runs", type=int, default=3, help="runs per setting, the median is reported (default 3)")
    ap.add_argument("--formats", default="png,jpg", help="input formats to time (default png,jpg)")
    ap.add_argument("--fixed-source", action="store_true", help="also write the fixed source")
    ap.add_argument("--workers", default="1,all", help="worker counts to time, e.g. 1,2,all (default 1,all)")
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.name}")
    args = ap.parse_args(argv)

    ncpu = available_cpus()
    counts = sorted({ncpu if w.strip() == "all" else int(w) for w in args.workers.split(",") if w.strip()})
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_dataset_"))
    rows = []
    load_before = os.getloadavg()
    try:
        for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
            raw = work / f"raw_{fmt}_{args.size}_{args.count}"
            if not (raw / "edit_types.csv").is_file():
                t0 = time.perf_counter()
                make_sample_data(raw, count=args.count, size=args.size, seed=0, format=fmt, workers=ncpu)
                print(f"generated {args.count} {fmt} pairs of {args.size}x{args.size} in "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            base_rate = None
            for workers in counts:
                walls, cpus = [], []
                for r in range(args.runs):
                    out = work / f"out_{fmt}_{workers}_{r}"
                    shutil.rmtree(out, ignore_errors=True)
                    dt, cpu = one_run(raw, out, workers, args.fixed_source)
                    walls.append(dt)
                    cpus.append(cpu)
                    if r:  # keep the first run's output for the re-run row below
                        shutil.rmtree(out, ignore_errors=True)
                wall, cpu = statistics.median(walls), statistics.median(cpus)
                rate = args.count / wall
                base_rate = base_rate or (rate if workers == 1 else None)
                rows.append((f"{fmt} {args.size}²", workers, args.count, wall, rate, rate / workers,
                             args.count / cpu, None if base_rate is None else rate / base_rate))
                print(f"{fmt} workers={workers}: wall {', '.join(f'{t:.2f}' for t in walls)} s; "
                      f"cpu {', '.join(f'{t:.2f}' for t in cpus)} s", file=sys.stderr)
            # re-run with everything up to date (nothing decoded or written)
            dt, cpu = one_run(raw, work / f"out_{fmt}_{counts[-1]}_0", counts[-1], args.fixed_source, force=False)
            rows.append((f"{fmt} {args.size}², re-run (all up to date)", counts[-1], args.count, dt, args.count / dt,
                         None, args.count / cpu, None))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    header = ("| inputs | workers | samples | median wall s | samples/s (wall) | per worker (wall) | "
              "samples per CPU-second | scaling vs 1 worker |")
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, w, n, t, sps, per_worker, per_cpu, scale in rows:
        lines.append(f"| {name} | {w} | {n} | {t:.2f} | {sps:.1f} | "
                     f"{'' if per_worker is None else f'{per_worker:.1f}'} | {per_cpu:.1f} | "
                     f"{'' if scale is None else f'{scale:.2f}x'} |")
    table = "\n".join(lines)
    load = (f"load average (1/5/15 min) {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f} before, "
            f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} after")
    print(table)
    print(load)
    if not args.no_record:
        machine = f"{ncpu} cores usable (`nproc` {os.cpu_count()}), {cpu_model()}"
        cmd = "python bench/bench_dataset.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = (f"\n## {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} — {machine}\n\n"
                   f"Command: `{cmd.strip()}`; Python {platform.python_version()}, Pillow {PIL.__version__}; "
                   f"fixed source {'on' if args.fixed_source else 'off'}; median of {args.runs} runs, each into a "
                   f"fresh folder; wall time of `build_dataset` incl. pool start-up, discovery and JSON writes; CPU time = "
                   f"user+sys of the process and its pool workers; {load}.\n\n"
                   f"{table}\n")
        if not RESULTS.exists():
            RESULTS.write_text("# Dataset builder benchmark results\n\nAppended by `bench/bench_dataset.py`.\n")
        with RESULTS.open("a") as f:
            f.write(section)
        print(f"recorded in {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
