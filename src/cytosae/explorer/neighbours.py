"""Nearest latents by cosine similarity of decoder rows (the directions latents write into the residual stream).

Rows are normalised once; a query is one (n_latents x d) mat-vec (~40 MFLOP for 49k x 768),
then argpartition. Results are memoised per latent.
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

    @classmethod
    def from_sae_dir(cls, sae_dir) -> "Neighbours":
        return cls(read_decoder(sae_dir))

    @property
    def n_latents(self) -> int:
        return self.unit.shape[0]

    def _query(self, latent: int, k: int = 10) -> tuple[tuple[int, float], ...]:
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

    def get(self) -> Neighbours:
        with self._lock:
            if self._n is None:
                self._n = self.run.open_sae(Neighbours.from_sae_dir)
            return self._n
