"""Faults of `generate_dataset_json_mp.py build`: a worker process that dies (the OOM killer), a huge input refused by
its header, a full or read-only output file system. Issue 19, items 3 and 5."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsynth_edit.dataset.build_config import BuildConfig
from diffsynth_edit.dataset.builder import build_dataset
from diffsynth_edit.dataset.synthetic import make_sample_data
from diffsynth_edit.dataset.workers import KILL_ENV
from fs_faults import assert_one_write_error, error_lines, run_under_fault, small_fs  # noqa: F401  (small_fs: fixture)

REPO = Path(__file__).resolve().parents[1]


def build(raw, out: Path, *extra, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "generate_dataset_json_mp.py"), "build", *raw.build_args(), "--out", str(out),
           "--progress", "false", *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def ids(path: Path) -> list[str]:
    return [r["id"] for r in json.loads(path.read_text())]


@pytest.mark.slow
def test_dead_worker_is_reported_and_the_build_finishes(tmp_path):
    """A worker SIGKILLed on one sample (as by the OOM killer): the build ends (it used to wait forever), the others
    are written, the lost sample is reported by name with the signal, exit 1; a re-run builds just that sample."""
    raw = make_sample_data(tmp_path / "raw", count=6, size=64, seed=1)
    out = tmp_path / "out" / "ds.json"
    r = build(raw, out, "--workers", 2, env={KILL_ENV: "sample_0003"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert ids(out) == [s for s in raw.stems if s != "sample_0003"]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "sample_0003" in lines[0] and "worker process died" in lines[0], r.stderr
    assert "error worker_died: [sample_0003]" in r.stdout and "SIGKILL" in r.stdout, r.stdout
    report = json.loads((out.parent / "ds_report.json").read_text())
    (lost,) = [p for p in report["problems"] if p["reason"] == "worker_died"]
    assert lost["id"] == "sample_0003" and lost["file"] == str(raw.source_dir / "sample_0003.png")
    assert "out of memory" in lost["detail"]

    r = build(raw, out, "--workers", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ids(out) == raw.stems and "(1 built, 5 up to date)" in r.stdout, r.stdout


@pytest.mark.slow
def test_ctrl_c_stops_the_build_with_one_line_and_the_rerun_reuses_finished_samples(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while a worker waits on sample_0003 and the
    others are done: exit 130 with one line and no traceback (the workers ignore SIGINT; the parent stops them), the
    JSON is not written, no temporary file is left, and the re-run builds only sample_0003."""
    import signal
    import time

    from diffsynth_edit.dataset.workers import PAUSE_ENV
    from fs_faults import tmp_files

    raw = make_sample_data(tmp_path / "raw", count=5, size=64, seed=1)
    out = tmp_path / "out" / "ds.json"
    cmd = [sys.executable, str(REPO / "generate_dataset_json_mp.py"), "build", *raw.build_args(), "--out", str(out),
           "--progress", "false", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, PAUSE_ENV: "sample_0003"})
    try:
        deadline = time.monotonic() + 120
        others = [s for s in raw.stems if s != "sample_0003"]
        while not all(list(out.parent.rglob(f"{s}.png")) for s in others):
            assert time.monotonic() < deadline and proc.poll() is None, "the other samples were not built"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    lines = error_lines(err)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert len(lines) == 1 and "stopped by SIGINT (Ctrl-C)" in lines[0] and str(out) in lines[0], err
    assert not out.exists() and not tmp_files(out.parent)

    r = build(raw, out, "--workers", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ids(out) == raw.stems and "(1 built, 4 up to date)" in r.stdout, r.stdout


def _fork_a_worker_on_one_sample(tmp_path, monkeypatch, process_sample, started: Path):
    """A dataset-build worker forked with `process_sample` in place of the real one, sent one sample `s1`; returned
    once `process_sample` has touched `started`."""
    import multiprocessing as mp
    import time

    from diffsynth_edit.dataset import workers
    from diffsynth_edit.dataset.records import SampleSpec

    monkeypatch.setattr(workers, "process_sample", process_sample)
    w = workers._Worker(mp.get_context("fork"), st=None)
    w.conn.send(SampleSpec("s1", tmp_path / "s.png", tmp_path / "t.png", None, (), "edit"))
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and w.proc.is_alive(), "the worker never reached the point to stop it at"
        time.sleep(0.05)
    return w


def test_a_worker_stopped_mid_write_leaves_no_temporary_file(tmp_path, monkeypatch, capfd):
    """When the pool stops early (another worker hit a full disk), the parent terminates the busy workers: one caught
    inside an atomic write removes its temporary file, and exits without a traceback. (Before, SIGTERM's default
    action left `.<name>.<random>.tmp` behind; seen once in a CI run of the full-disk test.)"""
    import time

    from diffsynth_edit.atomic import atomic_path
    from diffsynth_edit.lifetime import Terminated

    started = tmp_path / "started"

    def slow_write(spec, st):  # runs in the forked worker
        with atomic_path(tmp_path / f"{spec.id}.png") as tmp:
            tmp.write_bytes(b"half an image")
            started.touch()
            time.sleep(60)

    w = _fork_a_worker_on_one_sample(tmp_path, monkeypatch, slow_write, started)
    w.stop(grace=0.0)
    assert w.proc.exitcode == Terminated.exit_code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started"]
    assert "Traceback" not in capfd.readouterr().err


def test_a_worker_stopped_while_removing_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch, capfd):
    """The pool stops because the disk is full, and a second worker's write fails on the same full disk at that
    moment: the SIGTERM lands while `atomic_path` is removing that write's temporary file, cutting the removal short.
    The worker still removes it before exiting. (The likely cause of a leftover seen in a CI run after the test above
    was fixed; here the removal is made slow so that the signal lands inside it every time.)"""
    import errno
    import pathlib
    import time

    from diffsynth_edit.atomic import atomic_path
    from diffsynth_edit.lifetime import Terminated

    started = tmp_path / "started"

    def write_failing_on_a_full_disk(spec, st):  # runs in the forked worker: the patch stays there
        real_unlink = pathlib.Path.unlink

        def slow_unlink(self, missing_ok=False):
            started.touch()
            time.sleep(60)
            real_unlink(self, missing_ok)

        pathlib.Path.unlink = slow_unlink
        with atomic_path(tmp_path / f"{spec.id}.png") as tmp:
            tmp.write_bytes(b"half an image")
            raise OSError(errno.ENOSPC, "No space left on device")

    w = _fork_a_worker_on_one_sample(tmp_path, monkeypatch, write_failing_on_a_full_disk, started)
    assert len(list(tmp_path.glob(".s1.png.*.tmp"))) == 1  # the removal has not happened yet
    w.stop(grace=0.0)
    assert w.proc.exitcode == Terminated.exit_code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started"]
    assert "Traceback" not in capfd.readouterr().err


