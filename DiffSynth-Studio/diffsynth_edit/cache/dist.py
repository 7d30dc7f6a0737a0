"""Rank, world size and device of a cache run (`accelerate launch` with any backend, or one process)."""
from __future__ import annotations

import os
from typing import Any

import torch


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
