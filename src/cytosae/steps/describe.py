"""The describe step: one line and one structured record per latent, from measured facts (RUN/concepts)."""
from __future__ import annotations

import time
from pathlib import Path

from cytosae.run import Run
from cytosae.steps.analysis import AnalysisResult
from cytosae.steps.common import Warn, analysis_batch, device, need, one_line, open_run, open_sae, open_store, record
from cytosae.steps.config import DescribeSettings, StepError


def _placed(cfg: DescribeSettings, rd: Run | None) -> DescribeSettings:
    if rd is not None:
        present = lambda p, f: p if (p / f).is_file() else None  # noqa: E731  (an optional input of the run)
        cfg = cfg.model_copy(update={"sae_dir": cfg.sae_dir or rd.sae_dir, "out": cfg.out or rd.concepts_dir,
                                     "stores": cfg.stores or rd.sae_stores(),
                                     "stats": cfg.stats or present(rd.stats_dir, "top_images.parquet"),
                                     "patients": cfg.patients or present(rd.patients_dir, "compare.parquet")})
    need(cfg.sae_dir, "SAE_DIR", "use the run's SAE")
    need(cfg.stores or None, "STORES", "describe on every dataset of the run")
    need(cfg.out, "--out", "write to RUN/concepts")
    return cfg


def _table(folder: Path | None, name: str, flag: str):
    """An optional input table (stats' top images, patients' comparison), or a one-line error when named but absent."""
    import pandas as pd

    if folder is None:
        return None
    path = Path(folder) / name
    if not path.is_file():
        raise StepError(f"{flag} {folder}: no {name} there; run `cytosae {flag[2:]}` first, or leave {flag} out")
    with one_line(f"{path}: "):
        return pd.read_parquet(path)


def run_describe(cfg: DescribeSettings, run: str | Path | Run | None = None, warn: Warn = None) -> AnalysisResult:
    """Per latent: region shares, extent, colour, best class and its AP, top classes, datasets, patient
    enrichment and flags -> OUT/descriptions.parquet (one row per latent, `text` the one line) and
    OUT/descriptions.json (what was measured on what, thresholds, definitions)."""
    from cytosae.analysis.describe import describe_latents, write_descriptions

    started = time.time()
    rd = open_run(run, sae=cfg.sae_name)
    given, cfg = cfg, _placed(cfg, rd)
    dev = device(cfg.device)
    sae = open_sae(cfg.sae_dir, cfg.allow_unfinished, warn).to(dev)
    names = [p.name for p in cfg.stores]
    if rd is not None:  # a run's stores by their dataset names, as stats names them
        names = [next((n for n in rd.datasets if rd.store_dir(n) == p), p.name) for p in cfg.stores]
    stores = {n: open_store(p) for n, p in zip(names, cfg.stores)}
    top_images = _table(cfg.stats, "top_images.parquet", "--stats")
    compare = _table(cfg.patients, "compare.parquet", "--patients")
    with one_line():
        desc = describe_latents(sae, stores, top_images, compare, label_column=cfg.label_column,
                                batch_size=analysis_batch(dev), device=dev, max_nonzeros=cfg.max_nonzeros)
    portable = (lambda p: rd.portable(Path(p))) if rd else str
    paths = write_descriptions(desc, cfg.out, {"sae": portable(cfg.sae_dir),
                                               "stores": {n: portable(p) for n, p in zip(names, cfg.stores)},
                                               "top_images": portable(cfg.stats / "top_images.parquet")
                                               if cfg.stats else None,
                                               "compare": portable(cfg.patients / "compare.parquet")
                                               if cfg.patients else None})
    result = AnalysisResult(cfg.out, _said(desc.summary, cfg, paths))
    record(rd, "describe", given, started)
    return result


def _said(s: dict, cfg: DescribeSettings, paths: list[Path]) -> list[str]:
    stores = ", ".join(f"{x['dataset']} ({x['n_images']} images"
                       + (", regions and colours from the images the model saw)" if x["regions_and_colours"]
                          else ", no images to segment: no regions or colours)") for x in s["stores"])
    c = s["counts"]
    lines = [f"described {s['n_latents']} latents on {stores}",
             f"classes: {len(s['classes'])} ({cfg.label_column}) over {s['n_labelled']} labelled cells, best class "
             f"= the class of highest AP of its image-level activation (max over patches); top classes from "
             + (f"{cfg.stats / 'top_images.parquet'}" if cfg.stats else "nothing (no stats: run `cytosae stats`)"),
             "patient enrichment from " + (f"{cfg.patients / 'compare.parquet'}" if cfg.patients
                                           else "nothing (no patients/compare.parquet)"),
             f"by region: {_counts(c['by_region'])}; by extent: {_counts(c['by_extent'])}",
             f"flags: {c['dead']} dead, {c['background_only']} background-only, {c['image_border']} image-border, "
             f"{c['fires_on_everything']} fire on everything",
             f"descriptions -> {paths[0]} (what was measured on what, thresholds, definitions: {paths[1].name})"]
    return lines


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"
