"""Token streams for training: re-chunking to a fixed batch size and a bounded shuffle buffer."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def _check(batch, d_in: int | None, i: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.ndim != 2 or (d_in is not None and batch.shape[1] != d_in):
        shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise ValueError(f"training batch {i}: expected a float tensor (batch, d_in={d_in}), got {shape}")
    return batch.float()


def rechunk(batches: Iterable[torch.Tensor], batch_size: int, d_in: int | None = None,
            skip_tokens: int = 0) -> Iterator[torch.Tensor]:
    """Yield (batch_size, d) tensors (the last may be smaller) from batches of any size.

    `skip_tokens` drops that many tokens from the start first: how a resumed run
    skips what it already trained on, given a deterministic stream.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    pending: list[torch.Tensor] = []
    n_pending = 0
    for i, b in enumerate(batches):
        b = _check(b, d_in, i)
        if skip_tokens:
            drop = min(skip_tokens, b.shape[0])
            b, skip_tokens = b[drop:], skip_tokens - drop
            if b.shape[0] == 0:
                continue
        pending.append(b)
        n_pending += b.shape[0]
        while n_pending >= batch_size:
            cat = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield cat[:batch_size]
            rest = cat[batch_size:]
            pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
    if n_pending:
        yield torch.cat(pending)


class ShuffleBuffer:
    """Bounded-memory shuffle: keeps `capacity` tokens, emits random ones as new tokens arrive.

    Store batches hold consecutive tokens of the same images; without mixing, each
    SAE step would see a handful of cells. Deterministic for a given seed and input.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity <= 0:
            raise ValueError(f"ShuffleBuffer capacity must be positive, got {capacity}")
        self.capacity, self.seed = capacity, seed

    def __call__(self, batches: Iterable[torch.Tensor], batch_size: int = 4096) -> Iterator[torch.Tensor]:
        # Fixed-size reservoir: each incoming batch evicts batch_size random slots, which are emitted.
        # O(batch) work per step; the buffer is never copied as a whole.
        gen = torch.Generator().manual_seed(self.seed)
        buf: torch.Tensor | None = None
        filled = 0
        for b in rechunk(batches, batch_size):
            if buf is None:
                buf = torch.empty(self.capacity, b.shape[1], dtype=b.dtype)
            take = min(self.capacity - filled, b.shape[0])
            if take:
                buf[filled:filled + take] = b[:take]
                filled += take
                b = b[take:]
            if b.shape[0]:
                slots = torch.randperm(self.capacity, generator=gen)[: b.shape[0]]
                out = buf[slots]
                buf[slots] = b
                yield out
        if buf is not None and filled:
            rest = buf[:filled][torch.randperm(filled, generator=gen)]
            for s in range(0, filled, batch_size):
                yield rest[s:s + batch_size]
