"""What a training run does when it cannot continue: `TrainingError`, the crash-test hook, and a full or read-only
output folder turned into one line naming the file, with the last good state kept.

Every write of the trainer is atomic (checkpoints through `atomic.atomic_path`, the resume state as a new folder
swapped in by renames), so a failed write leaves the previous files whole; this module turns the failure into the
run's error message and removes the half-written state folder, whose space the next attempt needs.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from pathlib import Path

KILL_ENV = "DIFFSYNTH_EDIT_TRAIN_TEST_KILL"  # crash tests: "step:<n>" or "state-swap:<n>" (atomic.kill_point)
SIGNAL_ENV = "DIFFSYNTH_EDIT_TRAIN_TEST_SIGNAL"  # stop tests: "<SIGTERM|SIGINT>:<n>[:<rank>]"


def signal_point(micro_batches: int) -> None:
    """Stop tests: send this process the signal `SIGNAL_ENV` names once `micro_batches` (counted from 1 in this
    process) reaches its count; with a rank, only in that process of a multi-process run (no-op otherwise)."""
    spec = os.environ.get(SIGNAL_ENV)
    if spec:
        name, n, *rank = spec.split(":")
        if int(n) == micro_batches and (not rank or rank[0] == os.environ.get("RANK", "0")):
            os.kill(os.getpid(), getattr(signal, name))


class TrainingStopped(Exception):
    """A stop signal arrived and the run saved its resume state: `exit_code` is the signal's (143, 130)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, bad resume state …); nothing corrupt was written."""


def _io_reason(e: BaseException) -> tuple[str | None, str] | None:
    """(file, reason) when `e` is a failed read or write, else None."""
    if isinstance(e, OSError):
        if e.errno is None:  # the workspace's own "not found" errors (MissingWeightsError …) carry no errno
            return None
        reason = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            reason = "no space left on the device"
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            reason = f"{e.strerror.lower() if e.strerror else 'not writable'}"
        return (e.filename if isinstance(e.filename, str) else None), reason
    text = str(e)
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        SafetensorError = ()  # type: ignore[assignment]
    if isinstance(e, SafetensorError) or (isinstance(e, RuntimeError) and "PytorchStreamWriter" in text):
        low = text.lower()
        if "no space" in low or "os error 28" in low:
            return None, "no space left on the device"
        if "read-only" in low or "os error 30" in low:
            return None, "read-only file system"
        if "permission" in low or "os error 13" in low:
            return None, "permission denied"
        if "ioerror" in low or "os error" in low or "failed writing" in low:
            return None, text.splitlines()[0]
    return None


def last_good_state(run_dir: Path) -> tuple[Path, int] | None:
    """The resume state `--resume` would take (state/, else the newest complete leftover) and its step."""
    found = []
    for p in [run_dir / "state", *run_dir.glob(".state-*")]:
        try:
            found.append((p, int(json.loads((p / "trainer.json").read_text())["step"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if found and found[0][0].name == "state":
        return found[0]
    return max(found, key=lambda t: t[1]) if found else None


def remove_partial_states(run_dir: Path) -> None:
    """Half-written `.state-<n>.tmp` folders (no trainer.json, which is written last) go: they hold no state."""
    for p in run_dir.glob(".state-*.tmp"):
        if not (p / "trainer.json").is_file():
            shutil.rmtree(p, ignore_errors=True)


def output_write_error(e: BaseException, run_dir: Path, step: int) -> str | None:
    """The one-line message for an I/O failure `e` of the run writing to `run_dir` at `step`; None for other
    errors."""
    found = _io_reason(e)
    if found is None:
        return None
    filename, reason = found
    run_dir = Path(run_dir)
    remove_partial_states(run_dir)
    good = last_good_state(run_dir)
    kept = (f"the last good state ({good[0]}, step {good[1]}) is kept: fix the output folder and rerun with --resume"
            if good else "no resume state was saved yet: fix the output folder and rerun")
    if filename is not None and not Path(filename).resolve().is_relative_to(run_dir.resolve()):
        return f"I/O error on {filename} ({reason}) after step {step}; {kept}"
    return f"cannot write {filename or run_dir} ({reason}) after step {step}; {kept}"
