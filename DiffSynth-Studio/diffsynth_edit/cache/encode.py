"""Phase 1 of split training: encode a dataset into a verified, resumable cache.

Only the text encoder and the VAE are loaded (never the DiT). Images are prepared exactly like the editor prepares
an edit (`editor.to_rgb`, `editor.fit_image`, `editor.prepare_mask`, `geometry.mask_bbox`) and encoded by the
same arithmetic (`encoding.vae_encode_uint8` = `encoding.vae_encode`, `encoding.encode_prompt_pairs` = two per sample
`encoding.encode_prompt` calls, `encoding.white_latents`; all tested equal), so a cache entry equals what
`Editor.prepare` computes for the same sample.

Flow (every rank of an `accelerate launch` run does its stride share of each step):
  1. hash every sample's inputs + settings -> file name; a file that exists and is complete is skipped;
  2. the sorted list of pending samples is split by stride over the ranks (each sample encoded exactly once);
  3. images are read/resized in worker processes (threads on CPU), VAE-encoded in same-shape batches of
     `batch_size`, prompts encoded;
  4. each sample is written atomically (temp file + optional fsync + rename); rank 0 keeps an incremental manifest
     (`complete: false`) that only lists finished files;
  5. after a barrier rank 0 writes the final manifest (`complete: true`) and removes orphaned/temporary files.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from ..atomic import atomic_path, kill_point
from ..config import ModelPathOptions
from ..geometry import Box, binarize_mask, mask_bbox
from ..prompts import edit_prompt
from ..variants import VariantMismatchError, check_same_variant, get_variant
from .manifest import (FORMAT, MANIFEST_NAME, SAMPLE_SUFFIX, SAMPLES_DIR, CacheSettings, build_manifest,
                       encoder_identity, read_manifest, sample_hash, write_manifest)
from .store import EDIT_PREFIX, NEGA_PREFIX, NEGA_TAIL, edit_keys, quick_check, read_header

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Test hook: "after:N" kills the process (SIGKILL) after the N-th written entry, "during:N" while the N-th entry's
# temporary file is complete but not yet renamed. LOG_ENV: append "<rank> <id>" per written entry to that file.
KILL_ENV = "DIFFSYNTH_EDIT_CACHE_TEST_KILL"
LOG_ENV = "DIFFSYNTH_EDIT_CACHE_TEST_LOG"


class CacheRunError(RuntimeError):
    """The cache run cannot start (bad dataset, other variant, ...); the message says why."""


@dataclass
class CacheConfig(ModelPathOptions):
    dataset: Path | None = field(default=None, metadata={"help": "dataset JSON/JSONL (required)"})
    base_path: Path | None = field(default=None, metadata={"help": "folder the dataset's paths are relative to "
                                                                   "(default: the JSON's folder)"})
    cache_dir: Path = field(default=Path("data/cache"), metadata={"help": "output folder (one per dataset, variant "
                                                                         "and resolution policy)"})
    variant: str = field(default="2511", metadata={"help": "2511 or 2509 (recorded in the manifest)"})
    dit_path: Path | None = field(default=None, metadata={"help": "accepted for preset symmetry; the DiT is never "
                                                                  "loaded by the cache"})
    max_pixels: int = field(default=1024 * 1024, metadata={"help": "images are scaled down to at most this many "
                                                                   "pixels, sides multiples of 16"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cuda, cuda:N or cpu"})
    dtype: Literal["bf16", "fp16", "fp32"] = field(default="bf16", metadata={"help": "model and cache dtype"})
    batch_size: int = field(default=4, metadata={"help": "samples per device batch (one text-encoder call) and "
                                                          "images per VAE call (same-shape images only)"})
    limit: int | None = field(default=None, metadata={"help": "only the first N samples (no pruning)"})
    num_workers: int = field(default=4, metadata={"help": "workers reading/resizing images (and hashing threads)"})
    workers: Literal["auto", "process", "thread"] = field(default="auto", metadata={
        "help": "image preparation in worker processes (no GIL contention with the device loop) or threads; "
                "auto: processes on CUDA, threads on CPU"})
    fsync: bool = field(default=True, metadata={"help": "fsync each sample file before its rename (power-loss "
                                                        "safety; the rename alone already survives a killed run)"})
    cudnn_benchmark: bool = field(default=False, metadata={"help": "cudnn.benchmark for the VAE (re-tunes for "
                                                                   "every new sub-crop shape: off by default)"})
    compile_vae: bool = field(default=False, metadata={"help": "torch.compile the VAE encoder on CUDA (~2x faster "
                                                                "per image, but most new image or sub-crop sizes "
                                                                "compile again: only for datasets of few sizes; "
                                                                "falls back to eager with a message if compiling "
                                                                "fails)"})
    prune: bool = field(default=True, metadata={"help": "remove cache files no sample of this dataset maps to"})
    allow_failures: bool = field(default=False, metadata={"help": "exit 0 even when some samples failed"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})
    manifest_every: float = field(default=60.0, metadata={"help": "seconds between incremental manifest writes"})

    def validate(self) -> None:
        from ..config import ConfigError

        if self.dataset is None:
            raise ConfigError("`dataset` is required (a dataset JSON/JSONL)")
        try:
            get_variant(self.variant)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.variant = get_variant(self.variant).name
        if self.max_pixels < 256:
            raise ConfigError("`max_pixels` must be at least 256")
        if self.batch_size < 1:
            raise ConfigError("`batch_size` must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("`limit` must be at least 1")
        if self.num_workers < 1:
            raise ConfigError("`num_workers` must be at least 1")
        if self.workers not in ("auto", "process", "thread"):
            raise ConfigError(f"`workers` must be auto, process or thread, not {self.workers!r}")

    def sources(self):
        return self.model_sources(self.variant)


@dataclass
class Failure:
    id: str
    index: int
    reason: str

    def as_dict(self) -> dict:
        return {"id": self.id, "index": self.index, "reason": self.reason}


@dataclass
class CacheSummary:
    cache_dir: Path
    total: int = 0
    encoded: int = 0
    skipped: int = 0
    failed: list[Failure] = field(default_factory=list)
    orphans_removed: list[str] = field(default_factory=list)
    orphans_kept: list[str] = field(default_factory=list)
    bytes_on_disk: int = 0
    per_rank: list[int] = field(default_factory=list)  # entries encoded by each rank
    seconds: float = 0.0
    encode_seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (this rank; workers summed)

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        rate = self.encoded / self.encode_seconds if self.encode_seconds > 0 else 0.0
        lines = [f"cache {self.cache_dir}: {self.total - len(self.failed)}/{self.total} samples cached "
                 f"(encoded {self.encoded}, skipped {self.skipped} valid, failed {len(self.failed)}), "
                 f"{_human(self.bytes_on_disk)} on disk, {rate:.2f} samples/s encoding, {self.seconds:.1f} s total"]
        if self.stages:
            lines.append("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.stages.items()))
        if len(self.per_rank) > 1:
            lines.append(f"encoded per rank: {self.per_rank}")
        if self.failed:
            lines.append("failed samples (the others are cached):")
            lines += [f"  id {f.id} (index {f.index}): {f.reason}" for f in self.failed]
        if self.orphans_removed:
            lines.append(f"removed {len(self.orphans_removed)} stale file(s) no sample maps to any more")
        if self.orphans_kept:
            lines.append(f"{len(self.orphans_kept)} file(s) no (selected) sample maps to were kept "
                         f"(--limit or --prune false): " + ", ".join(self.orphans_kept[:5])
                         + (" ..." if len(self.orphans_kept) > 5 else ""))
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} TiB"


# ---- distribution --------------------------------------------------------------------------------------------------
class _Dist:
    """Rank/world/device of this process; `accelerate launch` (any backend) or a single process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1:
            from accelerate import PartialState

            cpu = (device.startswith("cpu") or not torch.cuda.is_available()
                   or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
            state = PartialState(cpu=cpu)
            self.rank, self.world = state.process_index, state.num_processes
            self.device = "cpu" if state.device.type == "cpu" else str(state.device)  # no "cpu:0" (DiskMap)
            self._state = state
        else:
            self.rank = 0
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = "cpu" if device.startswith("cpu") else device
            self._state = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def all_gather(self, obj: Any) -> list[Any]:
        if self._state is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# ---- dataset -------------------------------------------------------------------------------------------------------
@dataclass
class _Item:
    index: int
    id: str
    prompt: str
    edit_type: str | None
    image: Path
    edit_image: list[Path]
    back_mask: Path | None
    ref_gt_crop: Path | None
    hash: str | None = None

    @property
    def file(self) -> str:
        return f"{SAMPLES_DIR}/{self.hash}{SAMPLE_SUFFIX}"

    def input_files(self) -> list[tuple[str, Path]]:
        files = [("image", self.image)] + [(f"edit_image.{i}", p) for i, p in enumerate(self.edit_image)]
        if self.back_mask is not None:
            files.append(("back_mask", self.back_mask))
        if self.ref_gt_crop is not None:
            files.append(("ref_gt_crop", self.ref_gt_crop))
        return files


def load_items(cfg: CacheConfig) -> list[_Item]:
    from ..dataset.schema import load_dataset

    try:
        entries = load_dataset(cfg.dataset, base_path=cfg.base_path)
    except (OSError, ValueError) as e:
        raise CacheRunError(f"cannot read dataset {cfg.dataset}: {e}") from None
    if cfg.limit is not None:
        entries = entries[:cfg.limit]
    items, seen = [], set()
    for pos, e in enumerate(entries):
        index = int(getattr(e, "index", pos))
        sid = getattr(e, "id", None)
        sid = f"{index:06d}" if sid is None or str(sid) == "" else str(sid)
        if sid in seen:
            sid = f"{sid}#{index}"
        seen.add(sid)
        if not e.edit_image:
            raise CacheRunError(f"dataset {cfg.dataset}: sample {sid} has no edit_image (the source image)")
        items.append(_Item(index=index, id=sid, prompt=edit_prompt(str(e.prompt)), edit_type=getattr(e, "edit_type", None),
                           image=Path(e.image), edit_image=[Path(p) for p in e.edit_image],
                           back_mask=None if getattr(e, "back_mask", None) is None else Path(e.back_mask),
                           ref_gt_crop=None if getattr(e, "ref_gt_crop", None) is None else Path(e.ref_gt_crop)))
    return items


# ---- per-sample preparation (CPU, in threads) ----------------------------------------------------------------------
@dataclass
class _Prepared:
    item: _Item
    target: Image.Image
    source: Image.Image
    refs: list[Image.Image]
    mask: Image.Image | None
    box: Box
    crop: Image.Image
    # filled in the reader thread when a pipeline is given (else computed by the encoder):
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)  # VAE inputs, key -> [3, H, W] uint8
    prompt_inputs: Any = None  # encoding.prompt_inputs(pipe, [prompt, ""], images)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per preparation stage

    def vae_jobs(self) -> list[tuple[str, Image.Image]]:
        """(cache key, image) of every VAE input of this sample."""
        return [("input_latents", self.target), (EDIT_PREFIX + "0", self.source),
                *((f"{EDIT_PREFIX}{i}", r) for i, r in enumerate(self.refs, start=1)), (SUB_KEY, self.crop)]

    def vae_inputs(self, sub: bool) -> list[tuple[str, torch.Tensor]]:
        """(cache key, uint8 [3, H, W]) of the sub crop (`sub`) or of every other VAE input: the reader's tensor,
        else converted here."""
        from ..encoding import image_to_uint8

        return [(key, image_to_uint8(im) if self.pixels.get(key) is None else self.pixels[key])
                for key, im in self.vae_jobs() if (key == SUB_KEY) == sub]


