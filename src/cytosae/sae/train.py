"""train_sae: the one-call training API (resumable, NaN-safe, optionally data-parallel); see trainer.Trainer."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from .config import SAEConfig
from .data import EpochSource
from .model import SAE
from .trainer import Trainer, TrainingDiverged, lr_factor as _lr_factor  # noqa: F401 - re-exported


def train_sae(
    batches: Iterable[torch.Tensor] | EpochSource,
    d_in: int,
    arch: str,
    n_latents: int,
    total_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = 4096,
    lr: float | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    log_every: int = 50,
    logger: Callable[[int, dict], None] | None = None,
    max_tokens_this_run: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    **arch_options,
) -> SAE:
    """Train an SAE on a deterministic stream of (batch, d_in) float tensors.

    batches: an iterable of (N, d_in) tensors, or an EpochSource (e.g. `store_epochs(store, epochs=3)`) that
      reads a dataset several times in a fresh order each epoch.
    total_tokens: tokens to train on (not images; x257 per image when training on all tokens); None with an
      EpochSource = all its epochs. More tokens than the data holds is an error.
    checkpoint_dir: if it holds a training_state/ from the same arguments, training resumes there,
      skipping the tokens already consumed; the final SAE is written there too (sae.safetensors + config.json).
    checkpoint_every: tokens between checkpoints (needs checkpoint_dir).
    max_tokens_this_run: stop (after checkpointing) once this run has trained on this many tokens.
    logger: called as logger(step, metrics) every log_every steps.
    device: cpu | cuda | cuda:N | auto; the returned SAE lives there. precision: fp32 | bf16 (autocast).
    arch_options: any SAEConfig field (k, l1_coeff, sparse_kernels, lr_warmup_steps, ...).
    """
    if threads:
        torch.set_num_threads(threads)
    cfg = SAEConfig(arch=arch, d_in=d_in, n_latents=n_latents, lr=lr, **arch_options)  # None: the arch's default
    if total_tokens is not None and total_tokens <= 0:
        raise ValueError(f"total_tokens must be positive, got {total_tokens}")
    trainer = Trainer(cfg, total_tokens, seed=seed, batch_size=batch_size, device=device, precision=precision,
                      checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, log_every=log_every,
                      logger=logger, progress=progress)
    return trainer.fit(batches, max_tokens_this_run=max_tokens_this_run)
