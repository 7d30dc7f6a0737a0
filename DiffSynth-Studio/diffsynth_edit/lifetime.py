"""Process lifetime: worker processes that die with their parent, a parent that stops cleanly on SIGTERM, a long job
that stops where it can save on the first SIGTERM/SIGINT (`stop_requests`), temporary folders that a killed run
leaves behind removed by the next run, and a readable cause of a worker's death.

Linux: a worker asks the kernel for SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`). Elsewhere (and as a
second guard) a daemon thread polls the parent pid and exits the worker when the parent is gone.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from .atomic import remove_unfinished_temp_files

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None, poll_seconds: float = 1.0) -> None:
    """Call first thing in a worker process: it is killed (SIGKILL) when the process that started it dies, even
    by SIGKILL. `parent`: the pid the parent had (pass `os.getpid()` from the parent), so that a worker whose parent
    died while it was still starting exits at once. The parent-death signal is tied to the parent's *thread* that
    started the worker: start workers from the main thread.

    The worker also ignores SIGINT: a terminal's Ctrl-C reaches the whole process group, and the parent, which gets
    it too, decides how its workers stop (a traceback from each worker would bury the parent's one line)."""
    parent = os.getppid() if parent is None else parent
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # no libc / no prctl: the watchdog below still works
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def describe_exit(exitcode: int | None) -> str:
    """How a child process ended, for a message: 'killed by SIGKILL (likely out of memory)', 'exited with code 3'."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (likely out of memory: the kernel's OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"


# A process stopped by a signal it handled exits as the shell reports one killed by it: 128 + the signal number.
EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler's preemption); raised in the main thread so that `finally` blocks run.
    A BaseException, like KeyboardInterrupt, so that `except Exception` handlers do not swallow it."""

    exit_code = EXIT_CODES["SIGTERM"]


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (the previous handler comes back after).
    When it (or Ctrl-C's KeyboardInterrupt) leaves the block, the temporary files of atomic writes it interrupted are
    removed, also those whose own cleanup it cut short (`atomic.remove_unfinished_temp_files`). A no-op outside the
    main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: let the cleanup run
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except (Terminated, KeyboardInterrupt):
        remove_unfinished_temp_files()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequest:
    """What `stop_requests` hands out: `signal` is the name of the first stop signal received, None until then."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal or "", 1)


# A launcher (torchrun, `accelerate launch`) forwards the SIGTERM/SIGINT it gets to its workers, which got the same
# signal from the terminal or the scheduler already: a repeat this soon after the first is that echo, not a second
# request.
_ECHO_SECONDS = 2.0


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Within the block, the first SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C) is only recorded: the caller
    polls `request.requested` and stops where it can save. A second one, later than a launcher's echo of the first,
    stops at once (SIGINT: KeyboardInterrupt, SIGTERM: `Terminated`). The previous handlers come back after; a no-op
    outside the main thread."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    first_at = 0.0

    def handler(signum, frame):
        nonlocal first_at
        if request.signal is None:
            request.signal, first_at = signal.Signals(signum).name, time.monotonic()
            return
        if time.monotonic() - first_at < _ECHO_SECONDS:
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def owned_temp_dir(prefix: str) -> Path:
    """A new temporary folder `<tmp>/<prefix>-<pid>-<random>`; folders of this prefix whose pid is dead (a run
    killed before it could clean up) are removed first."""
    root = Path(tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"-(\d+)-")
    for p in root.glob(f"{prefix}-*"):
        m = pattern.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))
