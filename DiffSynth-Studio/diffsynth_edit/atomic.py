"""Atomic file writes: write to a temporary file beside the target, then rename over it.

Readers see either the old file or the complete new one, never a half-written file; an exception (or Ctrl-C)
while writing removes the temporary file and leaves the previous version untouched. Temporary files are named
`.<final name>.<random>.tmp` in the target's folder (same file system, so `os.replace` is atomic).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


# Temporary files of this process's atomic writes not yet renamed or removed. A signal can interrupt the cleanup in
# `atomic_path` itself (SIGTERM raising `Terminated` just as a failed write unwinds); whoever catches it then calls
# `remove_unfinished_temp_files`. Cleared in a forked child: the parent's writes are the parent's to finish.
_UNFINISHED: set[str] = set()
os.register_at_fork(after_in_child=_UNFINISHED.clear)


def _create_temp_file(final: Path) -> Path:
    """An empty new file `.<final name>.<random>.tmp` beside `final`, registered before it exists, so that no
    interruption leaves it unregistered."""
    for _ in range(100):
        tmp = str(final.parent / f".{final.name}.{secrets.token_hex(5)}{TMP_SUFFIX}")
        _UNFINISHED.add(tmp)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            _UNFINISHED.discard(tmp)
            continue
        except OSError:  # not created (read-only, no such folder ...)
            _UNFINISHED.discard(tmp)
            raise
        return Path(tmp)
    raise FileExistsError(f"no free temporary name beside {final}")


_TEMP_NAME = re.compile(r"\.(?P<final>.+)\.[0-9a-f]{10}" + re.escape(TMP_SUFFIX))


def final_name_of_temp(name: str) -> str | None:
    """The name of the file an `atomic_path` temporary file named `name` was to become; None when it is not one."""
    m = _TEMP_NAME.fullmatch(name)
    return m["final"] if m else None


def remove_unfinished_temp_files() -> list[Path]:
    """Remove the temporary files of this process's atomic writes that an interruption left behind (call where a
    `Terminated` or other fatal exception is caught, before exiting). Returns the files removed."""
    removed = []
    for tmp in sorted(_UNFINISHED):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
            removed.append(Path(tmp))
        _UNFINISHED.discard(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temp path in the same folder; on success it replaces `final`, on error it is removed.

    The temp file exists (empty) when the block starts; writers may overwrite or replace it. The final file gets
    the usual permissions (0666 minus the umask), not mkstemp's 0600.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp_file(final)
    try:
        yield tmp_path
        with contextlib.suppress(OSError):
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, final)
        _UNFINISHED.discard(str(tmp_path))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        _UNFINISHED.discard(str(tmp_path))  # not in a `finally`: an interrupted unlink must leave it registered
        raise


def _write_file(path: Path, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(final: Path | str, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `final` atomically (fsync before the rename unless `fsync=False`)."""
    with atomic_path(final) as tmp:
        _write_file(tmp, data, fsync)


def atomic_write_text(final: Path | str, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(final, text.encode("utf-8"), fsync=fsync)


def json_text(obj: Any, indent: int | None = 2) -> str:
    """The JSON text the atomic writers produce (UTF-8, non-ASCII kept, trailing newline)."""
    return json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"


def atomic_write_json(final: Path | str, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(final, json_text(obj, indent))


def atomic_write_if_changed(final: Path | str, data: bytes | str, fsync: bool = True) -> bool:
    """Atomically write `data` unless `final` already holds exactly these bytes; True when written.

    Re-runs that produce identical output leave the file (and its mtime) alone.
    """
    data = data.encode("utf-8") if isinstance(data, str) else data
    if _holds(Path(final), data):
        return False
    atomic_write_bytes(final, data, fsync=fsync)
    return True


def atomic_write_all_if_changed(files: list[tuple[Path, bytes | str]]) -> list[Path]:
    """Write every file whose content changed, all or none: each goes to a temporary file first, and the renames
    happen only once every temporary file is complete (and fsynced). A failed write raises its OSError, with
    `filename` set to the final file it was writing, and leaves every previous file as it was. Returns the files
    written."""
    changed = [(Path(path), data.encode("utf-8") if isinstance(data, str) else data) for path, data in files]
    changed = [(path, data) for path, data in changed if not _holds(path, data)]
    with contextlib.ExitStack() as stack:
        for path, data in changed:
            try:
                _write_file(stack.enter_context(atomic_path(path)), data, fsync=True)
            except OSError as e:
                e.filename = str(path)
                raise
    return [path for path, _ in changed]


def _holds(path: Path, data: bytes) -> bool:
    """`path` exists and holds exactly `data`."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except (FileNotFoundError, NotADirectoryError):
        return False


def kill_point(env: str, stage: str, count: int) -> None:
    """Crash tests: SIGKILL this process when environment variable `env` is "<stage>:<count>" (no-op otherwise)."""
    spec = os.environ.get(env)
    if spec:
        want, _, n = spec.partition(":")
        if want == stage and int(n) == count:
            os.kill(os.getpid(), signal.SIGKILL)


def atomic_save_safetensors(final: Path | str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file` through `atomic_path`; a failed write (full disk, read-only folder) is an OSError
    naming `final` (safetensors reports it as its own error type without the file)."""
    import errno
    import re

    from safetensors.torch import save_file

    final = Path(final)
    with atomic_path(final) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as e:
            if isinstance(e, OSError) or type(e).__name__ != "SafetensorError":
                raise
            m = re.search(r"os error (\d+)|code: (\d+)", str(e))
            code = int(m.group(1) or m.group(2)) if m else errno.EIO
            raise OSError(code, os.strerror(code), str(final)) from None
