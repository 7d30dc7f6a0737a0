"""Frozen DiT blocks kept in (pinned) host memory and moved to the GPU just ahead of use, on a side CUDA stream.

`BlockSwapper.attach(dit, n)` swaps the last `n` transformer blocks. Only their frozen tensors move (base weights,
fp8 weights and scales, norms, biases); trainable tensors (LoRA A/B) stay on the GPU, where their gradients and
optimizer state live. A swapped-out tensor is an empty placeholder, so a forward that ran on a block that is not
resident fails loudly instead of computing with stale numbers.

Schedule (forward pre/post hooks on each block; `torch._C._current_autograd_node()` tells a recompute inside the
backward from an ordinary forward):
- forward: entering block i waits for i's copy and starts the copy of i+1; leaving a swapped block frees it, except
  the last block, which the backward needs first.
- backward with gradient checkpointing: the autograd engine recomputes block i's forward right before its backward;
  entering it starts the copy of i-1 and frees the swapped blocks above i (their backward has run: the engine
  finishes all of block i+1's nodes before any node of block i becomes the highest-priority ready node).
Because a swapped block is freed after its forward, it must not keep tensors for the backward: swapped blocks must
run under (non-reentrant) gradient checkpointing when gradients are on. `TrainConfig.validate` enforces that.

The last blocks are the ones swapped: the forward ends and the backward begins with them, so the turn-around block
stays resident, and the next step's forward prefetches the first swapped block during the resident blocks' compute.
Host copies are pinned when CUDA is there, so the copies are asynchronous; on the CPU (tests) a "copy" is a clone
and the placeholder logic is the same. Each step moves every swapped block twice (forward and recompute): with fp8
blocks (0.34 GB each) that is ~7 ms per block per pass at PCIe 5 speeds, hidden behind the block's compute.
"""
from __future__ import annotations

import torch


class _SwappedBlock:
    """One block's frozen tensors: the module's own tensor objects (kept, so hooks and names stay valid) and their
    host copies."""

    def __init__(self, block: torch.nn.Module, device: torch.device):
        self.tensors: list[torch.Tensor] = []
        self.host: list[torch.Tensor] = []
        pin = device.type == "cuda"
        for t in list(block.parameters()) + list(block.buffers()):
            if t.requires_grad or t.numel() == 0:
                if t.requires_grad and t.device != device:
                    t.data = t.data.to(device)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            host.copy_(t.data)
            self.tensors.append(t)
            self.host.append(host)
            t.data = torch.empty(0, dtype=t.dtype, device=device)
        self.resident = False
        self.ready: torch.cuda.Event | None = None

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.host)


class BlockSwapper:
    """Keeps the last `n` blocks of `blocks` on the host and schedules their copies (see the module docstring)."""

    def __init__(self, blocks: torch.nn.ModuleList, n: int, device: torch.device | str):
        if not 0 <= n <= len(blocks):
            raise ValueError(f"cannot swap {n} of {len(blocks)} blocks")
        self.device = torch.device(device)
        self.first = len(blocks) - n
        self.n_blocks = len(blocks)
        self.swapped = {i: _SwappedBlock(blocks[i], self.device) for i in range(self.first, len(blocks))}
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.log: list[tuple[str, int]] = []  # ("load"/"free"/"run", block): the schedule, for tests
        self.record = False
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._make_pre_hook(i)))
            self.handles.append(block.register_forward_hook(self._make_post_hook(i)))

    @classmethod
    def attach(cls, owner: torch.nn.Module, n: int, device: torch.device | str,
               blocks: torch.nn.ModuleList | None = None) -> "BlockSwapper | None":
        """Swap the last `n` of `blocks` (default: `owner.transformer_blocks`), the swapper kept alive on
        `owner._block_swapper`. A swapper already there is detached first (its blocks back on the device), so
        attaching again replaces it instead of stacking hooks; `n = 0` only detaches (returns None)."""
        old = getattr(owner, "_block_swapper", None)
        if old is not None:
            old.detach()
            del owner._block_swapper
        if not n:
            return None
        swapper = cls(owner.transformer_blocks if blocks is None else blocks, n, device)
        owner._block_swapper = swapper
        return swapper

    # ---- moves ----------------------------------------------------------------------------------------------------
    def load(self, i: int) -> None:
        """Start the copy of block i (no-op if resident or not swapped). The destination is allocated on the compute
        stream and the copy stream waits for the compute stream's queued work first: memory the caching allocator
        hands back may still be read by kernels queued before this call."""
        sb = self.swapped.get(i)
        if sb is None or sb.resident:
            return
        targets = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in sb.host]
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                for dst, src in zip(targets, sb.host):
                    dst.copy_(src, non_blocking=True)
                sb.ready = torch.cuda.Event()
                sb.ready.record(self.stream)
        else:
            for dst, src in zip(targets, sb.host):
                dst.copy_(src)
        for t, dst in zip(sb.tensors, targets):
            t.data = dst
        sb.resident = True
        self._note("load", i)

    def wait(self, i: int) -> None:
        """Block i is usable on the compute stream from here on (loads it now if no prefetch started)."""
        sb = self.swapped.get(i)
        if sb is None:
            return
        self.load(i)
        if sb.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(sb.ready)
            sb.ready = None

    def free(self, i: int) -> None:
        """Drop block i's device copy. Kernels already queued on the compute stream keep their memory valid: the
        caching allocator reuses it only in stream order."""
        sb = self.swapped.get(i)
        if sb is None or not sb.resident:
            return
        if sb.ready is not None:  # prefetched but never used: the copy must land before the memory is reused
            torch.cuda.current_stream(self.device).wait_event(sb.ready)
            sb.ready = None
        for t in sb.tensors:
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        sb.resident = False
        self._note("free", i)

    def resident_blocks(self) -> list[int]:
        return [i for i, sb in self.swapped.items() if sb.resident]

    def host_bytes(self) -> int:
        return sum(sb.nbytes() for sb in self.swapped.values())

    def _note(self, what: str, i: int) -> None:
        if self.record:
            self.log.append((what, i))

    # ---- hooks ----------------------------------------------------------------------------------------------------
    def _make_pre_hook(self, i: int):
        def pre_hook(module, args):
            in_backward = torch._C._current_autograd_node() is not None
            self.wait(i)
            if in_backward:  # recompute of block i: blocks above have finished their backward
                for j in self.resident_blocks():
                    if j > i:
                        self.free(j)
                self.load(i - 1)
            elif i + 1 < self.n_blocks:
                self.load(i + 1)
            self._note("run", i)
        return pre_hook

    def _make_post_hook(self, i: int):
        def post_hook(module, args, output):
            if torch._C._current_autograd_node() is None and i != self.n_blocks - 1:
                self.free(i)
        return post_hook

    def detach(self) -> None:
        """Remove the hooks and bring every block back to the device (tests, or turning swapping off)."""
        for h in self.handles:
            h.remove()
        for i in self.swapped:
            self.wait(i)
