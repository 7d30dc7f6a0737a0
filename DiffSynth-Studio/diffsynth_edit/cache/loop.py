"""Step 2 of a cache run, this rank's share: readers prepare samples ahead, the device encodes them in batches, the
writer thread stores them; seconds per stage are recorded (`CacheSummary.stages`)."""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..output_errors import OutputWriteError
from .config import TORCH_DTYPES, CacheConfig
from .dist import _Dist
from .encoder import SampleEncoder, _encode_isolated
from .manifest import CacheSettings
from .samples import SampleError, _Item, _Prepared
from .summary import Failure
from .workers import Readers
from .writer import _Writer

# Test hook (signal tests only): the device loop sleeps (600 s, until a signal ends it) once this many samples went
# to the writer, so that a test can stop the run at a known point.
PAUSE_ENV = "DIFFSYNTH_EDIT_CACHE_TEST_PAUSE"


@dataclass
class ShareResult:
    new: dict[int, dict] = field(default_factory=dict)  # index -> record of each file written
    failures: list[Failure] = field(default_factory=list)
    stages: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0  # encoding time, after loading


class _Outcomes:
    """Collects each sample's outcome (from the loop and from the writer thread); on rank 0 `write_partial` gets the
    records so far every `every` seconds (the incremental manifest)."""

    def __init__(self, result: ShareResult, bar, every: float,
                 write_partial: Callable[[dict[int, dict]], None] | None):
        self.result, self.bar, self.every, self.write_partial = result, bar, every, write_partial
        self.lock = threading.Lock()
        self.last = time.monotonic()

    def __call__(self, item: _Item, rec: dict | None, err: str | None) -> None:
        with self.lock:
            if rec is not None:
                self.result.new[item.index] = rec
            else:
                self.result.failures.append(Failure(item.id, item.index, err or "unknown error"))
        self.bar.update(1)
        if self.write_partial is not None and time.monotonic() - self.last > self.every:
            self.flush()

    def flush(self) -> None:
        """Write the incremental manifest now (rank 0)."""
        if self.write_partial is not None:
            self.last = time.monotonic()
            with self.lock:
                recs = dict(self.result.new)
            self.write_partial(recs)


class _Feed:
    """Keeps up to `depth` samples submitted to the readers and hands out prepared batches."""

    def __init__(self, readers: Readers, todo: Iterator[_Item], depth: int, stages: collections.Counter):
        self.readers, self.todo, self.depth, self.stages = readers, todo, depth, stages
        self.queue: collections.deque[tuple[_Item, Future]] = collections.deque()

    def fill(self) -> None:
        t0 = time.perf_counter()
        while len(self.queue) < self.depth:
            it = next(self.todo, None)
            if it is None:
                break
            self.queue.append((it, self.readers.submit(it)))
        self.stages["submit to readers"] += time.perf_counter() - t0

    def next_batch(self, batch_size: int, on_done: Callable) -> list[_Prepared]:
        """Up to `batch_size` prepared samples; a sample that cannot be prepared is reported and left out."""
        batch: list[_Prepared] = []
        while self.queue and len(batch) < batch_size:
            it, fut = self.queue.popleft()
            t0 = time.perf_counter()
            try:
                p = fut.result()
                self.stages["wait for prepared (device idle)"] += time.perf_counter() - t0
                self.stages.update(p.timings)
                batch.append(p)
            except SampleError as e:
                on_done(it, None, str(e))
            except Exception as e:
                on_done(it, None, f"cannot prepare: {type(e).__name__}: {e}")
            self.fill()
        return batch


def encode_share(cfg: CacheConfig, pipe, mine: list[_Item], cache_dir: Path, settings: CacheSettings, dist: _Dist,
                 write_partial: Callable[[dict[int, dict]], None], log: Callable[[str], None]) -> ShareResult:
    """Encode and write the samples `mine`; every outcome is in the result (nothing raises for one bad sample)."""
    from tqdm.auto import tqdm

    result = ShareResult()
    stages = result.stages
    on_cuda = torch.device(pipe.device).type == "cuda"
    if on_cuda and cfg.cudnn_benchmark:
        # tunes once per input shape: pays off only where few shapes recur (sub crops vary per sample)
        torch.backends.cudnn.benchmark = True
    t_enc = time.perf_counter()  # after loading: the rate is the encoding rate
    bar = tqdm(total=len(mine), unit="sample", desc=f"cache {cache_dir.name}" + (
        f" (rank 0 of {dist.world})" if dist.world > 1 else ""), disable=not (cfg.progress and dist.main),
        dynamic_ncols=True)
    on_done = _Outcomes(result, bar, cfg.manifest_every, write_partial if dist.main else None)
    encoder = SampleEncoder(pipe, TORCH_DTYPES[cfg.dtype], cfg.batch_size, cfg.compile_vae, log)
    writer = _Writer(cache_dir, settings, on_done, dist.rank, fsync=cfg.fsync)
    readers = Readers(cfg, pipe, on_cuda)
    feed = _Feed(readers, iter(mine), cfg.batch_size + 2 * cfg.num_workers, stages)
    stages["start (encoder, writer, readers)"] = time.perf_counter() - t_enc
    t_loop = time.perf_counter()
    pause_at, submitted = int(os.environ.get(PAUSE_ENV) or 0), 0
    try:
        feed.fill()
        while feed.queue:
            batch = feed.next_batch(cfg.batch_size, on_done)
            if not batch:
                continue
            t0 = time.perf_counter()
            encoded = _encode_isolated(encoder, batch, on_done)
            stages["encode (device + copy back)"] += time.perf_counter() - t0
            for prepared, tensors in encoded:
                writer.submit(prepared.item, tensors)
                submitted += 1
                if submitted == pause_at:
                    time.sleep(600)
        accounted = ("submit to readers", "wait for prepared (device idle)", "encode (device + copy back)")
        stages["device loop, other"] = (time.perf_counter() - t_loop - sum(stages[k] for k in accounted)
                                        - writer.times["write.backpressure"])
    finally:
        readers.close([fut for _, fut in feed.queue])
        encoder.close()
        t0 = time.perf_counter()
        writer.close()
        stages["write.drain at end"] += time.perf_counter() - t0
        bar.close()
        if sys.exc_info()[0] is not None or writer.failed_write is not None:
            with contextlib.suppress(OSError, OutputWriteError):  # stopped early: the manifest lists every file written
                on_done.flush()
    writer.check()
    result.seconds = time.perf_counter() - t_enc
    stages.update(writer.times)
    if readers.use_procs:
        result.stages = collections.Counter({(k + " (workers)" if k.startswith("prep.") else k): v
                                             for k, v in stages.items()})
    return result
