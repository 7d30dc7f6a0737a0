"""Where samples are prepared while the device encodes: worker processes (a spawned pool kept for the process's
later runs) or threads.

Worker processes die with the cache run (`lifetime.die_with_parent`: a parent-death signal on Linux, a watchdog
thread elsewhere), also when the run is SIGKILLed. The pickled processor they start from lies in a temporary folder
`<tmp>/diffsynth-edit-cache-workers-<pid>-<random>`, removed when the pool shuts down (normal exit, SIGTERM) or, after
a SIGKILL, by the next run that starts a pool."""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .config import CacheConfig
from .samples import _Item, _Prepared, prepare_sample


def _use_processes(cfg: CacheConfig, device) -> bool:
    """Image preparation in worker processes: asked for, or `auto` on CUDA."""
    return cfg.workers == "process" or (cfg.workers == "auto" and torch.device(device).type == "cuda")


_WORKER_PIPE: Any = None


def _worker_init(processor_file: str, parent_pid: int | None = None) -> None:
    """Process-pool initializer: a stand-in pipeline holding only the processor (all `prompt_inputs` needs), read
    from the parent's pickle file; the preparation code is imported here so a worker is ready before its first
    sample."""
    global _WORKER_PIPE
    import pickle
    import types

    from ..lifetime import die_with_parent

    die_with_parent(parent_pid)  # first: the imports below take seconds
    from .. import encoding  # noqa: F401  (imported now, not on the worker's first sample)
    from ..editing import editor  # noqa: F401

    torch.set_num_threads(1)
    with open(processor_file, "rb") as f:
        _WORKER_PIPE = types.SimpleNamespace(processor=pickle.load(f))


_POOL: tuple[Any, Any, Path] | None = None  # (key, ProcessPoolExecutor, temp folder), kept between runs of a process
TEMP_PREFIX = "diffsynth-edit-cache-workers"


def _shutdown_pool(kill: bool = False) -> None:
    """Stop the kept pool and remove its temporary folder; `kill`: terminate the workers at once (SIGTERM of the
    run) instead of letting them finish their samples."""
    global _POOL
    if _POOL is not None:
        import shutil

        pool, folder = _POOL[1], _POOL[2]
        _POOL = None
        try:
            if kill:
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _process_pool(num_workers: int, processor):
    """A spawned worker pool holding `processor`; reused by later runs in this process, shut down at exit.

    The processor travels as a file, not as an initializer argument: spawn writes the arguments into a pipe that the
    child reads only after importing the parent's main module, so a processor of several MB blocks the parent for
    each worker's start-up, one worker after the other (12.8 s for 3 workers, H100 machine), and the executor starts
    the workers it lacks inside the first submits of a run. With the file every worker starts at once."""
    global _POOL
    import atexit
    import multiprocessing as mp
    import pickle
    from concurrent.futures import ProcessPoolExecutor

    from ..lifetime import owned_temp_dir

    key = (num_workers, id(processor))
    if _POOL is not None and _POOL[0] == key:
        return _POOL[1]
    if _POOL is None:
        atexit.register(_shutdown_pool)
    _shutdown_pool()
    folder = owned_temp_dir(TEMP_PREFIX)  # also removes the folders of runs that were killed
    with open(folder / "processor.pkl", "wb") as f:
        pickle.dump(processor, f)
    # spawn: the parent holds CUDA state; the workers need only the processor
    pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(str(folder / "processor.pkl"), os.getpid()))
    _POOL = (key, pool, folder)
    for _ in range(num_workers):  # start every worker now (the pool would spawn them one per submit, later)
        pool.submit(os.getpid)
    return pool


def _prepare_in_worker(item: _Item, max_pixels: int) -> _Prepared:
    """`prepare_sample` in a worker process. The target and crop images travel as their uint8 tensors only."""
    p = prepare_sample(item, max_pixels, _WORKER_PIPE)
    p.target = p.crop = None  # the encoder reads their `pixels`
    return p


class Readers:
    """Prepares samples ahead of the device loop: in the kept worker-process pool or in threads."""

    def __init__(self, cfg: CacheConfig, pipe, on_cuda: bool):
        self.use_procs = _use_processes(cfg, pipe.device)
        self.max_pixels, self.pipe, self.pin = cfg.max_pixels, pipe, on_cuda
        if self.use_procs:
            self.pool = _process_pool(cfg.num_workers, pipe.processor)
        else:
            self.pool = ThreadPoolExecutor(max_workers=cfg.num_workers, thread_name_prefix="cache-reader")

    def submit(self, item: _Item) -> Future:
        if self.use_procs:
            return self.pool.submit(_prepare_in_worker, item, self.max_pixels)
        return self.pool.submit(prepare_sample, item, self.max_pixels, self.pipe, self.pin)

    def close(self, queued: list[Future]) -> None:
        """Threads are shut down; the kept process pool is left with no work of this run (`queued`: not taken)."""
        if not self.use_procs:
            self.pool.shutdown(wait=True, cancel_futures=True)
            return
        for fut in queued:
            fut.cancel()
        for fut in queued:
            if not fut.cancelled():
                try:
                    fut.result()
                except Exception:
                    pass
