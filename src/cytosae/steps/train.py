"""The train step: a sparse autoencoder on a store's token activations (RUN/sae in a run)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from cytosae.run import Run
from cytosae.steps.common import need, one_line, open_run, open_store, record, run_dataset
from cytosae.steps.config import StepError, TrainSettings


@dataclass
class TrainResult:
    out: Path
    store: Path
    arch: str
    n_latents: int
    d_in: int
    tokens_seen: int
    steps: int
    device: str
    rank: int
    cfg: TrainSettings

    def lines(self) -> list[str]:
        c = self.cfg
        return [] if self.rank != 0 else [
            f"SAE {self.arch} ({self.n_latents} latents on d={self.d_in}) trained on {self.tokens_seen:,} {c.tokens} "
            f"tokens of {self.store} ({c.epochs} epoch(s), images in shuffled order) in {self.steps} steps on "
            f"{self.device} ({c.precision}) -> {self.out}"]


def memory_bound(dev) -> int:
    """Bytes the SAE's weights may take at most: the GPU's memory, else the machine's."""
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(dev).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_size(cfg: TrainSettings, d_in: int, bound: int) -> None:
    """Refuse an SAE that cannot be allocated before anything is read: its encoder and decoder are each
    n_latents x d_in float32 (and the optimizer needs twice as much again)."""
    n_latents = cfg.expansion * d_in
    need_bytes = n_latents * d_in * 4 * 2
    if need_bytes > bound:
        raise StepError(f"--expansion {cfg.expansion}: {n_latents:,} latents on d={d_in} need {need_bytes / 2**30:,.1f} "
                        f"GiB for the two weight matrices alone (n_latents x d_in x 4 bytes x 2), more than the "
                        f"{bound / 2**30:,.1f} GiB of memory here; lower --expansion")


def _check_tokens(cfg: TrainSettings, st, store: Path) -> None:
    per_image = {"all": st.n_tokens, "cls": 1, "patch": st.n_tokens - 1}[cfg.tokens]
    available = st.n_images * per_image
    if cfg.total_tokens > cfg.epochs * available:
        raise StepError(f"--total-tokens {cfg.total_tokens:,} is more than {cfg.epochs} epoch(s) of {store} hold "
                        f"({available:,} {cfg.tokens} tokens each); pass --epochs "
                        f"{-(-cfg.total_tokens // available)} or ask for fewer tokens")


def _placed(cfg: TrainSettings, rd: Run | None) -> TrainSettings:
    if rd is not None:
        dataset = run_dataset(rd, cfg.dataset)
        cfg = cfg.model_copy(update={"dataset": dataset, "store": cfg.store or rd.store_dir(dataset),
                                     "out": cfg.out or rd.sae_dir})
    need(cfg.store, "STORE", "train on the run's dataset")
    need(cfg.out, "--out (the SAE directory)", "write it to RUN/sae")
    return cfg


def run_train(cfg: TrainSettings, run: str | Path | Run | None = None, step: str = "train") -> TrainResult:
    """Train (or resume training) an SAE on cfg.store into cfg.out; in a run, the run's dataset into RUN/sae.
    `step`: the name run.json records it under (a sweep's other SAEs are `train:NAME`)."""
    from cytosae.distributed import init_from_env, shutdown
    from cytosae.sae import TrainingDiverged, store_epochs
    from cytosae.sae.loggers import make_logger

    started = time.time()
    rd = open_run(run)
    given, cfg = cfg, _placed(cfg, rd)
    st = open_store(cfg.store)
    _check_tokens(cfg, st, cfg.store)
    with one_line():
        dev, rank, _ = init_from_env(cfg.device)
    check_size(cfg, st.d_model, memory_bound(dev))
    batches = store_epochs(st, cfg.epochs, tokens=cfg.tokens, batch_size=cfg.batch_size, seed=cfg.seed,
                           shuffle_tokens=cfg.shuffle)
    with one_line():
        logger = make_logger(cfg.log, cfg.out, config={"arch": cfg.arch, "expansion": cfg.expansion,
                                                       "tokens": cfg.tokens, "store": str(cfg.store),
                                                       "batch_size": cfg.batch_size, "seed": cfg.seed,
                                                       **cfg.arch_options()})
    try:
        sae = _train(cfg, batches, st.d_model, dev, logger)
    except TrainingDiverged as exc:
        raise StepError(str(exc)) from None
    finally:
        if logger is not None:
            logger.close()
    shutdown()
    s = sae.training_summary
    if rank == 0:
        record(rd, step, given, started, dataset=cfg.dataset)
    return TrainResult(cfg.out, cfg.store, cfg.arch, sae.cfg.n_latents, sae.cfg.d_in, s["tokens_seen"], s["steps"],
                       str(dev), rank, cfg)


def _train(cfg: TrainSettings, batches, d_in: int, dev, logger):
    from cytosae.sae import train_sae

    with one_line():
        return train_sae(batches, d_in, cfg.arch, cfg.expansion * d_in, cfg.total_tokens or None, seed=cfg.seed,
                         batch_size=cfg.batch_size, lr=cfg.lr, checkpoint_dir=cfg.out,
                         checkpoint_every=cfg.checkpoint_every, logger=logger, log_every=cfg.log_every, device=dev,
                         precision=cfg.precision, **cfg.arch_options())
