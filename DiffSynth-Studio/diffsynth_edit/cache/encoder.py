"""The device side of a cache run: `SampleEncoder` (VAE and text encoder over a batch of prepared samples)."""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..geometry import binarize_mask
from .samples import SUB_KEY, _Prepared
from .store import NEGA_PREFIX, NEGA_TAIL


class SampleEncoder:
    """Encodes prepared samples with the shared encoding functions; VAE calls batched over same-shape images.

    On CUDA the sub crops and their white images are encoded by a side thread on its own stream (`side_thread`).
    A crop has the mask box's size, new with nearly every sample, and for a new size cuDNN builds its convolution
    plans on the host (~50 ms per new size for this VAE, H100: `bench/bench_new_shapes.py`); torch releases the GIL
    inside its ops, so that host work overlaps the main thread's VAE and text-encoder calls. Same kernels, same
    numbers."""

    def __init__(self, pipe, dtype: torch.dtype, batch_size: int, compile_vae: bool = False,
                 log: Callable[[str], None] = print, side_thread: bool | None = None):
        self.pipe, self.dtype, self.batch_size, self.log = pipe, dtype, batch_size, log
        self._white: dict[tuple[int, int], torch.Tensor] = {}
        on_cuda = torch.device(pipe.device).type == "cuda"
        self.compiled_vae = compile_vae and on_cuda
        if self.compiled_vae:
            from ..speedups import compile_vae as compile_

            compile_(pipe.vae, encoder=True)
        # a compiled VAE stays on one thread (compiling from two threads at once is not supported)
        side = (on_cuda if side_thread is None else side_thread) and not self.compiled_vae
        self._side_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-sub-vae") if side else None
        self._side_stream = torch.cuda.Stream(device=pipe.device) if side and on_cuda else None

    def close(self) -> None:
        if self._side_pool is not None:
            self._side_pool.shutdown(wait=True)

    def _vae_encode(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        from ..encoding import vae_encode_uint8

        try:
            return vae_encode_uint8(self.pipe, pixels)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not end a long run
            if not self.compiled_vae:
                raise
            from ..speedups import uncompile_vae

            uncompile_vae(self.pipe.vae)
            self.compiled_vae = False
            self.log(f"compiled VAE failed ({type(e).__name__}: {str(e)[:200]}); continuing eager "
                     "(set compile_vae = false to skip compiling)")
            return vae_encode_uint8(self.pipe, pixels)

    def white(self, width: int, height: int) -> torch.Tensor:
        """Latents of a white image of this size, computed once per shape and reused."""
        from ..encoding import white_latents

        key = (width, height)
        if key not in self._white:
            self._white[key] = self._store(white_latents(self.pipe, width, height)[0])
        return self._white[key]

    def _store(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=self.dtype).contiguous()

    def _encode_batched(self, jobs: list[tuple[Any, torch.Tensor]]) -> list[tuple[Any, torch.Tensor]]:
        """(tag, latents on the device) for each (tag, uint8 image) of `jobs`: same-size images share VAE calls of up
        to `batch_size` images."""
        groups: dict[tuple[int, ...], list[tuple[Any, torch.Tensor]]] = {}
        for tag, px in jobs:
            groups.setdefault(tuple(px.shape), []).append((tag, px))
        out: list[tuple[Any, torch.Tensor]] = []
        for group in groups.values():
            for j in range(0, len(group), self.batch_size):
                chunk = group[j:j + self.batch_size]
                lat = self._vae_encode([px for _, px in chunk])
                out += [(tag, lat[i]) for i, (tag, _) in enumerate(chunk)]
        return out

    @torch.no_grad()
    def _encode_subs(self, samples: list[_Prepared]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(sub-crop latents, white latents) of each sample, on the CPU; same-size crops batched."""
        stream = torch.cuda.stream(self._side_stream) if self._side_stream is not None else contextlib.nullcontext()
        with stream:
            lats = dict(self._encode_batched([(n, px) for n, s in enumerate(samples)
                                              for _, px in s.vae_inputs(sub=True)]))
            return [(self._store(lats[n]), self.white(s.box.width, s.box.height)) for n, s in enumerate(samples)]

    @torch.no_grad()
    def encode(self, samples: list[_Prepared]) -> list[dict[str, torch.Tensor]]:
        """Tensors of each sample. VAE: every image of every sample in `samples`, grouped by size, `batch_size`
        images per call (`encoding.vae_encode_uint8` = `encoding.vae_encode` on uint8 input). Prompt and empty
        negative: `encoding.encode_prompt_pairs` (one text-encoder call for all samples; the negative stored as prefix
        length + tail)."""
        from ..speedups import sdpa_any_length

        # torch's attention-backend flags are process-wide and the text encoder switches cuDNN's off while it runs
        # (`speedups.sdpa_any_length`): the whole step runs with it off, so the side thread's VAE never sees a flag
        # change halfway
        with sdpa_any_length():
            side = self._side_pool.submit(self._encode_subs, samples) if self._side_pool is not None else None
            try:
                out = self._encode_main(samples)
            finally:
                if side is not None:
                    wait([side])  # the side thread is done with these samples before anything else is encoded
            subs = side.result() if side is not None else self._encode_subs(samples)
        for o, (sub, white) in zip(out, subs):
            o[SUB_KEY], o["sub_noise"] = sub, white.clone()
        return out

    def _encode_main(self, samples: list[_Prepared]) -> list[dict[str, torch.Tensor]]:
        """Everything but the sub crops: target, source and reference latents, the prompt pair, mask, sizes."""
        from ..encoding import encode_prompt_pairs, prompt_inputs

        out: list[dict[str, torch.Tensor]] = [{} for _ in samples]
        lats = self._encode_batched([((n, key), px) for n, s in enumerate(samples)
                                     for key, px in s.vae_inputs(sub=False)])
        # one device->host copy per tensor after all VAE calls were queued (no sync between VAE calls)
        for (n, key), lat in lats:
            out[n][key] = self._store(lat)
        pairs = encode_prompt_pairs(self.pipe, [
            s.prompt_inputs or prompt_inputs(self.pipe, [s.item.prompt, ""], [s.source, *s.refs]) for s in samples])
        for n, (s, pair) in enumerate(zip(samples, pairs)):
            emb, mask = pair.emb, pair.mask
            w, h = s.source.size
            if s.mask is None:
                mask_latent = torch.ones(1, h // 8, w // 8)
            else:
                m = torch.from_numpy(binarize_mask(s.mask).astype("float32"))[None, None]
                mask_latent = F.avg_pool2d(m, 8)[0]
            out[n].update({
                "prompt_emb": self._store(emb[0]), "prompt_emb_mask": mask[0].to("cpu", torch.int64).contiguous(),
                NEGA_TAIL: self._store(pair.nega_tail[0]),
                NEGA_PREFIX: torch.tensor([pair.nega_prefix], dtype=torch.int64),
                "nega_prompt_emb_mask": pair.nega_mask[0].to("cpu", torch.int64).contiguous(),
                "mask_latent": mask_latent.float().contiguous(),
                "subyx": torch.tensor(s.box.to_subyx(), dtype=torch.int64),
                "size": torch.tensor([h, w], dtype=torch.int64),
            })
        return out


def _encode_isolated(encoder: SampleEncoder, batch: list[_Prepared], on_done) -> list[tuple[_Prepared, dict]]:
    """Encode a batch; if it fails, encode its samples one by one so one bad sample does not sink the others."""
    try:
        return list(zip(batch, encoder.encode(batch)))
    except Exception as e:
        if len(batch) == 1:
            on_done(batch[0].item, None, f"cannot encode: {type(e).__name__}: {e}")
            return []
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out = []
    for s in batch:
        out += _encode_isolated(encoder, [s], on_done)
    return out
