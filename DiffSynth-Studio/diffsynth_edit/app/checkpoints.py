"""Checkpoint discovery and the root check: only `.safetensors` files under the configured roots can be loaded.

A checkpoint is named by its path relative to the root it lives in (`my-run/step-1000.safetensors`); a path relative
to the working directory or an absolute path is accepted too when it lies inside a root. Every name is resolved
(symbolic links and `..` followed) before the check, so a link inside a root that points outside is refused.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..checkpoint import looks_loadable, read_metadata
from .errors import AppInputError

_STEP_RE = re.compile(r"(?:step|checkpoint|epoch)[-_]?(\d+)", re.IGNORECASE)
MAX_LISTED = 2000
MAX_NAME_CHARS = 1024  # longer checkpoint names are refused by name (the OS refuses them anyway)


class CheckpointAccessError(AppInputError):
    """A checkpoint name is refused (outside the roots, not safetensors, missing); the message says why."""


@dataclass(frozen=True)
class CheckpointEntry:
    id: str            # path relative to its root, '/'-separated: what the UI and the API pass around
    path: Path         # resolved absolute path
    root: Path         # resolved root
    run: str           # folder of the file relative to the root ('.' for files directly in the root)
    step: int | None   # from metadata "step", else from the file name, else None
    variant: str | None
    mtime: float
    size: int

    @property
    def label(self) -> str:
        step = f"step {self.step}" if self.step is not None else Path(self.id).stem
        variant = f" [{self.variant}]" if self.variant else ""
        return f"{self.run} · {step}{variant}  ({self.id})"


def resolve_roots(roots: Iterable[Path | str]) -> list[Path]:
    out: list[Path] = []
    for r in roots:
        p = Path(r).expanduser().resolve()
        if p not in out:
            out.append(p)
    return out


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _step_of(path: Path, meta: dict) -> int | None:
    step = meta.get("step")
    if step is not None:
        try:
            return int(step)
        except (TypeError, ValueError):
            pass
    m = _STEP_RE.search(path.stem)
    return int(m.group(1)) if m else None


def list_checkpoints(roots: Sequence[Path | str]) -> list[CheckpointEntry]:
    """Every `.safetensors` under the roots (links leading outside them are skipped), sorted by run then step."""
    entries: dict[Path, CheckpointEntry] = {}
    seen_ids: set[str] = set()
    for root in resolve_roots(roots):
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.endswith(".safetensors") or name.startswith("."):
                    continue
                p = Path(dirpath) / name
                real = p.resolve()
                if not _inside(real, root) or not real.is_file() or real in entries:
                    continue
                rel = p.relative_to(root).as_posix()
                if rel in seen_ids:  # the same name under an earlier root wins (as in resolution)
                    continue
                if not looks_loadable(real):  # e.g. a run's resume state: listed, it would only fail to load
                    continue
                seen_ids.add(rel)
                meta = read_metadata(real)
                st = real.stat()
                run = Path(rel).parent.as_posix()
                entries[real] = CheckpointEntry(rel, real, root, run, _step_of(real, meta),
                                                str(meta["variant"]) if meta.get("variant") else None,
                                                st.st_mtime, st.st_size)
                if len(entries) >= MAX_LISTED:
                    break
    return sorted(entries.values(), key=lambda e: (e.run, e.step if e.step is not None else -1, e.id))


def resolve_checkpoint(name: str | os.PathLike | None, roots: Sequence[Path | str]) -> Path | None:
    """The resolved file for a checkpoint name, or None for ''/None (no checkpoint).

    Raises CheckpointAccessError when the name leaves the roots, is not a .safetensors file, or does not exist.
    """
    if name is None:
        return None
    if not isinstance(name, (str, os.PathLike)):
        raise CheckpointAccessError(f"checkpoint must be a path string, got {type(name).__name__}")
    text = os.fspath(name).strip()
    if not text or text.lower() in ("none", "(none)"):
        return None
    if "\x00" in text:
        raise CheckpointAccessError("checkpoint name contains a NUL byte")
    if len(text) > MAX_NAME_CHARS or any(len(part.encode("utf-8", "replace")) > 255 for part in Path(text).parts):
        raise CheckpointAccessError(f"refused a checkpoint name of {len(text)} characters: names are at most "
                                    f"{MAX_NAME_CHARS} characters and 255 bytes per folder or file name")
    resolved_roots = resolve_roots(roots)
    if not resolved_roots:
        raise CheckpointAccessError("no checkpoint roots are configured")
    given = Path(text).expanduser()
    candidates = [given] if given.is_absolute() else [r / given for r in resolved_roots] + [Path.cwd() / given]
    outside_file = False   # a candidate names an existing file outside the roots
    any_inside = False     # a candidate (existing or not) resolves inside a root
    for cand in candidates:
        try:
            real = cand.resolve()
        except (OSError, RuntimeError):  # symlink loops
            continue
        if not any(_inside(real, r) for r in resolved_roots):
            outside_file = outside_file or real.exists()
            continue
        any_inside = True
        if real.is_file():
            if real.suffix != ".safetensors":
                raise CheckpointAccessError(f"refused {text!r}: only .safetensors checkpoints can be loaded")
            return real
    roots_txt = ", ".join(str(r) for r in resolved_roots)
    if outside_file or not any_inside:
        raise CheckpointAccessError(f"refused {text!r}: checkpoints can only be loaded from inside the checkpoint "
                                    f"roots ({roots_txt})")
    if given.suffix != ".safetensors":
        raise CheckpointAccessError(f"refused {text!r}: only .safetensors checkpoints can be loaded")
    raise CheckpointAccessError(f"no checkpoint {text!r} under the checkpoint roots ({roots_txt}); press refresh")
