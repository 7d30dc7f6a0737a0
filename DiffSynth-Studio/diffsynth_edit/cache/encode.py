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

Where: `config` (CacheConfig), `samples` (dataset items, CPU preparation), `scan` (step 1), `workers` (the reader
pool of step 3), `loop` (steps 2-4 for this rank), `encoder` (the device), `writer` (step 4), `dist`, `summary`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from ..output_errors import OutputWriteError
from ..variants import VariantMismatchError, check_same_variant
from .config import TORCH_DTYPES, CacheConfig, CacheRunError
from .dist import _Dist
from .loop import ShareResult, encode_share
from .manifest import (MANIFEST_NAME, SAMPLE_SUFFIX, SAMPLES_DIR, CacheSettings, build_manifest, encoder_identity,
                       manifest_path, read_manifest, write_manifest)
from .samples import _Item, load_items
from .scan import scan_items
from .summary import CacheSummary, Failure
from .workers import _process_pool, _use_processes


def run_cache(cfg: CacheConfig, pipe=None, log: Callable[[str], None] = print) -> CacheSummary:
    """Encode `cfg.dataset` into `cfg.cache_dir`. `pipe` (tests, benchmarks): an already loaded pipeline.
    A failed write to the cache folder raises `OutputWriteError`; every file written before stays valid and
    listed in the incremental manifest, so that the same command finishes the cache later."""
    t_start = time.perf_counter()
    dist = _Dist(cfg.device)
    cache_dir = Path(cfg.cache_dir)
    summary = CacheSummary(cache_dir)
    _check_cache_dir(cache_dir, cfg.variant)  # before touching anything
    items = load_items(cfg)
    summary.total = len(items)
    src = cfg.sources()
    if pipe is None:
        _check_weights(src)  # fail before writing anything
    identity = encoder_identity(src)
    settings = CacheSettings(cfg.variant, cfg.max_pixels, cfg.dtype, identity["digest"])
    by_index = {it.index: it for it in items}

    def manifest(records: dict[int, dict], complete: bool, failed: list[dict] | None = None) -> None:
        entries = {by_index[i].id: records[i] for i in sorted(records)}
        try:
            write_manifest(cache_dir, build_manifest(settings, identity, entries, complete=complete, failed=failed,
                                                     dataset=str(cfg.dataset)))
        except OSError as e:
            raise OutputWriteError.from_os_error(e, manifest_path(cache_dir)) from None

    # 1. hash + check existing files
    scan = scan_items(items, settings.fingerprint(), cache_dir, dist, cfg.num_workers)
    summary.skipped = len(scan.valid)
    try:
        if dist.main:
            cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError.from_os_error(e, cache_dir / SAMPLES_DIR) from None
    if dist.main:
        manifest(scan.valid, complete=False)
    dist.barrier()

    # 2. encode this rank's share
    mine = scan.pending[dist.rank::dist.world]
    share = ShareResult()
    if mine:
        if pipe is None:
            pipe = _load_encoders(cfg, src, dist)
        elif pipe.torch_dtype != TORCH_DTYPES[cfg.dtype]:
            raise CacheRunError(f"the given pipeline is {pipe.torch_dtype}, the config asks for {cfg.dtype}")
        share = encode_share(cfg, pipe, mine, cache_dir, settings, dist,
                             lambda new: manifest({**scan.valid, **new}, complete=False), log)
    summary.stages = {"scan (hash + check)": scan.seconds, **share.stages}

    # 3. gather, final manifest, cleanup
    new, failures = _gather(dist, share, summary)
    failures = scan.failures + failures
    records = _records(items, scan.valid, new, failures)
    summary.encoded = len(new)
    failures.sort(key=lambda f: f.index)
    summary.failed = failures
    summary.bytes_on_disk = sum(r["bytes"] for r in {r["hash"]: r for r in records.values()}.values())
    if dist.main:
        manifest(records, complete=True, failed=[f.as_dict() for f in failures])
        expected = {it.hash for it in items if it.hash}
        summary.orphans_removed, summary.orphans_kept = _cleanup(
            cache_dir, expected, prune=cfg.prune and cfg.limit is None)
    dist.barrier()
    summary.seconds = time.perf_counter() - t_start
    return summary


