"""evaluate_sae: reconstruction and sparsity figures over a token stream or an activation store."""
from __future__ import annotations

from typing import Iterable

import torch

from .kernels import positive_counts
from .model import SAE

DENSE_FIRING_RATE = 0.10  # a latent firing on more than 10% of tokens is counted as dense


def fvu_warnings(fvu: dict[str, float], on: str) -> list[str]:
    """One line per token group (cls, patch) the SAE reconstructs worse than the dataset-mean token (FVU > 1):
    its figures there are no concept of that group, however good the other group's are."""
    return [f"warning: the SAE does not represent the {'CLS token' if g == 'cls' else 'patch tokens'} (FVU {v:.3g} "
            f"> 1 on {on}: worse than the dataset-mean token)" for g, v in fvu.items() if g in ("cls", "patch") and v > 1]


class _Acc:
    """Streaming sums for one token group (exact, in float64)."""

    def __init__(self, d: int, n: int, device: torch.device | str = "cpu") -> None:
        self.tokens = 0
        z = dict(dtype=torch.float64, device=device)  # sums stay on the SAE's device: no copy per batch
        self.sum_x = torch.zeros(d, **z)
        self.sum_x2 = torch.zeros((), **z)
        self.sse = torch.zeros((), **z)
        self.cos = torch.zeros((), **z)
        self.shrink = torch.zeros((), **z)
        self.l0 = torch.zeros((), **z)
        self.fire_counts = torch.zeros(n, **z)

    def add(self, x: torch.Tensor, z: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.tokens += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_x2 += x.pow(2).sum()
        self.sse += (x - x_hat).pow(2).sum()
        self.cos += torch.nn.functional.cosine_similarity(x, x_hat, dim=1, eps=1e-12).sum()
        self.shrink += (x_hat.norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).sum()
        counts = positive_counts(z)  # activations are >= 0: the non-zeros are the positives
        self.l0 += counts.sum()
        self.fire_counts += counts

    def result(self) -> dict:
        n = self.tokens
        if n == 0:
            return {"tokens": 0}
        total_var = float(self.sum_x2 - self.sum_x.pow(2).sum() / n)
        fvu = float(self.sse) / total_var if total_var > 0 else float("nan")
        rate = self.fire_counts / n
        return {"tokens": n, "fvu": fvu, "explained_variance": 1.0 - fvu, "mse": float(self.sse) / (n * self.sum_x.numel()),
                "cosine_similarity": float(self.cos) / n, "l0": float(self.l0) / n,
                "dead_fraction": float((rate == 0).double().mean()),
                "dense_fraction": float((rate > DENSE_FIRING_RATE).double().mean()),
                "shrinkage": float(self.shrink) / n}


@torch.no_grad()
def evaluate_sae(sae: SAE, data, max_tokens: int | None = None, batch_size: int = 4096,
                 max_images: int | None = None) -> dict:
    """Measure an SAE on raw store-unit tokens.

    data: an iterable of (N, d_in) tensors, or an ActivationStore (anything with iter_images), in which
      case figures are also given separately for the CLS token (token 0) and the patch tokens.
    Returns {"all": {...}, ["cls": {...}, "patch": {...}], "definitions": {...}}; every group has tokens,
    fvu, explained_variance, mse (per element), cosine_similarity, l0, dead_fraction, dense_fraction, shrinkage.
    """
    sae = sae.eval()
    d, n = sae.cfg.d_in, sae.cfg.n_latents
    dev = sae.W_enc.device  # inputs are moved to the SAE's device
    groups = {"all": _Acc(d, n, dev)}
    if hasattr(data, "iter_images"):
        has_cls = bool(getattr(data, "has_cls", True))
        if has_cls:
            groups.update(cls=_Acc(d, n, dev), patch=_Acc(d, n, dev))
        images = 0
        for _, toks in data.iter_images(batch_size=max(1, batch_size // max(1, data.n_tokens))):
            b, t, _ = toks.shape
            flat = toks.reshape(b * t, -1).to(dev, non_blocking=True).float()
            z = sae.encode(flat)
            x_hat = sae.decode(z)
            groups["all"].add(flat, z, x_hat)
            if has_cls:
                cls_rows = torch.arange(b, device=dev) * t
                patch = torch.ones(b * t, dtype=torch.bool, device=dev)
                patch[cls_rows] = False
                groups["cls"].add(flat[cls_rows], z[cls_rows], x_hat[cls_rows])
                groups["patch"].add(flat[patch], z[patch], x_hat[patch])
            images += b
            if max_images is not None and images >= max_images:
                break
    else:
        for i, x in enumerate(data):
            if x.ndim != 2 or x.shape[1] != d:
                raise ValueError(f"evaluate_sae: batch {i} has shape {tuple(x.shape)}, expected (N, {d})")
            x = x.to(dev, non_blocking=True).float()
            z = sae.encode(x)
            groups["all"].add(x, z, sae.decode(z))
            if max_tokens is not None and groups["all"].tokens >= max_tokens:
                break
    if groups["all"].tokens == 0:
        raise ValueError("evaluate_sae: no tokens to evaluate on (empty data)")
    out = {k: g.result() for k, g in groups.items()}
    out["definitions"] = {
        "fvu": "sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the tokens (raw store units)",
        "mse": "mean squared error per element", "l0": "mean number of latents > 0 per token",
        "dead_fraction": "latents that never fired on these tokens",
        "dense_fraction": f"latents firing on more than {DENSE_FIRING_RATE:.0%} of these tokens",
        "shrinkage": "mean ||x_hat|| / ||x|| per token", "cosine_similarity": "mean cos(x, x_hat) per token",
        "encoder": f"{sae.cfg.arch} inference encoder ({'JumpReLU with learned threshold' if sae.cfg.arch in ('batchtopk', 'matryoshka') else sae.cfg.arch})",
    }
    return out