def test_a_worker_killed_mid_write_has_its_temporary_files_removed_by_the_parent(tmp_path, monkeypatch):
    """A worker SIGKILLed while writing a sample's outputs (the OOM killer) cannot clean up: the parent removes that
    sample's temporary files (its target and its reference `<id>_1`), reports the sample lost, and leaves the
    temporary files of other samples (`s1_1`'s target, being written by another worker) alone."""
    import multiprocessing as mp
    import signal
    import types

    from diffsynth_edit.atomic import atomic_path
    from diffsynth_edit.dataset import workers
    from diffsynth_edit.dataset.records import SampleSpec

    files = tmp_path / "ds_files"
    other = files / "target" / ".s1_1.png.0123456789.tmp"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another sample's write in flight")

    def killed_mid_write(spec, st):  # runs in the forked worker
        target, ref = files / "target" / f"{spec.id}.png", files / "refs" / f"{spec.id}_1.png"
        with atomic_path(target) as a, atomic_path(ref) as b:
            a.write_bytes(b"half")
            b.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(workers, "process_sample", killed_mid_write)
    real_context = mp.get_context
    monkeypatch.setattr(workers.mp, "get_context", lambda method=None: real_context("fork"))
    results = []
    spec = SampleSpec("s1", tmp_path / "s.png", tmp_path / "t.png", None, (), "edit")
    workers.run_in_workers([spec], types.SimpleNamespace(files_dir=files), 1, results.append)
    assert [(r.id, [p.reason for p in r.problems]) for r in results] == [("s1", ["worker_died"])]
    assert sorted(str(p.relative_to(files)) for p in files.rglob("*") if p.is_file()) == ["target/" + other.name]


