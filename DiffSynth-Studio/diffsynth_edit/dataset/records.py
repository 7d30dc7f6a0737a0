"""What the build's stages pass to each other: a discovered sample (`SampleSpec`), a reported issue (`Problem`) and
one sample's outcome (`SampleResult`); all picklable (they cross the worker pool)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Problem:
    """One reported issue. kind: error (bad input, sample dropped), filtered (dropped by a filter), warning."""

    kind: str
    reason: str
    file: str | None
    id: str | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason, "id": self.id, "file": self.file, "detail": self.detail}

    def format(self) -> str:
        who = f"[{self.id}] " if self.id else ""
        where = f" {self.file}:" if self.file else ""
        return f"{self.kind} {self.reason}: {who}{where.strip()} {self.detail}".replace("  ", " ")


def _err(reason: str, file: Path | str | None, ident: str | None, detail: str) -> Problem:
    return Problem("error", reason, None if file is None else str(file), ident, detail)


class SampleError(Exception):
    def __init__(self, problem: Problem):
        super().__init__(problem.format())
        self.problem = problem


@dataclass
class SampleSpec:
    """A discovered sample: its input files and text (picklable, sent to a worker)."""

    id: str
    source: Path
    target: Path
    mask: Path | None
    refs: tuple[Path, ...]
    instruction: str
    edit_type: str | None = None


@dataclass
class SampleResult:
    id: str
    status: str  # built | reused | filtered | error
    record: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
