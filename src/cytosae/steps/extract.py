"""The extract step: a backbone's token activations of every image into a store (RUN/stores/NAME in a run)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cytosae.run import Run, check_name
from cytosae.steps.common import Warn, default_name, one_line, open_run, record, warner
from cytosae.steps.config import ExtractSettings, StepError


@dataclass
class ExtractResult:
    out_dir: Path
    n_images: int
    n_shards: int
    n_skipped: int
    shards_reused: int
    images_per_second: float
    complete: bool
    n_tokens: int
    embed_dim: int
    backbone: str
    device: str
    rank: int
    world: int
    cfg: ExtractSettings

    def lines(self) -> list[str]:
        if self.rank != 0:
            return []
        c = self.cfg
        if not self.complete:
            return [f"store {self.out_dir} unfinished: stopped after --max-minutes {c.max_minutes:g} with "
                    f"{self.n_shards} shards ({self.n_images} images) done; run the same command again to finish it."]
        many = self.world > 1
        return [f"store {self.out_dir}: {self.n_images} images x {self.n_tokens} tokens x {self.embed_dim} dims "
                f"({c.dtype}) from {self.backbone} block {c.layer} on {self.device} ({c.precision}"
                f"{f', {self.world} processes' if many else ''}); {self.n_skipped} unreadable images skipped "
                f"(listed in {self.out_dir / 'skipped.csv'}); {self.shards_reused} of {self.n_shards} shards reused "
                f"from an earlier run; {self.images_per_second:.1f} images/s over the images "
                f"{'this process ' if many else ''}computed now."]


def _store_config(cfg: ExtractSettings):
    from cytosae.store import ExtractConfig

    with one_line():
        return ExtractConfig(layer=cfg.layer, dtype=cfg.dtype, batch_size=cfg.batch_size, shard_size=cfg.shard_size,
                             num_workers=cfg.workers, precision=cfg.precision, max_pixels=cfg.max_pixels or None,
                             max_aspect=cfg.max_aspect or None,
                             max_seconds=60 * cfg.max_minutes if cfg.max_minutes is not None else None)


def _backbone(cfg: ExtractSettings, dev, rank: int, warn: Warn):
    from dataclasses import replace

    from cytosae.backbones import load_backbone
    from cytosae.data.stain import fit_stain

    # the stain reference first: a bad one is refused in a second, before a backbone is loaded or a warning printed
    stain = fit_stain(cfg.stain, cfg.stain_reference) if cfg.stain != "none" else None
    # random weights are a function of the seed: the same in every process and in every resumed run
    bb = load_backbone(cfg.backbone, weights=cfg.weights, resize=cfg.resize, seed=cfg.seed, device=dev)
    if bb.random_weights and rank == 0:
        warner(warn)("WARNING: no --weights given: the backbone has RANDOM weights; its activations mean nothing "
                     "about blood cells. Fine for a demo, never for a study.")
    if stain is not None:
        bb.preprocess_config = replace(bb.preprocess_config, stain=stain)
    return bb


def _placed(cfg: ExtractSettings, rd: Run | None) -> ExtractSettings:
    """The settings with the dataset name and store directory filled in from the run."""
    if rd is None:
        if cfg.out is None:
            raise StepError("--out (the store directory) is missing: give it, or --run RUN to write it to "
                            "RUN/stores/NAME")
        return cfg
    name = cfg.name or default_name(cfg.data)
    try:
        check_name(name)
    except ValueError as exc:
        raise StepError(f"{exc}; choose one with --name") from None
    return cfg.model_copy(update={"name": name, "out": cfg.out or rd.store_dir(name)})


def run_extract(cfg: ExtractSettings, run: str | Path | Run | None = None, warn: Warn = None) -> ExtractResult:
    """Write the backbone's activations of cfg.data into a store (resumable; under torchrun each process writes
    its share of the shards); in a run, register the dataset and backbone and record the step."""
    from cytosae.data import load_manifest
    from cytosae.distributed import init_from_env, shutdown
    from cytosae.store import extract

    started = time.time()
    rd = open_run(run, create=True)
    given, cfg = cfg, _placed(cfg, rd)
    store_cfg = _store_config(cfg)
    with one_line():
        dev, rank, world = init_from_env(cfg.device)
    try:
        with one_line():
            manifest = load_manifest(cfg.data, patients=cfg.patients)
            bb = _backbone(cfg, dev, rank, warn)
            res = extract(manifest, bb, cfg.out, store_cfg)
    finally:
        shutdown()
    out = ExtractResult(res.out_dir, res.n_images, res.n_shards, res.n_skipped, res.shards_reused,
                        res.images_per_second, res.complete, bb.n_tokens, bb.embed_dim, bb.name, str(dev), rank,
                        world, cfg)
    if rd is not None and rank == 0 and res.complete:
        _register(rd, given, cfg, started)
    return out


def _register(rd: Run, given: ExtractSettings, cfg: ExtractSettings, started: float) -> None:
    rd.add_dataset(cfg.name, data=rd.portable(cfg.data.absolute()))
    rd.set_backbone({"name": cfg.backbone, "weights": rd.portable(cfg.weights) if cfg.weights else None,
                     "layer": cfg.layer, "seed": None if cfg.weights else cfg.seed, "options": {}})
    record(rd, f"extract:{cfg.name}", given, started,
           inputs={"weights": cfg.weights, "patients": cfg.patients,
                   "manifest": cfg.data if cfg.data.is_file() else None, "stain_reference": cfg.stain_reference}, name=cfg.name)
