"""The SAE as the explorer needs it: encode tokens, and the decoder rows for neighbours.

Uses `cytosae.SAE` (src/cytosae/sae) when it is importable. Until then, and for SAE
folders written by other tools, a minimal reader of the same files
(sae.safetensors: W_enc, b_enc, W_dec, b_dec; config.json: arch, d_in, n_latents, k)
computes the standard ReLU / TopK encoder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


def _decoder_rows(w: np.ndarray, n_latents: int) -> np.ndarray:
    """W_dec as (n_latents, d_in) whichever way round it was saved."""
    if w.ndim != 2:
        raise ValueError(f"W_dec must be 2-D, got shape {w.shape}")
    if w.shape[0] == n_latents:
        return w
    if w.shape[1] == n_latents:
        return w.T
    raise ValueError(f"W_dec shape {w.shape} does not match n_latents={n_latents}")


def read_decoder(sae_dir: Path) -> np.ndarray:
    """(n_latents, d_in) float32 decoder rows, read straight from sae.safetensors (no model build)."""
    cfg = json.loads((sae_dir / "config.json").read_text())
    with safe_open(sae_dir / "sae.safetensors", framework="np") as fh:
        keys = list(fh.keys())
        key = next((k for k in keys if k == "W_dec"), None) or next(
            (k for k in keys if k.endswith("W_dec") or k.endswith("decoder.weight")), None)
        if key is None:
            raise KeyError(f"{sae_dir / 'sae.safetensors'} has no W_dec tensor (it has {keys})")
        w = fh.get_tensor(key)
    return np.ascontiguousarray(_decoder_rows(w.astype(np.float32, copy=False), int(cfg["n_latents"])))


class _MinimalSAE:
    """ReLU or TopK encoder from the raw tensors, for when cytosae.SAE is not available."""

    def __init__(self, sae_dir: Path) -> None:
        self.cfg = json.loads((sae_dir / "config.json").read_text())
        with safe_open(sae_dir / "sae.safetensors", framework="pt") as fh:
            t = {k: fh.get_tensor(k).float() for k in fh.keys()}
        n, d = int(self.cfg["n_latents"]), int(self.cfg["d_in"])
        w_enc = t["W_enc"]
        self.w_enc = w_enc if w_enc.shape == (d, n) else w_enc.T
        self.b_enc = t.get("b_enc", torch.zeros(n))
        self.b_dec = t.get("b_dec", torch.zeros(d))
        self.arch = str(self.cfg.get("arch", "relu")).lower()
        self.k = int(self.cfg.get("k") or self.cfg.get("arch_options", {}).get("k", 0) or 0)

    @property
    def independent_latents(self) -> bool:
        """True when a latent's activation depends only on its own pre-activation (not TopK)."""
        return not self.arch.startswith("topk")

    @torch.no_grad()
    def encode_latent(self, x: torch.Tensor, latent: int) -> torch.Tensor:
        """(N,) activations of one latent: one column of the encoder instead of all 49k."""
        if not self.independent_latents:
            return self.encode(x)[:, latent]
        return torch.relu((x - self.b_dec) @ self.w_enc[:, latent] + self.b_enc[latent])

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu((x - self.b_dec) @ self.w_enc + self.b_enc)
        if self.arch.startswith("topk") and 0 < self.k < z.shape[1]:
            vals, idx = z.topk(self.k, dim=1)
            z = torch.zeros_like(z).scatter_(1, idx, vals)
        return z


def load_sae(sae_dir: Path):
    """An object with `.encode(x (N, d_in)) -> (N, n_latents)`."""
    if not (sae_dir / "sae.safetensors").is_file() or not (sae_dir / "config.json").is_file():
        raise FileNotFoundError(f"{sae_dir} has no sae.safetensors + config.json: train an SAE with `cytosae train`")
    try:
        from cytosae.sae import SAE  # the package's own implementation, once present
    except ImportError:
        return _MinimalSAE(sae_dir)
    try:
        sae = SAE.load(sae_dir)
    except Exception as exc:
        # files from another tool (raw W_enc/b_enc/W_dec/b_dec) that cytosae.SAE does not read
        with safe_open(sae_dir / "sae.safetensors", framework="np") as fh:
            raw = {"W_enc", "W_dec"} <= set(fh.keys())
        if not raw:
            raise ValueError(f"{sae_dir} could not be loaded as an SAE: {exc}") from exc
        log.warning("cytosae.SAE could not load %s (%s); using the raw ReLU/TopK tensors", sae_dir, exc)
        return _MinimalSAE(sae_dir)
    if hasattr(sae, "eval"):
        sae.eval()
    return sae
