"""What a cache run reports: the failed samples and the summary printed at the end."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