class SampleError(Exception):
    """One sample cannot be cached; the message names the file and the reason."""


def _open(path: Path, role: str) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise SampleError(f"{role} {path}: file not found") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise SampleError(f"{role} {path}: cannot read image ({type(e).__name__}: {e})") from None


def prepare_sample(item: _Item, max_pixels: int, pipe=None, pin: bool = False) -> _Prepared:
    """Resize and mask exactly as `Editor.prepare` does; derive the ref_gt crop. With `pipe`, also the CPU side of
    the encoding (uint8 pixel tensors, page-locked with `pin`; the processor's token ids and pixel values), so the
    reader threads do it while the device encodes the previous batch."""
    t0 = time.perf_counter()
    prepared = _prepare_images(item, max_pixels)
    t1 = time.perf_counter()
    prepared.timings["prep.images"] = t1 - t0
    if pipe is not None:
        from ..encoding import image_to_uint8, prompt_inputs

        prepared.pixels = {k: image_to_uint8(im, pin) for k, im in prepared.vae_jobs()}
        t2 = time.perf_counter()
        prepared.prompt_inputs = prompt_inputs(pipe, [item.prompt, ""], [prepared.source, *prepared.refs])
        prepared.timings["prep.uint8"] = t2 - t1
        prepared.timings["prep.processor"] = time.perf_counter() - t2
    return prepared


