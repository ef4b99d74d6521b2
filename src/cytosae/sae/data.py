"""Token streams for training: re-chunking to a fixed batch size and a bounded shuffle buffer."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

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
            # gather each batch from the buffer rather than permuting it whole: a second buffer-sized copy,
            # kept alive by the batches still in flight, used to double peak memory at every epoch's end
            order = torch.randperm(filled, generator=gen)
            for s in range(0, filled, batch_size):
                yield buf[order[s:s + batch_size]]


class EpochSource:
    """A dataset read `epochs` times, each time in a fresh deterministic order.

    `make(epoch)` returns that epoch's batches, exactly `tokens_per_epoch` tokens. Because an epoch's order
    depends only on its number, a resumed run starts at the epoch it stopped in without reading the
    epochs before it.
    """

    def __init__(self, make: Callable[[int], Iterable[torch.Tensor]], tokens_per_epoch: int, epochs: int) -> None:
        if tokens_per_epoch <= 0:
            raise ValueError(f"EpochSource: tokens_per_epoch must be positive, got {tokens_per_epoch}")
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        self.make, self.tokens_per_epoch, self.epochs = make, int(tokens_per_epoch), int(epochs)

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_epoch * self.epochs

    def stream(self, skip_tokens: int = 0) -> tuple[Iterator[torch.Tensor], int]:
        """(batches from the epoch holding token `skip_tokens` on, tokens still to skip inside that epoch)."""
        first = min(skip_tokens // self.tokens_per_epoch, self.epochs)
        return self._epochs(first), skip_tokens - first * self.tokens_per_epoch

    def _epochs(self, first: int) -> Iterator[torch.Tensor]:
        for epoch in range(first, self.epochs):
            n = 0
            for b in self.make(epoch):
                n += b.shape[0]
                yield b
            if n != self.tokens_per_epoch:  # skipping whole epochs on resume relies on this
                raise ValueError(f"epoch {epoch} yielded {n} tokens, expected {self.tokens_per_epoch}")


def store_epochs(store, epochs: int, tokens: str = "all", batch_size: int = 4096, seed: int = 0,
                 shuffle_tokens: int = 262_144) -> EpochSource:
    """Every token of an ActivationStore, `epochs` times: images in a new random order each epoch
    (all shards), then tokens mixed across images by a ShuffleBuffer of `shuffle_tokens` (0 = off)."""
    per_image = len(range(store.n_tokens)[store._token_slice(tokens)])

    def make(epoch: int) -> Iterable[torch.Tensor]:
        rows = store.iter_tokens_shuffled(epoch, seed=seed, tokens=tokens, batch_size=batch_size)
        if shuffle_tokens:
            rows = ShuffleBuffer(shuffle_tokens, seed=seed * 1_000_003 + epoch)(rows, batch_size=batch_size)
        return rows
    return EpochSource(make, store.n_images * per_image, epochs)


def prefetch(batches: Iterable[torch.Tensor], depth: int = 2, pin: bool = False) -> Iterator[torch.Tensor]:
    """Read the next `depth` batches in a background thread while the caller trains on the current one.

    Order is unchanged (one reader thread). An exception in the reader is raised in the caller.
    pin: page-lock each batch (in the thread) so a later `.to("cuda", non_blocking=True)` really is asynchronous.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        it = iter(batches)
        try:
            for b in it:
                if not put(("item", b.pin_memory() if pin else b)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who re-raises it
            put(("error", exc))
        finally:
            if hasattr(it, "close"):  # the source's own clean-up (open files) runs now, in its thread
                it.close()

    thread = threading.Thread(target=work, name="cytosae-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        # the reader must be finished before the caller moves on: a thread still inside torch when the
        # process (or its process group) shuts down aborts it
        stop.set()
        thread.join()
