"""Nearest latents by cosine similarity of decoder rows (the directions latents write into the residual stream).

Rows are normalised once; a query is one (n_latents x d) mat-vec (~40 MFLOP for 49k x 768, but it reads the
whole 150 MB decoder: ~15-40 ms), then argpartition. `precompute()` (run in the background when the explorer
starts) finds the top PRECOMPUTED of every latent with blocked matrix products, after which a query is a lookup.
"""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

from .sae_adapter import read_decoder


class Neighbours:
    def __init__(self, decoder_rows: np.ndarray) -> None:
        w = np.asarray(decoder_rows, dtype=np.float32)
        norms = np.linalg.norm(w, axis=1, keepdims=True)
        self.dead = (norms[:, 0] == 0)
        self.unit = w / np.where(norms == 0, 1, norms)
        self.query = lru_cache(maxsize=4096)(self._query)
        self._table: tuple[np.ndarray, np.ndarray] | None = None

    def precompute(self, k: int = 32, block: int = 512) -> None:
        """Top-k neighbours of every latent (same ranking as a query), so queries become lookups."""
        import torch

        u = torch.from_numpy(self.unit)
        n = self.n_latents
        k = min(k, n - 1)
        if k <= 0:
            return
        idx = np.empty((n, k), np.int32)
        val = np.empty((n, k), np.float32)
        with torch.inference_mode():
            for s in range(0, n, block):  # block x n similarities at a time: bounded memory (100 MB at 49k latents)
                sims = u[s:s + block] @ u.T
                rows = torch.arange(sims.shape[0])
                sims[rows, rows + s] = -float("inf")
                v, i = sims.topk(k, dim=1)
                idx[s:s + block], val[s:s + block] = i.numpy(), v.numpy()
        self._table = (idx, val)

    @classmethod
    def from_sae_dir(cls, sae_dir) -> "Neighbours":
        return cls(read_decoder(sae_dir))

    @property
    def n_latents(self) -> int:
        return self.unit.shape[0]

    def _query(self, latent: int, k: int = 10) -> tuple[tuple[int, float], ...]:
        table = self._table
        if table is not None and k <= table[0].shape[1]:
            return tuple((int(j), float(s)) for j, s in zip(table[0][latent, :k], table[1][latent, :k]))
        sims = self.unit @ self.unit[latent]
        sims[latent] = -np.inf
        k = min(k, self.n_latents - 1)
        if k <= 0:
            return ()
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return tuple((int(j), float(sims[j])) for j in top)


class LazyNeighbours:
    """Loads the decoder on first use, so starting the explorer stays fast."""

    def __init__(self, run) -> None:
        self.run = run
        self._n: Neighbours | None = None
        self._lock = threading.Lock()

    def precompute(self) -> None:
        self.get().precompute()

    @property
    def precomputed(self) -> bool:
        """Whether every latent's neighbours are a lookup now (the background precomputation has finished)."""
        return self._n is not None and self._n._table is not None

    def get(self) -> Neighbours:
        with self._lock:
            if self._n is None:
                self._n = self.run.open_sae(Neighbours.from_sae_dir)
            return self._n