def _use_processes(cfg: CacheConfig, device) -> bool:
    """Image preparation in worker processes: asked for, or `auto` on CUDA."""
    return cfg.workers == "process" or (cfg.workers == "auto" and torch.device(device).type == "cuda")


# ---- worker processes ------------------------------------------------------------------------------------------------
_WORKER_PIPE: Any = None


def _worker_init(processor_file: str) -> None:
    """Process-pool initializer: a stand-in pipeline holding only the processor (all `prompt_inputs` needs), read
    from the parent's pickle file; the preparation code is imported here so a worker is ready before its first
    sample."""
    global _WORKER_PIPE
    import pickle
    import types

    from .. import editor, encoding  # noqa: F401  (imported now, not on the worker's first sample)

    torch.set_num_threads(1)
    with open(processor_file, "rb") as f:
        _WORKER_PIPE = types.SimpleNamespace(processor=pickle.load(f))


_POOL: tuple[Any, Any, Path] | None = None  # (key, ProcessPoolExecutor, temp folder), kept between runs of a process


def _shutdown_pool() -> None:
    global _POOL
    if _POOL is not None:
        import shutil

        _POOL[1].shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(_POOL[2], ignore_errors=True)
        _POOL = None


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
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    key = (num_workers, id(processor))
    if _POOL is not None and _POOL[0] == key:
        return _POOL[1]
    if _POOL is None:
        atexit.register(_shutdown_pool)
    _shutdown_pool()
    folder = Path(tempfile.mkdtemp(prefix="cache-workers-"))
    with open(folder / "processor.pkl", "wb") as f:
        pickle.dump(processor, f)
    # spawn: the parent holds CUDA state; the workers need only the processor
    pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(str(folder / "processor.pkl"),))
    _POOL = (key, pool, folder)
    for _ in range(num_workers):  # start every worker now (the pool would spawn them one per submit, later)
        pool.submit(os.getpid)
    return pool


