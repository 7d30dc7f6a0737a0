"""Phase 1 of split training: the cache (encode a dataset once; the trainer reads it without TE/VAE).

Reader API for the trainer: `open_cache(dir) -> CacheIndex` (`.manifest`, `.variant`, `.zero_cond_t`, `.entries`,
`len()`, `.load(i) -> CachedSample`) and `CacheError`. Writer: `encode.run_cache(config.CacheConfig)`
(steps in `scan`, `loop`; parts in `samples`, `workers`, `encoder`, `writer`, `dist`, `summary`); checker:
`verify.verify_cache(dir)`; commands in `cli` (`python train_2511.py cache|verify`).
"""
from .store import CacheEntryInfo, CachedSample, CacheError, CacheIndex, open_cache

__all__ = ["CacheEntryInfo", "CachedSample", "CacheError", "CacheIndex", "open_cache"]
