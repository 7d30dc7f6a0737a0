"""Which existing outputs of `edit_images.py edit/evaluate` may be reused: only those made with the same settings.

Every sample's sidecar (`<id>.json`) records a fingerprint: a hash of everything that decides its pixels, namely
the checkpoint's identity (resolved path, size, modification time), the base weights' identities, variant, strength,
mode, activation, device/dtype/fp8/compile, sampler, steps, cfg, seed, blending, max pixels, CFG batching and the
negative prompt, plus the sample's own inputs (prompt, and each input file's identity). A re-run reuses a sample
only when its outputs exist and its sidecar's fingerprint equals the new one; others are redone, and the log says how
many and which settings changed (from `settings.json`, the folder's record of the last run's settings).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

SETTINGS_FILE = "settings.json"
FINGERPRINT_VERSION = 1


def file_identity(path: Path | str | None) -> dict[str, Any] | None:
    """(resolved path, size, mtime in ns) of a file; a file that does not exist is identified by its path alone."""
    if path is None:
        return None
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": os.path.abspath(p), "missing": True}
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _weights_identity(cfg) -> dict[str, Any]:
    """Identities of the base weights the run loads (local files only; hub downloads are named by their source)."""
    from ..loading import resolve_local

    src = cfg.model_sources(cfg.variant)
    out: dict[str, Any] = {}
    for name in ("dit", "text_encoder", "vae"):
        local = resolve_local(src, name)
        out[name] = [file_identity(p) for p in local] if local else None
    return out


def run_settings(cfg) -> dict[str, Any]:
    """Everything of an EditConfig/EvaluateConfig that decides the output pixels, as JSON-able values."""
    from .options import ModelOptions, SamplerOptions

    names = [f.name for f in dataclasses.fields(ModelOptions)] + [f.name for f in dataclasses.fields(SamplerOptions)]
    settings: dict[str, Any] = {"version": FINGERPRINT_VERSION}
    for name in names:
        value = getattr(cfg, name)
        settings[name] = str(value) if isinstance(value, Path) else value
    settings["checkpoint"] = file_identity(cfg.checkpoint)
    settings["weights"] = _weights_identity(cfg)
    return settings


def sample_fingerprint(settings: dict[str, Any], prompt: str, inputs: Iterable[tuple[str, Path | None]]) -> str:
    """sha256 of the run settings and one sample's prompt and input files (role, identity)."""
    blob = json.dumps({"settings": settings, "prompt": prompt,
                       "inputs": [[role, file_identity(p)] for role, p in inputs]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def recorded_fingerprint(sidecar: Path) -> str | None:
    try:
        return json.loads(sidecar.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def changed_settings(out_dir: Path, settings: dict[str, Any]) -> list[str]:
    """Names of the settings that differ from the last run recorded in `out_dir` (empty when none is recorded)."""
    try:
        previous = json.loads((Path(out_dir) / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(previous, dict):
        return []
    return sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))


def write_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    from ..atomic import atomic_write_json

    atomic_write_json(Path(out_dir) / SETTINGS_FILE, settings)