def _check_cache_dir(cache_dir: Path, variant: str) -> None:
    """Refuse a cache of another variant, or a folder that holds something else."""
    try:
        old = read_manifest(cache_dir)
    except ValueError:
        old = None  # unreadable manifest: it is rewritten
    if old is not None:
        try:
            check_same_variant(variant, old.get("variant"), "cache directory")
        except VariantMismatchError as e:
            raise VariantMismatchError(f"{cache_dir}: {e}; pass another --cache-dir") from None
    elif cache_dir.is_dir() and any(p for p in cache_dir.iterdir() if p.name not in (SAMPLES_DIR, MANIFEST_NAME)
                                    and not p.name.startswith(".")):
        raise CacheRunError(f"{cache_dir} is not empty and has no {MANIFEST_NAME}: choose an empty or cache folder")


def _check_weights(src) -> None:
    """MissingWeightsError (with the how-to) when a component is neither local nor downloadable."""
    from ..loading import MissingWeightsError, _describe_lookup, download_hint, model_configs_for, resolve_local

    model_configs_for(src, ("text_encoder", "vae"))
    for name in ("tokenizer", "processor"):
        if resolve_local(src, name) is None and not src.allow_download:
            raise MissingWeightsError(f"{name} for Qwen-Image-Edit-{src.variant} not found "
                                      f"({_describe_lookup(src, name)}); {download_hint(src, name)}")


def _load_encoders(cfg: CacheConfig, src, dist: _Dist):
    """The text encoder, VAE, tokenizer and processor (never the DiT) on this rank's device."""
    from ..loading import load_pipeline
    from ..low_memory import place_encoders

    processor = None
    if _use_processes(cfg, dist.device):
        # the workers start (spawn + imports, seconds each) while the large models load; the pipeline
        # gets the same processor, so the later `_process_pool` call returns this pool
        processor = load_pipeline(src, components=("processor",), device="cpu").processor
        _process_pool(cfg.num_workers, processor)
    pipe = load_pipeline(src, components=("text_encoder", "vae", "tokenizer") + (() if processor else
                                                                                ("processor",)),
                         device="cpu" if cfg.text_encoder_blocks_to_swap else dist.device,
                         torch_dtype=TORCH_DTYPES[cfg.dtype])
    if cfg.text_encoder_blocks_to_swap:  # loaded on the host, placed layer by layer
        place_encoders(pipe, cfg.text_encoder_blocks_to_swap, dist.device)
    pipe.processor = processor or pipe.processor
    return pipe


def _gather(dist: _Dist, share: ShareResult, summary: CacheSummary) -> tuple[dict[int, dict], list[Failure]]:
    """Every rank's new records and failures (all ranks take part); encoded count and time per rank."""
    gathered = dist.all_gather((share.new, [f.as_dict() for f in share.failures], share.seconds))
    dist.barrier()
    new: dict[int, dict] = {}
    failures: list[Failure] = []
    for part_new, part_fail, secs in gathered:
        new.update(part_new)
        summary.per_rank.append(len(part_new))
        failures += [Failure(**f) for f in part_fail]
        summary.encode_seconds = max(summary.encode_seconds, secs)
    return new, failures


def _records(items: list[_Item], valid: dict[int, dict], new: dict[int, dict],
             failures: list[Failure]) -> dict[int, dict]:
    """index -> record of every cached sample. Duplicates of an encoded file share its record; a duplicate of a
    sample that failed is appended to `failures`."""
    by_hash = {rec["hash"]: rec for rec in (*valid.values(), *new.values())}
    records = dict(valid)
    done_idx = {f.index for f in failures}
    for it in items:
        if it.index in records or it.index in done_idx:
            continue
        rec = new.get(it.index) or by_hash.get(it.hash or "")
        if rec is not None:
            records[it.index] = {**rec, "index": it.index}
        else:
            failures.append(Failure(it.id, it.index, "not cached: an identical sample failed"))
    return records


def _cleanup(cache_dir: Path, expected: set[str], prune: bool) -> tuple[list[str], list[str]]:
    """Remove leftover temporary files; remove (prune) or list sample files no sample maps to."""
    removed, kept = [], []
    samples = cache_dir / SAMPLES_DIR
    for folder in (cache_dir, samples):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                _remove(p)
    if samples.is_dir():
        for p in sorted(samples.glob("*" + SAMPLE_SUFFIX)):
            if p.stem in expected:
                continue
            rel = f"{SAMPLES_DIR}/{p.name}"
            if prune:
                _remove(p)
                removed.append(rel)
            else:
                kept.append(rel)
    return removed, kept


def _remove(path: Path) -> None:
    """Delete a file of the cache folder; a folder that refuses it is the run's one-line error."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise OutputWriteError.from_os_error(e, path) from None