def _prepare_in_worker(item: _Item, max_pixels: int) -> _Prepared:
    """`prepare_sample` in a worker process. The target and crop images travel as their uint8 tensors only."""
    p = prepare_sample(item, max_pixels, _WORKER_PIPE)
    p.target = p.crop = None  # the encoder reads their `pixels`
    return p


def _prepare_images(item: _Item, max_pixels: int) -> _Prepared:
    from ..editor import EditInputError, fit_image, prepare_mask, to_rgb

    try:
        src_raw = to_rgb(_open(item.edit_image[0], "edit_image[0]"), "source")
        source, _ = fit_image(src_raw, max_pixels)
        refs = [fit_image(to_rgb(_open(p, f"edit_image[{i}]"), f"reference {i}"), max_pixels)[0]
                for i, p in enumerate(item.edit_image[1:], start=1)]
        size = source.size  # (w, h)
        target = to_rgb(_open(item.image, "image"), "target")
        if target.size != size:
            (tw, th), (sw, sh) = target.size, src_raw.size
            if abs(tw / th - sw / sh) > 0.01 * (sw / sh):
                raise SampleError(f"image {item.image}: target of {tw}x{th} does not match the source of {sw}x{sh} "
                                  f"(different aspect ratio)")
            target = target.resize(size, Image.LANCZOS)
        mask = None
        if item.back_mask is not None:
            try:
                mask, _ = prepare_mask(_open(item.back_mask, "back_mask"), size, src_raw.size)  # the editor's rule
            except EditInputError as e:
                raise SampleError(f"back_mask {item.back_mask}: {e}") from None
        w, h = size
        box = mask_bbox(mask, (h, w))
        crop = None
        if item.ref_gt_crop is not None:
            c = to_rgb(_open(item.ref_gt_crop, "ref_gt_crop"), "ref_gt_crop")
            if c.size == (box.width, box.height):
                crop = c
        if crop is None:
            pasted = target if mask is None else Image.composite(target, Image.new("RGB", size, (255, 255, 255)), mask)
            crop = pasted.crop(box.pil_box())
        return _Prepared(item, target, source, refs, mask, box, crop)
    except SampleError:
        raise
    except EditInputError as e:
        raise SampleError(str(e)) from None


# ---- encoding (device) ---------------------------------------------------------------------------------------------
SUB_KEY = "sub_input_latents"


