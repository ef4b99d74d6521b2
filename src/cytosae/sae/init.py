"""Data-dependent initialisation: geometric median for b_dec, scale for input normalisation."""
from __future__ import annotations

import torch


def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-5, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to `points` (N, d).

    Robust to outlier tokens (unlike the mean), which is why CytoSAE/HugoFry use it for b_dec.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty (N, d) tensor, got shape {tuple(points.shape)}")
    p = points.double()
    y = p.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (p - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * p).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y.to(points.dtype)


def unit_mean_square_scale(sample: torch.Tensor) -> float:
    """Scalar s with E||s * x||^2 = 1 over the sample."""
    ms = float(sample.double().pow(2).sum(1).mean())
    if not ms > 0:
        raise ValueError("input normalisation: the first batches are all zeros (mean squared norm 0); "
                         "check the activation store")
    return ms ** -0.5
