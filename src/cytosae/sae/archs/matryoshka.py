"""matryoshka: a BatchTopK SAE whose nested prefixes of the dictionary must each reconstruct on their own
(Bussmann et al. 2025): the loss sums the reconstruction error of every prefix."""
from __future__ import annotations

from ..options import ConfigError, PositiveInt
from . import register
from .batchtopk import BatchTopKOptions, BatchTopKSAE


class MatryoshkaOptions(BatchTopKOptions):
    matryoshka_prefixes: list[PositiveInt] = []  # empty -> [n/64, n/16, n/4, n]


@register
class MatryoshkaSAE(BatchTopKSAE):
    arch = "matryoshka"
    Options = MatryoshkaOptions

    @classmethod
    def resolve_options(cls, values: dict, d_in: int, n_latents: int) -> dict:
        values = super().resolve_options(values, d_in, n_latents)
        p = list(values["matryoshka_prefixes"])
        if not p:
            n = n_latents
            p = sorted({max(1, n // 64), max(1, n // 16), max(1, n // 4), n})
        if p != sorted(set(p)) or p[-1] != n_latents:
            raise ConfigError("matryoshka_prefixes", f"must be increasing and end at n_latents={n_latents}, got {p}")
        return {**values, "matryoshka_prefixes": p}

    def _mse(self, x, x_hat, vals, cols, recon_of):
        mse = x.new_zeros(())
        for m in self.cfg.matryoshka_prefixes:
            xm = x_hat if m == self.cfg.n_latents else recon_of(vals * (cols < m))
            mse = mse + (xm - x).pow(2).sum(-1).mean()
        return mse