def test_which_output_files_are_a_samples():
    from diffsynth_edit.dataset.build_sample import is_output_of

    assert is_output_of("a", "target", "a.png") and is_output_of("a", "meta", "a.json")
    assert is_output_of("a", "refs", "a_1.png") and is_output_of("a_1", "refs", "a_1_12.jpg")
    assert not is_output_of("a", "target", "a_1.png")  # sample a_1's target
    assert not is_output_of("a", "refs", "a.png") and not is_output_of("a", "refs", "a_x.png")
    assert not is_output_of("a_1", "refs", "a_1.png")  # sample a's first reference
    assert not is_output_of("a", "target", "a") and not is_output_of("a.b", "target", "a.png")


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header says `width`x`height` but that holds the pixels of a 64x64 image (a decoder that trusts
    the header reads a truncated file; one that checks the header first never decodes)."""
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_huge_input_is_refused_by_its_header(tmp_path):
    """An image above --max-input-pixels (default: Pillow's bomb threshold, 89,478,485) is a `too_large` error
    naming its size, read from the header; the others are built; a lower limit refuses smaller images too (when
    they are decoded: up-to-date samples are reused without decoding)."""
    raw = make_sample_data(tmp_path / "raw", count=3, size=64, seed=2)
    _png_claiming(raw.target_dir / "sample_0001.png", 10_000, 10_000)  # 100 Mpx: above 1x, below Pillow's 2x error
    out = tmp_path / "out" / "ds.json"
    summary = build_dataset(BuildConfig(out=out, source_dir=raw.source_dir, target_dir=raw.target_dir,
                                        mask_dir=raw.mask_dir, instructions=raw.instructions, workers=1,
                                        progress=False))
    (err,) = summary.errors
    assert (err.reason, err.id, err.file) == ("too_large", "sample_0001", str(raw.target_dir / "sample_0001.png"))
    assert "10000x10000 = 100,000,000 pixels" in err.detail and "89,478,485" in err.detail
    assert [r["id"] for r in summary.records] == ["sample_0000", "sample_0002"]

    summary = build_dataset(BuildConfig(out=out, source_dir=raw.source_dir, target_dir=raw.target_dir,
                                        mask_dir=raw.mask_dir, instructions=raw.instructions, workers=1,
                                        progress=False, max_input_pixels=64 * 64 - 1, force=True))
    assert not summary.records and {e.reason for e in summary.errors} == {"too_large"}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_failed_write_stops_the_build_and_keeps_the_previous_json(tmp_path, small_fs, fault):
    """A full (or read-only) output file system: one error line naming the file and the reason, exit 2, the
    previous dataset JSON and report byte for byte; no temporary file left; with the fault gone, a re-run writes
    the same JSON."""
    raw = make_sample_data(tmp_path / "raw", count=6, size=64, seed=3)
    out = small_fs.path / "ds.json"
    assert build(raw, out, "--workers", 2).returncode == 0
    before = {p: p.read_bytes() for p in (out, small_fs.path / "ds_report.json")}
    r = run_under_fault(small_fs, fault, lambda: build(raw, out, "--workers", 2, "--force", "true"), leave=4096)
    assert_one_write_error(r, fault, small_fs.path)
    assert "internal_error" not in r.stdout
    assert {p: p.read_bytes() for p in before} == before
    small_fs.unfill()
    r = build(raw, out, "--workers", 2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes() == before[out]



def test_negative_max_input_pixels_is_refused_by_name(tmp_path):
    raw = make_sample_data(tmp_path / "raw", count=1, size=64, seed=1)
    r = build(raw, tmp_path / "ds.json", "--max-input-pixels", -1)
    assert r.returncode == 2 and error_lines(r.stderr) == ["error: `max_input_pixels` must be >= 0 (0 = no limit)"], \
        r.stdout + r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "ds.json").exists()
