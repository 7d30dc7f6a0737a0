"""Re-runs: each sample has a sidecar `<name>_files/meta/<id>.json` holding a key = hash(builder version, settings that
shape the outputs, id, instruction, edit_type, and the BYTES of every input file). When the key matches and every
output recorded in the sidecar still exists with its recorded size, the sample is reused without decoding. Content
hashing (not mtimes) means `touch` or a copy of the raw folders does not trigger work, while any edited input does.
Filter thresholds are not part of the key: the sidecar stores the measured mask area and background change, and
the filters are re-applied on every run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..atomic import atomic_write_bytes, json_text
from ..output_errors import OutputWriteError
from .build_config import BUILDER_VERSION, BuildSettings
from .records import SampleError, SampleSpec, _err


def _hash_inputs(spec: SampleSpec, st: BuildSettings) -> tuple[str, dict[str, bytes]]:
    h = hashlib.blake2b(digest_size=16)
    h.update(st.key().encode())
    h.update(json.dumps([spec.id, spec.instruction, spec.edit_type, spec.mask is None]).encode())
    data: dict[str, bytes] = {}
    roles = [("target", spec.target), ("source", spec.source)]
    if spec.mask is not None:
        roles.append(("mask", spec.mask))
    roles += [(f"ref_{i}", p) for i, p in enumerate(spec.refs, 1)]
    for role, path in roles:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise SampleError(_err("read_error", path, spec.id, f"cannot read: {e.strerror or e}")) from None
        data[role] = raw
        h.update(role.encode())
        h.update(hashlib.blake2b(raw, digest_size=16).digest())
    return h.hexdigest(), data


def _read_sidecar(path: Path, key: str) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or not isinstance(meta.get("stats"), dict):
        return None
    return meta


def _outputs_ok(outputs: dict[str, int], base_dir: Path) -> bool:
    for rel, size in outputs.items():
        try:
            if (base_dir / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _write_sidecar(st: BuildSettings, ident: str, key: str, stats: dict, record: dict | None,
                   outputs: dict[str, int]) -> None:
    meta = {"version": BUILDER_VERSION, "key": key, "stats": stats, "record": record, "outputs": outputs}
    path = st.meta_dir / f"{ident}.json"
    try:
        atomic_write_bytes(path, json_text(meta).encode(), fsync=False)
    except OSError as e:
        raise OutputWriteError.from_os_error(e, path) from None
