"""The SAE as the explorer needs it: encode tokens, and the decoder rows for neighbours.

Encoding goes through the package's one SAE (`cytosae.sae.SAE.load`): input_scale, learned
thresholds and every architecture behave exactly as in training and analysis. SAEs from other
tools are converted first (`cytosae import-cytosae`). The decoder rows are read straight from the
file for neighbours, which needs no model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open


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
    """(n_latents, d_in) float32 decoder rows, read straight from sae.safetensors (no model build). config.json is
    checked as SAE.load checks it (sae.model.read_config): an edited config is refused here too."""
    from cytosae.sae.model import read_config

    cfg = read_config(sae_dir)
    with safe_open(sae_dir / "sae.safetensors", framework="np") as fh:
        keys = list(fh.keys())
        key = next((k for k in keys if k == "W_dec"), None) or next(
            (k for k in keys if k.endswith("W_dec") or k.endswith("decoder.weight")), None)
        if key is None:
            raise KeyError(f"{sae_dir / 'sae.safetensors'} has no W_dec tensor (it has {keys})")
        w = fh.get_tensor(key)
    return np.ascontiguousarray(_decoder_rows(w.astype(np.float32, copy=False), int(cfg["n_latents"])))


def load_sae(sae_dir: Path, device: str = "cpu"):
    """The run's SAE through the package's own class (cytosae.sae.SAE), in eval mode on `device`."""
    from cytosae.sae import SAE

    return SAE.load(sae_dir, device=device)
