"""Batches from the cache: shape buckets (batch > 1 only within equal shapes), deterministic order per epoch,
disjoint shares per rank, and a resumable position."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..cache.store import CacheIndex, CachedSample
from ..encoding import pad_prompts


def bucket_key(index: CacheIndex, i: int) -> tuple:
    e = index.entries[i]
    return (tuple(e.size), tuple(e.sub_size), tuple(tuple(x) for x in e.edit_sizes) or e.num_edit)


def epoch_batches(index: CacheIndex, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """All batches of one epoch, shuffled by (seed, epoch). Batch 1 works with any shape; larger batches are cut
    within buckets of equal shapes (a bucket's remainder forms a smaller batch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    buckets: dict[tuple, list[int]] = {}
    for i in range(len(index)):
        buckets.setdefault(bucket_key(index, i), []).append(i)
    batches = []
    for key in sorted(buckets):
        ids = buckets[key]
        rng.shuffle(ids)
        batches += [ids[j:j + batch_size] for j in range(0, len(ids), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # index into this rank's batch list of the epoch


class BatchStream:
    """Infinite stream of this rank's batches with a position that can be saved and restored."""

    def __init__(self, index: CacheIndex, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.index, self.batch_size, self.seed, self.rank, self.world = index, batch_size, seed, rank, world
        self.position = DataPosition()
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = epoch_batches(self.index, self.batch_size, self.seed, epoch)
            usable = len(batches) - len(batches) % self.world if len(batches) >= self.world else len(batches)
            mine = batches[:usable][self.rank::self.world] or batches[self.rank % len(batches)::len(batches)]
            self._epoch_cache = (epoch, mine)
        return self._epoch_cache[1]

    def next(self) -> tuple[list[int], int]:
        """(sample indices, epoch) of the next batch; advances the position."""
        batches = self._rank_batches(self.position.epoch)
        if self.position.batch >= len(batches):
            self.position = DataPosition(self.position.epoch + 1, 0)
            batches = self._rank_batches(self.position.epoch)
        out = batches[self.position.batch]
        epoch = self.position.epoch
        self.position = DataPosition(epoch, self.position.batch + 1)
        return out, epoch

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition(int(state["epoch"]), int(state["batch"]))


def sample_generator(seed: int, epoch: int, sample_index: int) -> torch.Generator:
    """Per-sample RNG: noise, timestep and prompt dropout depend only on (seed, epoch, sample), so runs are
    reproducible under resume and under any split of a batch into micro-batches."""
    return torch.Generator("cpu").manual_seed((seed * 7_919 + epoch * 104_729 + sample_index * 1_299_709) % (2 ** 63))


def collate(samples: list[CachedSample], use_negative: list[bool], device: torch.device | str = "cpu") -> dict:
    """Stack equal-shaped samples onto `device`; prompts padded; `use_negative[i]` swaps in the cached empty-prompt
    embedding."""
    embs, masks = [], []
    for s, neg in zip(samples, use_negative):
        e, m = (s.nega_prompt_emb, s.nega_prompt_emb_mask) if neg else (s.prompt_emb, s.prompt_emb_mask)
        embs.append(e[None])
        masks.append(m[None].long())
    prompt_emb, prompt_mask = pad_prompts(embs, masks)
    n_edit = len(samples[0].edit_latents)

    def stack(tensors) -> torch.Tensor:
        return torch.stack(list(tensors)).to(device)

    return {
        "ids": [s.id for s in samples],
        "input_latents": stack(s.input_latents for s in samples),
        "edit_latents": [stack(s.edit_latents[k] for s in samples) for k in range(n_edit)],
        "prompt_emb": prompt_emb.to(device),
        "prompt_emb_mask": prompt_mask.to(device),
        "sub_input_latents": stack(s.sub_input_latents for s in samples),
        "sub_noise": stack(s.sub_noise for s in samples),
        "mask_latent": stack(s.mask_latent for s in samples),
        "subyx": stack(s.subyx.long() for s in samples),
    }
