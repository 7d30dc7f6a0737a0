"""The build's worker processes: one sample in flight per worker, so that a worker that dies (the OOM killer's usual
pick on a huge image) costs exactly that sample, which is reported (`worker_died`), and a fresh worker takes over.
(`multiprocessing.Pool` replaces a dead worker too but loses its task, and `imap_unordered` then waits forever.)

A worker that hits a failed output write (`OutputWriteError`) sends it back; the pool stops and the builder raises
it: a full disk is the run's error, not the sample's.

No temporary file of an output outlives its worker: a worker stopped by SIGTERM removes its own (`atomic_path`, and
`sigterm_raises` for a cleanup the signal cut short); those of a worker that died by SIGKILL are removed
by the parent, which knows the sample it was building.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Callable, Iterator

from ..atomic import TMP_SUFFIX, final_name_of_temp
from ..lifetime import Terminated, describe_exit, die_with_parent, sigterm_raises
from ..output_errors import OutputWriteError
from .build_config import BuildSettings
from .build_sample import is_output_of, process_sample
from .records import SampleResult, SampleSpec, _err

# Test hook (crash tests only): a worker about to build the sample whose id is this variable's value SIGKILLs itself,
# as the OOM killer would.
KILL_ENV = "DIFFSYNTH_EDIT_BUILD_TEST_KILL"
# Test hook (stop tests only): a worker about to build the sample whose id is this variable's value waits there.
PAUSE_ENV = "DIFFSYNTH_EDIT_BUILD_TEST_PAUSE"


def _worker_main(conn: Connection, st: BuildSettings, parent_pid: int) -> None:
    """Build the samples the parent sends. When the pool stops early (another worker's write failed), the parent's
    SIGTERM raises here, so a sample being written removes its temporary files (`atomic_path`) before the exit, also
    when the signal cut short the removal itself (a write failing on the full disk as the pool stops)."""
    die_with_parent(parent_pid)
    try:
        with sigterm_raises():
            _serve(conn, st)
    except Terminated:
        os._exit(Terminated.exit_code)


def _serve(conn: Connection, st: BuildSettings) -> None:
    kill_id, pause_id = os.environ.get(KILL_ENV), os.environ.get(PAUSE_ENV)
    while True:
        try:
            spec = conn.recv()
        except EOFError:
            return
        if spec is None:
            return
        if kill_id and spec.id == kill_id:
            os.kill(os.getpid(), signal.SIGKILL)
        if pause_id and spec.id == pause_id:
            time.sleep(600)
        try:
            conn.send(process_sample(spec, st))
        except OutputWriteError as e:
            conn.send(e)


class _Worker:
    def __init__(self, ctx, st: BuildSettings):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, st, os.getpid()), daemon=True,
                                name="dataset-build-worker")
        self.proc.start()
        child.close()
        self.task: SampleSpec | None = None

    def stop(self, grace: float = 0.0) -> None:
        """Wait up to `grace` seconds for the process to end by itself, then terminate it (kill after 5 s)."""
        self.proc.join(grace)
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _lost(spec: SampleSpec, exitcode: int | None) -> SampleResult:
    detail = (f"the worker process building this sample {describe_exit(exitcode)}; the sample was not built "
              f"(re-run to retry it; fewer --workers or a lower --max-input-pixels need less memory)")
    return SampleResult(spec.id, "error", problems=[_err("worker_died", spec.source, spec.id, detail)])


def _remove_temp_files_of(spec: SampleSpec, files_dir: Path) -> None:
    """Remove the temporary files of `spec`'s outputs that its worker left when it died (SIGKILL: the OOM killer, or
    the pool's kill of a worker that did not stop) — call once that worker is gone."""
    if not files_dir.is_dir():
        return
    for folder in files_dir.iterdir():
        if folder.is_dir():
            for tmp in folder.glob(".*" + TMP_SUFFIX):
                final = final_name_of_temp(tmp.name)
                if final is not None and is_output_of(spec.id, folder.name, final):
                    tmp.unlink(missing_ok=True)


def run_in_workers(specs: list[SampleSpec], st: BuildSettings, n: int,
                   on_result: Callable[[SampleResult], None]) -> None:
    """Process `specs` in `n` worker processes, calling `on_result` for each (in completion order). Raises the
    first `OutputWriteError` a worker reports, after stopping every worker."""
    ctx = mp.get_context()
    todo: Iterator[SampleSpec] = iter(specs)
    workers = [_Worker(ctx, st) for _ in range(n)]
    finished = False
    try:
        for w in workers:
            _give(w, todo)
        while any(w.task is not None for w in workers):
            busy = [w for w in workers if w.task is not None]
            ready = set(wait([w.conn for w in busy] + [w.proc.sentinel for w in busy]))
            for i, w in enumerate(workers):
                if w.task is None or not (w.conn in ready or w.proc.sentinel in ready):
                    continue
                got = _receive(w)
                if isinstance(got, OutputWriteError):
                    raise got
                if got is None:  # the worker died with this task
                    if not w.proc.is_alive():
                        _remove_temp_files_of(w.task, st.files_dir)
                    on_result(_lost(w.task, w.proc.exitcode))
                else:
                    on_result(got)
                w.task = None
                if not w.proc.is_alive():
                    w.stop()
                    workers[i] = w = _Worker(ctx, st)
                _give(w, todo)
        finished = True
    finally:
        for w in workers:
            if w.task is None and w.proc.is_alive():
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        for w in workers:
            w.stop(grace=5.0 if finished else 0.0)
        for w in workers:
            if w.task is not None:  # stopped while building it
                _remove_temp_files_of(w.task, st.files_dir)


def _give(w: _Worker, todo: Iterator[SampleSpec]) -> None:
    spec = next(todo, None)
    if spec is not None:
        w.conn.send(spec)
        w.task = spec


def _receive(w: _Worker) -> SampleResult | OutputWriteError | None:
    """The worker's answer, or None when it died before sending one."""
    try:
        if w.conn.poll():
            return w.conn.recv()
    except Exception:  # EOF or a message cut short by the death
        pass
    w.proc.join(5)  # the sentinel fired (or the pipe broke): the process is gone
    return None