class SampleEncoder:
    """Encodes prepared samples with the shared encoding functions; VAE calls batched over same-shape images.

    On CUDA the sub crops and their white images are encoded by a side thread on its own stream (`side_thread`).
    A crop has the mask box's size, new with nearly every sample, and for a new size cuDNN builds its convolution
    plans on the host (~50 ms per new size for this VAE, H100: `bench/bench_new_shapes.py`); torch releases the GIL
    inside its ops, so that host work overlaps the main thread's VAE and text-encoder calls. Same kernels, same
    numbers."""

    def __init__(self, pipe, dtype: torch.dtype, batch_size: int, compile_vae: bool = False,
                 log: Callable[[str], None] = print, side_thread: bool | None = None):
        self.pipe, self.dtype, self.batch_size, self.log = pipe, dtype, batch_size, log
        self._white: dict[tuple[int, int], torch.Tensor] = {}
        on_cuda = torch.device(pipe.device).type == "cuda"
        self.compiled_vae = compile_vae and on_cuda
        if self.compiled_vae:
            from ..speedups import compile_vae as compile_

            compile_(pipe.vae, encoder=True)
        # a compiled VAE stays on one thread (compiling from two threads at once is not supported)
        side = (on_cuda if side_thread is None else side_thread) and not self.compiled_vae
        self._side_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-sub-vae") if side else None
        self._side_stream = torch.cuda.Stream(device=pipe.device) if side and on_cuda else None

    def close(self) -> None:
        if self._side_pool is not None:
            self._side_pool.shutdown(wait=True)

    def _vae_encode(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        from ..encoding import vae_encode_uint8

        try:
            return vae_encode_uint8(self.pipe, pixels)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not end a long run
            if not self.compiled_vae:
                raise
            from ..speedups import uncompile_vae

            uncompile_vae(self.pipe.vae)
            self.compiled_vae = False
            self.log(f"compiled VAE failed ({type(e).__name__}: {str(e)[:200]}); continuing eager "
                     "(set compile_vae = false to skip compiling)")
            return vae_encode_uint8(self.pipe, pixels)

    def white(self, width: int, height: int) -> torch.Tensor:
        """Latents of a white image of this size, computed once per shape and reused."""
        from ..encoding import white_latents

        key = (width, height)
        if key not in self._white:
            self._white[key] = self._store(white_latents(self.pipe, width, height)[0])
        return self._white[key]

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=self.dtype).contiguous()

    def _encode_batched(self, jobs: list[tuple[Any, torch.Tensor]]) -> list[tuple[Any, torch.Tensor]]:
        """(tag, latents on the device) for each (tag, uint8 image) of `jobs`: same-size images share VAE calls of up
        to `batch_size` images."""
        groups: dict[tuple[int, ...], list[tuple[Any, torch.Tensor]]] = {}
        for tag, px in jobs:
            groups.setdefault(tuple(px.shape), []).append((tag, px))
        out: list[tuple[Any, torch.Tensor]] = []
        for group in groups.values():
            for j in range(0, len(group), self.batch_size):
                chunk = group[j:j + self.batch_size]
                lat = self._vae_encode([px for _, px in chunk])
                out += [(tag, lat[i]) for i, (tag, _) in enumerate(chunk)]
        return out

    @torch.no_grad()
    def _encode_subs(self, samples: list[_Prepared]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(sub-crop latents, white latents) of each sample, on the CPU; same-size crops batched."""
        stream = torch.cuda.stream(self._side_stream) if self._side_stream is not None else contextlib.nullcontext()
        with stream:
            lats = dict(self._encode_batched([(n, px) for n, s in enumerate(samples)
                                              for _, px in s.vae_inputs(sub=True)]))
            return [(self._store(lats[n]), self.white(s.box.width, s.box.height)) for n, s in enumerate(samples)]

    @torch.no_grad()
    def encode(self, samples: list[_Prepared]) -> list[dict[str, torch.Tensor]]:
        """Tensors of each sample. VAE: every image of every sample in `samples`, grouped by size, `batch_size`
        images per call (`encoding.vae_encode_uint8` = `encoding.vae_encode` on uint8 input). Prompt and empty
        negative: `encoding.encode_prompt_pairs` (one text-encoder call for all samples; the negative stored as prefix
        length + tail)."""
        from ..speedups import sdpa_any_length

        # torch's attention-backend flags are process-wide and the text encoder switches cuDNN's off while it runs
        # (`speedups.sdpa_any_length`): the whole step runs with it off, so the side thread's VAE never sees a flag
        # change halfway
        with sdpa_any_length():
            side = self._side_pool.submit(self._encode_subs, samples) if self._side_pool is not None else None
            try:
                out = self._encode_main(samples)
            finally:
                if side is not None:
                    wait([side])  # the side thread is done with these samples before anything else is encoded
            subs = side.result() if side is not None else self._encode_subs(samples)
        for o, (sub, white) in zip(out, subs):
            o[SUB_KEY], o["sub_noise"] = sub, white.clone()
        return out

    def _encode_main(self, samples: list[_Prepared]) -> list[dict[str, torch.Tensor]]:
        """Everything but the sub crops: target, source and reference latents, the prompt pair, mask, sizes."""
        from ..encoding import encode_prompt_pairs, prompt_inputs

        out: list[dict[str, torch.Tensor]] = [{} for _ in samples]
        lats = self._encode_batched([((n, key), px) for n, s in enumerate(samples)
                                     for key, px in s.vae_inputs(sub=False)])
        # one device->host copy per tensor after all VAE calls were queued (no sync between VAE calls)
        for (n, key), lat in lats:
            out[n][key] = self._store(lat)
        pairs = encode_prompt_pairs(self.pipe, [
            s.prompt_inputs or prompt_inputs(self.pipe, [s.item.prompt, ""], [s.source, *s.refs]) for s in samples])
        for n, (s, pair) in enumerate(zip(samples, pairs)):
            emb, mask = pair.emb, pair.mask
            w, h = s.source.size
            if s.mask is None:
                mask_latent = torch.ones(1, h // 8, w // 8)
            else:
                m = torch.from_numpy(binarize_mask(s.mask).astype("float32"))[None, None]
                mask_latent = F.avg_pool2d(m, 8)[0]
            out[n].update({
                "prompt_emb": self._store(emb[0]), "prompt_emb_mask": mask[0].to("cpu", torch.int64).contiguous(),
                NEGA_TAIL: self._store(pair.nega_tail[0]),
                NEGA_PREFIX: torch.tensor([pair.nega_prefix], dtype=torch.int64),
                "nega_prompt_emb_mask": pair.nega_mask[0].to("cpu", torch.int64).contiguous(),
                "mask_latent": mask_latent.float().contiguous(),
                "subyx": torch.tensor(s.box.to_subyx(), dtype=torch.int64),
                "size": torch.tensor([h, w], dtype=torch.int64),
            })
        return out


# ---- files ---------------------------------------------------------------------------------------------------------
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
    """Writes sample files atomically in a background thread (serialisation + fsync overlap the next encode)."""

    def __init__(self, cache_dir: Path, settings: CacheSettings,
                 on_done: Callable[[_Item, dict | None, str | None], None], rank: int = 0, fsync: bool = True):
        self.cache_dir, self.settings, self.on_done, self.rank = cache_dir, settings, on_done, rank
        self.fsync = fsync
        self.times = collections.Counter()  # write.serialise / write.file / write.backpressure seconds
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self.pending: collections.deque[Future] = collections.deque()
        self.count = 0
        self.lock = threading.Lock()

    def submit(self, item: _Item, tensors: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        while len(self.pending) >= 4:
            self.pending.popleft().result()
        self.times["write.backpressure"] += time.perf_counter() - t0
        self.pending.append(self.pool.submit(self._write, item, tensors))

    def _write(self, item: _Item, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

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
            with atomic_path(final) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                _kill_hook("during", n)
            self.times["write.serialise"] += t1 - t0
            self.times["write.file"] += time.perf_counter() - t1
            if os.environ.get(LOG_ENV):
                with open(os.environ[LOG_ENV], "a") as f:
                    f.write(f"{self.rank} {item.id}\n")
            _kill_hook("after", n)
            shapes = {k: list(v.shape) for k, v in tensors.items()}
            self.on_done(item, entry_record(item, shapes, len(data)), None)
        except Exception as e:  # disk full, permissions: report the sample, keep going
            self.on_done(item, None, f"cannot write {self.cache_dir / item.file}: {type(e).__name__}: {e}")

    def close(self) -> None:
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown(wait=True)


def _scan_item(item: _Item, fingerprint: str, cache_dir: Path) -> tuple[str | None, dict | None, str | None]:
    """(hash, record if a valid file exists, failure reason)."""
    try:
        h = sample_hash(fingerprint, item.prompt, item.input_files(), item.id, item.edit_type)
    except FileNotFoundError as e:
        role = next((r for r, p in item.input_files() if str(p) == e.filename), "input")
        return None, None, f"{role} {e.filename}: file not found"
    except OSError as e:
        return None, None, f"cannot read {e.filename}: {e.strerror}"
    item.hash = h
    path = cache_dir / item.file
    if not path.is_file() or quick_check(path, expected_hash=h) is not None:
        return h, None, None
    table, _ = read_header(path)
    shapes = {k: list(v["shape"]) for k, v in table.items()}
    try:
        return h, entry_record(item, shapes, path.stat().st_size), None
    except (KeyError, ValueError):
        return h, None, None


def _check_weights(src) -> None:
    """MissingWeightsError (with the how-to) when a component is neither local nor downloadable."""
    from ..loading import MissingWeightsError, _describe_lookup, download_hint, model_configs_for, resolve_local

    model_configs_for(src, ("text_encoder", "vae"))
    for name in ("tokenizer", "processor"):
        if resolve_local(src, name) is None and not src.allow_download:
            raise MissingWeightsError(f"{name} for Qwen-Image-Edit-{src.variant} not found "
                                      f"({_describe_lookup(src, name)}); {download_hint(src, name)}")


def _cleanup(cache_dir: Path, expected: set[str], prune: bool) -> tuple[list[str], list[str]]:
    """Remove leftover temporary files; remove (prune) or list sample files no sample maps to."""
    removed, kept = [], []
    samples = cache_dir / SAMPLES_DIR
    for folder in (cache_dir, samples):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
    if samples.is_dir():
        for p in sorted(samples.glob("*" + SAMPLE_SUFFIX)):
            if p.stem in expected:
                continue
            rel = f"{SAMPLES_DIR}/{p.name}"
            if prune:
                p.unlink(missing_ok=True)
                removed.append(rel)
            else:
                kept.append(rel)
    return removed, kept


# ---- the run -------------------------------------------------------------------------------------------------------
def run_cache(cfg: CacheConfig, pipe=None, log: Callable[[str], None] = print) -> CacheSummary:
    """Encode `cfg.dataset` into `cfg.cache_dir`. `pipe` (tests, benchmarks): an already loaded pipeline."""
    t_start = time.perf_counter()
    dist = _Dist(cfg.device)
    cache_dir = Path(cfg.cache_dir)
    summary = CacheSummary(cache_dir)

    # Refuse a cache of another variant before touching anything.
    try:
        old = read_manifest(cache_dir)
    except ValueError:
        old = None  # unreadable manifest: it is rewritten below
    if old is not None:
        try:
            check_same_variant(cfg.variant, old.get("variant"), "cache directory")
        except VariantMismatchError as e:
            raise VariantMismatchError(f"{cache_dir}: {e}; pass another --cache-dir") from None
    elif cache_dir.is_dir() and any(p for p in cache_dir.iterdir() if p.name not in (SAMPLES_DIR, MANIFEST_NAME)
                                    and not p.name.startswith(".")):
        raise CacheRunError(f"{cache_dir} is not empty and has no {MANIFEST_NAME}: choose an empty or cache folder")

    items = load_items(cfg)
    summary.total = len(items)
    src = cfg.sources()
    if pipe is None:
        _check_weights(src)  # fail before writing anything
    identity = encoder_identity(src)
    settings = CacheSettings(cfg.variant, cfg.max_pixels, cfg.dtype, identity["digest"])
    fingerprint = settings.fingerprint()

    # 1. hash + check existing files: each rank a stride share, then everyone has the whole picture.
    share = items[dist.rank::dist.world]
    t_scan = time.perf_counter()
    with ThreadPoolExecutor(max_workers=cfg.num_workers) as ex:
        scanned = list(ex.map(lambda it: (it.index, *_scan_item(it, fingerprint, cache_dir)), share))
    stages: collections.Counter = collections.Counter()
    stages["scan (hash + check)"] = time.perf_counter() - t_scan
    results = {idx: (h, rec, err) for part in dist.all_gather(scanned) for idx, h, rec, err in part}
    valid: dict[int, dict] = {}
    failures: list[Failure] = []
    pending: list[_Item] = []
    for it in items:
        h, rec, err = results[it.index]
        it.hash = h
        if err is not None:
            failures.append(Failure(it.id, it.index, err))
        elif rec is not None:
            valid[it.index] = rec
        else:
            pending.append(it)
    pending.sort(key=lambda it: it.index)
    # Identical inputs hash to the same file: encode it once.
    seen_hash: set[str] = set()
    unique_pending = []
    for it in pending:
        if it.hash not in seen_hash:
            seen_hash.add(it.hash)
            unique_pending.append(it)
    mine = unique_pending[dist.rank::dist.world]
    summary.skipped = len(valid)
    by_index = {it.index: it for it in items}

    def manifest_entries(records: dict[int, dict]) -> dict[str, dict]:
        return {by_index[i].id: records[i] for i in sorted(records)}

    if dist.main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(cache_dir, build_manifest(settings, identity, manifest_entries(valid), complete=False,
                                                 dataset=str(cfg.dataset)))
    (cache_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    dist.barrier()

    # 2. encode this rank's share.
    new: dict[int, dict] = {}
    my_failures: list[Failure] = []
    lock = threading.Lock()
    if mine:
        if pipe is None:
            from ..loading import load_pipeline

            processor = None
            if _use_processes(cfg, dist.device):
                # the workers start (spawn + imports, seconds each) while the large models load; the pipeline
                # gets the same processor, so the later `_process_pool` call returns this pool
                processor = load_pipeline(src, components=("processor",), device="cpu").processor
                _process_pool(cfg.num_workers, processor)
            pipe = load_pipeline(src, components=("text_encoder", "vae", "tokenizer") + (() if processor else
                                                                                        ("processor",)),
                                 device=dist.device, torch_dtype=TORCH_DTYPES[cfg.dtype])
            pipe.processor = processor or pipe.processor
        elif pipe.torch_dtype != TORCH_DTYPES[cfg.dtype]:
            raise CacheRunError(f"the given pipeline is {pipe.torch_dtype}, the config asks for {cfg.dtype}")
        from tqdm.auto import tqdm

        on_cuda = torch.device(pipe.device).type == "cuda"
        if on_cuda and cfg.cudnn_benchmark:
            # tunes once per input shape: pays off only where few shapes recur (sub crops vary per sample)
            torch.backends.cudnn.benchmark = True
        use_procs = _use_processes(cfg, pipe.device)
        t_enc = time.perf_counter()  # after loading: the rate is the encoding rate

        bar = tqdm(total=len(mine), unit="sample", desc=f"cache {cache_dir.name}" + (
            f" (rank 0 of {dist.world})" if dist.world > 1 else ""), disable=not (cfg.progress and dist.main),
            dynamic_ncols=True)
        last_manifest = [time.monotonic()]

        def on_done(item: _Item, rec: dict | None, err: str | None) -> None:
            with lock:
                if rec is not None:
                    new[item.index] = rec
                else:
                    my_failures.append(Failure(item.id, item.index, err or "unknown error"))
            bar.update(1)
            if dist.main and time.monotonic() - last_manifest[0] > cfg.manifest_every:
                last_manifest[0] = time.monotonic()
                with lock:
                    recs = {**valid, **new}
                write_manifest(cache_dir, build_manifest(settings, identity, manifest_entries(recs), complete=False,
                                                         dataset=str(cfg.dataset)))

        encoder = SampleEncoder(pipe, TORCH_DTYPES[cfg.dtype], cfg.batch_size, cfg.compile_vae, log)
        writer = _Writer(cache_dir, settings, on_done, dist.rank, fsync=cfg.fsync)
        if use_procs:
            loader = _process_pool(cfg.num_workers, pipe.processor)

            def submit(it: _Item) -> Future:
                return loader.submit(_prepare_in_worker, it, cfg.max_pixels)
        else:
            loader = ThreadPoolExecutor(max_workers=cfg.num_workers, thread_name_prefix="cache-reader")

            def submit(it: _Item) -> Future:
                return loader.submit(prepare_sample, it, cfg.max_pixels, pipe, on_cuda)
        queue: collections.deque[tuple[_Item, Future]] = collections.deque()
        todo = iter(mine)
        depth = cfg.batch_size + 2 * cfg.num_workers

        def fill() -> None:
            t0 = time.perf_counter()
            while len(queue) < depth:
                it = next(todo, None)
                if it is None:
                    break
                queue.append((it, submit(it)))
            stages["submit to readers"] += time.perf_counter() - t0

        stages["start (encoder, writer, readers)"] = time.perf_counter() - t_enc
        t_loop = time.perf_counter()
        try:
            fill()
            while queue:
                batch: list[_Prepared] = []
                while queue and len(batch) < cfg.batch_size:
                    it, fut = queue.popleft()
                    t0 = time.perf_counter()
                    try:
                        p = fut.result()
                        stages["wait for prepared (device idle)"] += time.perf_counter() - t0
                        stages.update(p.timings)
                        batch.append(p)
                    except SampleError as e:
                        on_done(it, None, str(e))
                    except Exception as e:
                        on_done(it, None, f"cannot prepare: {type(e).__name__}: {e}")
                    fill()
                if not batch:
                    continue
                t0 = time.perf_counter()
                encoded = _encode_isolated(encoder, batch, on_done)
                stages["encode (device + copy back)"] += time.perf_counter() - t0
                for prepared, tensors in encoded:
                    writer.submit(prepared.item, tensors)
            accounted = ("submit to readers", "wait for prepared (device idle)", "encode (device + copy back)")
            stages["device loop, other"] = (time.perf_counter() - t_loop - sum(stages[k] for k in accounted)
                                            - writer.times["write.backpressure"])
        finally:
            if use_procs:
                for _, fut in queue:
                    fut.cancel()
                for _, fut in queue:  # no work of this run left behind in the kept pool
                    if not fut.cancelled():
                        try:
                            fut.result()
                        except Exception:
                            pass
            else:
                loader.shutdown(wait=True, cancel_futures=True)
            encoder.close()
            t0 = time.perf_counter()
            writer.close()
            stages["write.drain at end"] += time.perf_counter() - t0
            bar.close()
        summary.encode_seconds = time.perf_counter() - t_enc
        stages.update(writer.times)
        if use_procs:
            stages = collections.Counter({(k + " (workers)" if k.startswith("prep.") else k): v
                                          for k, v in stages.items()})
    summary.stages = dict(stages)

    # 3. gather, final manifest, cleanup.
    gathered = dist.all_gather((new, [f.as_dict() for f in my_failures], summary.encode_seconds))
    dist.barrier()
    all_new: dict[int, dict] = {}
    for part_new, part_fail, secs in gathered:
        all_new.update(part_new)
        summary.per_rank.append(len(part_new))
        failures += [Failure(**f) for f in part_fail]
        summary.encode_seconds = max(summary.encode_seconds, secs)
    # Duplicates of an encoded file share its record.
    by_hash = {rec["hash"]: rec for rec in (*valid.values(), *all_new.values())}
    records = dict(valid)
    done_idx = {f.index for f in failures}
    for it in items:
        if it.index in records or it.index in done_idx:
            continue
        rec = all_new.get(it.index) or by_hash.get(it.hash or "")
        if rec is not None:
            records[it.index] = {**rec, "index": it.index}
        else:  # a duplicate of a sample that failed
            failures.append(Failure(it.id, it.index, "not cached: an identical sample failed"))
    summary.encoded = len(all_new)
    failures.sort(key=lambda f: f.index)
    summary.failed = failures
    summary.bytes_on_disk = sum(r["bytes"] for r in {r["hash"]: r for r in records.values()}.values())
    if dist.main:
        write_manifest(cache_dir, build_manifest(settings, identity, manifest_entries(records), complete=True,
                                                 failed=[f.as_dict() for f in failures], dataset=str(cfg.dataset)))
        expected = {it.hash for it in items if it.hash}
        summary.orphans_removed, summary.orphans_kept = _cleanup(
            cache_dir, expected, prune=cfg.prune and cfg.limit is None)
    dist.barrier()
    summary.seconds = time.perf_counter() - t_start
    return summary


def _encode_isolated(encoder: SampleEncoder, batch: list[_Prepared], on_done) -> list[tuple[_Prepared, dict]]:
    """Encode a batch; if it fails, encode its samples one by one so one bad sample does not sink the others."""
    try:
        return list(zip(batch, encoder.encode(batch)))
    except Exception as e:
        if len(batch) == 1:
            on_done(batch[0].item, None, f"cannot encode: {type(e).__name__}: {e}")
            return []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = []
    for s in batch:
        out += _encode_isolated(encoder, [s], on_done)
    return out
