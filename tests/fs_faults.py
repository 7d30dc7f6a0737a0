"""A small file system that can fill up or turn read-only, for the disk-fault tests (`small_fs` fixture): a tmpfs
mounted as root; the tests that need it are skipped (with the reason) where mounting is not allowed."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest


class SmallFs:
    def __init__(self, path: Path):
        self.path = path
        self.filler = path / "filler"

    def fill(self, leave: int) -> None:
        """Fill the file system but for about `leave` bytes."""
        with open(self.filler, "wb") as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        os.truncate(self.filler, max(0, self.filler.stat().st_size - leave))

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def writable(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)


@pytest.fixture()
def small_fs(tmp_path):
    """An 8 MiB tmpfs under tmp_path (unmounted after the test)."""
    path = tmp_path / "small_fs"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root in a container "
                    f"that allows mounts")
    try:
        yield SmallFs(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def error_lines(text: str) -> list[str]:
    """The `error: ...` lines of a run's output (tqdm's bar may share a line with one)."""
    import re

    return re.findall(r"error: [^\r\n]*", text)


def tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


def run_under_fault(small_fs: SmallFs, fault: str, run: Callable[[], subprocess.CompletedProcess],
                    leave: int) -> subprocess.CompletedProcess:
    """`run()` with the file system full (about `leave` bytes free) or read-only; read-only is undone after."""
    if fault == "full":
        small_fs.fill(leave=leave)
    else:
        small_fs.read_only()
    try:
        return run()
    finally:
        if fault == "read-only":
            small_fs.writable()


def assert_one_write_error(r: subprocess.CompletedProcess, fault: str, folder: Path) -> None:
    """Exit 2, one `error: cannot write FOLDER/... (reason)` line, no traceback, no temporary file left."""
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stdout + r.stderr
    reason = "no space left on the device" if fault == "full" else "read-only file system"
    assert lines[0].startswith(f"error: cannot write {folder}/") and f"({reason})" in lines[0], lines[0]
    assert "Traceback" not in r.stderr, r.stderr
    assert not tmp_files(folder), (tmp_files(folder), r.stderr)
