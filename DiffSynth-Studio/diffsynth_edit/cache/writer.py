"""Sample files of the cache: their manifest record and the background writer (atomic, optional fsync)."""
from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from ..atomic import atomic_path, kill_point
from ..output_errors import OutputWriteError
from .manifest import FORMAT, CacheSettings
from .samples import _Item
from .store import NEGA_TAIL, edit_keys

# Test hook: "after:N" kills the process (SIGKILL) after the N-th written entry, "during:N" while the N-th entry's
# temporary file is complete but not yet renamed. LOG_ENV: append "<rank> <id>" per written entry to that file.
KILL_ENV = "DIFFSYNTH_EDIT_CACHE_TEST_KILL"
LOG_ENV = "DIFFSYNTH_EDIT_CACHE_TEST_LOG"


def entry_record(item: _Item, shapes: dict[str, list[int]], nbytes: int) -> dict[str, Any]:
    """Manifest record of one sample from its tensor shapes."""
    _, h, w = shapes["input_latents"]
    _, sh, sw = shapes["sub_input_latents"]
    ek = edit_keys(shapes)
    return {"file": item.file, "hash": item.hash, "index": item.index, "size": [h * 8, w * 8],
            "sub_size": [sh * 8, sw * 8], "num_edit": len(ek),
            "edit_sizes": [[shapes[k][1] * 8, shapes[k][2] * 8] for k in ek],
            "prompt_len": shapes["prompt_emb"][0], "nega_len": shapes["nega_prompt_emb_mask"][0],
            "nega_tail_len": shapes[NEGA_TAIL][0], "bytes": nbytes}


def _kill_hook(stage: str, count: int) -> None:
    kill_point(KILL_ENV, stage, count)


class _Writer:
    """Writes sample files atomically in a background thread (serialisation + fsync overlap the next encode).

    A failed file write (full disk, read-only folder) is the run's error, not the sample's: the first one is kept in
    `failed_write`, later samples are not written, and `submit`/`check` raise it (`OutputWriteError`)."""

    def __init__(self, cache_dir: Path, settings: CacheSettings,
                 on_done: Callable[[_Item, dict | None, str | None], None], rank: int = 0, fsync: bool = True):
        self.cache_dir, self.settings, self.on_done, self.rank = cache_dir, settings, on_done, rank
        self.fsync = fsync
        self.times = collections.Counter()  # write.serialise / write.file / write.backpressure seconds
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self.pending: collections.deque[Future] = collections.deque()
        self.count = 0
        self.lock = threading.Lock()
        self.failed_write: OutputWriteError | None = None

    def check(self) -> None:
        if self.failed_write is not None:
            raise self.failed_write

    def submit(self, item: _Item, tensors: dict[str, torch.Tensor]) -> None:
        self.check()
        t0 = time.perf_counter()
        while len(self.pending) >= 4:
            self.pending.popleft().result()
        self.times["write.backpressure"] += time.perf_counter() - t0
        self.pending.append(self.pool.submit(self._write, item, tensors))

    def _write(self, item: _Item, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        if self.failed_write is not None:
            return
        try:
            meta = {"format": FORMAT, "id": item.id, "index": str(item.index), "prompt": item.prompt,
                    "edit_type": item.edit_type or "", "hash": item.hash or "", "variant": self.settings.variant,
                    "dtype": self.settings.dtype, "num_edit": str(len(edit_keys(tensors)))}
            t0 = time.perf_counter()
            data = save(tensors, metadata=meta)
            t1 = time.perf_counter()
            final = self.cache_dir / item.file
            with self.lock:
                self.count += 1
                n = self.count
            try:
                with atomic_path(final) as tmp:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        if self.fsync:
                            os.fsync(f.fileno())
                    _kill_hook("during", n)
            except OSError as e:
                self.failed_write = self.failed_write or OutputWriteError.from_os_error(e, final)
                return
            self.times["write.serialise"] += t1 - t0
            self.times["write.file"] += time.perf_counter() - t1
            if os.environ.get(LOG_ENV):
                with open(os.environ[LOG_ENV], "a") as f:
                    f.write(f"{self.rank} {item.id}\n")
            _kill_hook("after", n)
            shapes = {k: list(v.shape) for k, v in tensors.items()}
            try:
                self.on_done(item, entry_record(item, shapes, len(data)), None)
            except OutputWriteError as e:  # the incremental manifest could not be written: the run's error too
                self.failed_write = self.failed_write or e
        except Exception as e:  # anything else: report the sample, keep going
            self.on_done(item, None, f"cannot write {self.cache_dir / item.file}: {type(e).__name__}: {e}")

    def close(self) -> None:
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown(wait=True)
