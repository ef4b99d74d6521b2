"""The align step: does the SAE track cell classes better than PCA, k-means or an untrained SAE (RUN/quality)?"""
from __future__ import annotations

import time
from pathlib import Path

from cytosae.run import Run
from cytosae.steps.analysis import AnalysisResult
from cytosae.steps.common import Warn, device, encoded_store, need, one_line, open_run, open_sae, open_store, \
    record, run_dataset
from cytosae.steps.config import AlignSettings


def _placed(cfg: AlignSettings, rd: Run | None) -> AlignSettings:
    if rd is not None:
        dataset = run_dataset(rd, cfg.dataset)
        cfg = cfg.model_copy(update={"dataset": dataset, "sae_dir": cfg.sae_dir or rd.sae_dir,
                                     "store": cfg.store or rd.store_dir(dataset),
                                     "out": cfg.out or rd.quality_dir})
    need(cfg.sae_dir, "SAE_DIR", "use the run's SAE")
    need(cfg.store, "STORE", "use the run's dataset")
    need(cfg.out, "--out", "write to RUN/quality")
    return cfg


def _training_seed(rd: Run | None) -> int:
    """The seed the run's SAE was trained (and so initialised) with, as run.json recorded it; 0 otherwise."""
    seed = rd.training_settings().get("seed") if rd is not None else None
    return int(seed) if isinstance(seed, int) else 0


def run_align(cfg: AlignSettings, run: str | Path | Run | None = None, warn: Warn = None,
              step: str = "align") -> AnalysisResult:
    """Per class, the best latent's AP, Purity@16 and Coverage@0.3 for the SAE and three baselines, on one
    labelled store -> OUT/alignment.parquet, alignment_classes.parquet, alignment.json, latent_classes.parquet (every
    SAE latent's AP per class) and probing.parquet. `step`: the name run.json
    records it under (a sweep's other SAEs are `align:NAME`)."""
    from cytosae.analysis.alignment import compute_alignment, write_alignment

    started = time.time()
    rd = open_run(run, sae=cfg.sae_name)
    given, cfg = cfg, _placed(cfg, rd)
    seed = cfg.seed if cfg.seed is not None else _training_seed(rd)
    dev = device(cfg.device)
    encoded = encoded_store(open_store(cfg.store), open_sae(cfg.sae_dir, cfg.allow_unfinished, warn).to(dev), dev)
    with one_line(f"{cfg.store}: "):
        res = compute_alignment(encoded, label_column=cfg.label_column, token_policy=cfg.token_policy, seed=seed,
                                max_clusters=cfg.max_clusters, max_fit_tokens=cfg.fit_tokens, max_cells=cfg.max_cells,
                                dataset=cfg.dataset or cfg.store.name)
    paths = write_alignment(res, cfg.out)
    s = res.summary
    result = AnalysisResult(cfg.out, [f"label alignment on {s['dataset']}: {s['n_images']} images, "
                                      f"{len(s['classes'])} classes ({cfg.label_column}), token policy "
                                      f"{cfg.token_policy}; per class the best score's AP, Purity@16, Coverage@0.3, "
                                      f"mean over classes:"])
    for r in res.table.to_dict("records"):
        result.said.append(f"  {r['method']:<14} {r['n_scores']:>6} scores: AP {r['mean_best_ap']:.3f}  AUROC "
                           f"{r['mean_best_auroc']:.3f}  Purity@16 {r['mean_purity@16']:.3f}  Coverage@0.3 "
                           f"{r['mean_coverage@0.3']:.3f}")
    result.said += _probing_lines(s["probing"])
    result.said.append(f"tables -> {paths[0]}, {', '.join(p.name for p in paths[1:])} "
                       f"(definitions in {paths[2].name})")
    record(rd, step, given, started, dataset=cfg.dataset)
    return result


def _probing_lines(probing: dict) -> list[str]:
    """Sparse probing, one line per method: balanced accuracy of a logistic regression on the m best scores."""
    if not probing["table"]:
        return [f"sparse probing {probing['folds']}"]
    out = [f"sparse probing, one class vs the rest, {probing['folds']}: held-out balanced accuracy of a logistic "
           f"regression on the m scores chosen on training folds, mean over classes:"]
    by_method: dict[str, list[str]] = {}
    for r in probing["table"]:
        by_method.setdefault(r["method"], []).append(f"m={r['m']} {r['balanced_accuracy']:.3f}")
    out += [f"  {method:<14} " + "  ".join(cells) for method, cells in by_method.items()]
    return out
