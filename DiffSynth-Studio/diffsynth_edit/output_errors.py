"""A failed write to a run's output (full disk, read-only or unwritable folder, quota) is the run's error, not the
sample's: the builder and the cache stop with one line naming the file and keep what was already written."""
from __future__ import annotations

import errno
from pathlib import Path


def write_failure_reason(e: OSError) -> str:
    """A short reason for a failed write: 'no space left on the device', 'read-only file system', ..."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno == errno.EROFS:
        return "read-only file system"
    return (e.strerror or str(e) or type(e).__name__).lower()


class OutputWriteError(Exception):
    """Writing `path` failed; `reason` says why (picklable: it crosses worker processes)."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = str(path), reason

    @classmethod
    def from_os_error(cls, e: OSError, path: Path | str) -> "OutputWriteError":
        """The final file's name, not the temporary file the atomic writer was writing."""
        return cls(str(path), write_failure_reason(e))

    def __str__(self) -> str:
        return f"cannot write {self.path} ({self.reason})"
