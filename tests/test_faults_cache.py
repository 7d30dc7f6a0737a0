"""Faults of `train_2511.py cache`: the run stopped by SIGTERM or SIGKILL (its worker processes and temporary
folder must not outlive it) and a full or read-only cache folder (one line, exit 2, resumable). Issue 19, items 4
and 5."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fs_faults import assert_one_write_error, error_lines, run_under_fault, small_fs  # noqa: F401  (small_fs: fixture)
from test_cache import cache_args, run_sub, sample_files, simple_dataset, sub_env

REPO = Path(__file__).resolve().parents[1]
TEMP_PREFIX = "diffsynth-edit-cache-workers"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a container's pid 1 to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_until(cond, what: str, limit: float = 240.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_stopped_run_leaves_no_workers_and_resumes(tiny_root, tmp_path, sig):
    """A cache run with process workers, stopped after 2 of 6 samples: its workers end with it; SIGTERM exits 143 and
    Ctrl-C (SIGINT to the whole process group, as a terminal sends it) 130, each with one line and no traceback, and
    remove the temporary folder; after SIGKILL the next run removes it; the re-run encodes only the rest and `verify`
    passes."""
    dataset = simple_dataset(tmp_path / "data", n=6)
    cache, log, tmpdir = tmp_path / "cache", tmp_path / "writes.log", tmp_path / "tmp"
    tmpdir.mkdir()
    args = ["cache", *cache_args(dataset, cache, tiny_root, "--batch-size", 1, "--num-workers", 2, "--workers",
                                 "process", "--device", "cpu", "--progress", "false")]
    env = sub_env(TMPDIR=tmpdir, DIFFSYNTH_EDIT_CACHE_TEST_LOG=log)
    proc = subprocess.Popen([sys.executable, str(REPO / "train_2511.py"), *args], cwd=REPO, text=True,
                            env={**env, "DIFFSYNTH_EDIT_CACHE_TEST_PAUSE": "2"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 2 or proc.poll() is not None,
                    "two written samples")
        assert proc.poll() is None, proc.communicate()
        workers = [p for p in _children(proc.pid) if _running(p)]
        folders = list(tmpdir.glob(f"{TEMP_PREFIX}-{proc.pid}-*"))
        assert len(workers) >= 2 and len(folders) == 1 and (folders[0] / "processor.pkl").is_file()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # the terminal's Ctrl-C: the parent and its workers
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _wait_until(lambda: not any(_running(p) for p in workers), "the workers to end", limit=30)
    if sig != signal.SIGKILL:
        lines = error_lines(err)
        assert proc.returncode == 128 + sig and len(lines) == 1 and f"stopped by {sig.name}" in lines[0], out + err
        assert "Traceback" not in err and not folders[0].exists()
        from diffsynth_edit.cache import open_cache

        assert len(open_cache(cache, allow_incomplete=True)) >= 2  # the manifest lists what was written
    else:
        assert proc.returncode == -signal.SIGKILL and folders[0].exists()
    assert len(sample_files(cache)) >= 2

    r = run_sub(args, env)  # process workers again: the new pool removes the killed run's folder
    assert r.returncode == 0 and "failed 0" in r.stdout, r.stdout + r.stderr
    assert not folders[0].exists() and not list(tmpdir.glob(f"{TEMP_PREFIX}-*"))
    assert len(sample_files(cache)) == 6
    r = run_sub(["verify", "--cache-dir", str(cache)], env)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_cache_folder_is_one_line_and_resumable(tiny_root, tmp_path, small_fs, fault):
    """The cache folder fills up (or turns read-only) part-way: one error line naming the file and the reason, exit
    2, no traceback, no temporary file; with the fault gone, the same command finishes and `verify` passes."""
    dataset = simple_dataset(tmp_path / "data", n=6)
    cache = small_fs.path / "cache"
    env = sub_env()
    args = ["cache", *cache_args(dataset, cache, tiny_root, "--batch-size", 1, "--num-workers", 1, "--limit", 2,
                                 "--progress", "false")]
    r = run_sub(args, env)
    assert r.returncode == 0, r.stdout + r.stderr
    entry = max(p.stat().st_size for p in (cache / "samples").glob("*.safetensors"))
    args.remove("--limit")
    args.remove("2")
    r = run_under_fault(small_fs, fault, lambda: run_sub(args, env),
                        leave=entry + entry // 2)  # room for about one more entry, not four
    assert_one_write_error(r, fault, cache)
    small_fs.unfill()
    r = run_sub(args, env)
    assert r.returncode == 0 and "failed 0" in r.stdout, r.stdout + r.stderr
    assert len(sample_files(cache)) == 6
    r = run_sub(["verify", "--cache-dir", str(cache)], env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cleanup_on_a_read_only_cache_folder_is_the_runs_write_error(small_fs):
    """The end-of-run cleanup (leftover temporary files, pruned samples) on a folder that refuses deletion raises the
    run's one-line write error naming the file, not an OSError traceback."""
    from diffsynth_edit.cache.encode import _cleanup
    from diffsynth_edit.output_errors import OutputWriteError

    cache = small_fs.path / "cache"
    (cache / "samples").mkdir(parents=True)
    leftover = cache / "samples" / ".half-written.safetensors.tmp"
    leftover.write_bytes(b"x")
    small_fs.read_only()
    try:
        with pytest.raises(OutputWriteError) as err:
            _cleanup(cache, expected=set(), prune=True)
    finally:
        small_fs.writable()
    assert str(err.value) == f"cannot write {leftover} (read-only file system)"
    assert leftover.exists()
