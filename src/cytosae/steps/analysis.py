"""The stats and patients steps: per-latent statistics (RUN/stats) and patient barcodes (RUN/patients)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from cytosae.run import Run
from cytosae.steps.common import (Warn, device, draws_images, encoded_store, need, one_line, open_run, open_sae,
                                  open_store, record, run_dataset)
from cytosae.steps.config import PatientsSettings, StatsSettings, StepError


@dataclass
class AnalysisResult:
    """What a step wrote where, and the lines that say what was measured on what."""
    out: Path
    said: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return list(self.said)


# ---------------------------------------------------------------- stats


def _placed_stats(cfg: StatsSettings, rd: Run | None) -> StatsSettings:
    if rd is not None:
        cfg = cfg.model_copy(update={"sae_dir": cfg.sae_dir or rd.sae_dir, "out": cfg.out or rd.stats_dir,
                                     "stores": cfg.stores or rd.sae_stores()})
    need(cfg.sae_dir, "SAE_DIR", "use the run's SAE")
    need(cfg.stores or None, "STORES", "use every dataset of the run")
    need(cfg.out, "--out", "write to RUN/stats")
    return cfg


def run_stats(cfg: StatsSettings, run: str | Path | Run | None = None, warn: Warn = None) -> AnalysisResult:
    """Per-latent frequencies, activations, top images, label entropy and class profiles on every store;
    galleries of the most label-specific latents; purity of known factors (cfg.factors)."""
    from cytosae.analysis import write_stats
    from cytosae.analysis.stats import SUMMARY

    started = time.time()
    rd = open_run(run, sae=cfg.sae_name)
    given, cfg = cfg, _placed_stats(cfg, rd)
    dev = device(cfg.device)
    sae = open_sae(cfg.sae_dir, cfg.allow_unfinished, warn).to(dev)
    result = AnalysisResult(cfg.out)
    opened = [encoded_store(open_store(path), sae, dev) for path in cfg.stores]
    results = [_latent_stats(cfg, path, enc, result.said) for path, enc in zip(cfg.stores, opened)]
    write_stats(results, cfg.out)
    _galleries(cfg, opened, results, result.said)
    if cfg.factors:
        _factor_purity(cfg, opened, results, result.said)
    result.said.append(f"tables and figures -> {cfg.out} (definitions in {cfg.out / SUMMARY})")
    record(rd, "stats", given, started)
    return result


def _latent_stats(cfg: StatsSettings, path: Path, encoded, said: list[str]):
    from cytosae.analysis import compute_latent_stats

    with one_line(f"{path}: "):
        res = compute_latent_stats(encoded, encoded.store.images, k=cfg.k, label_column=cfg.label_column,
                                   noisy_threshold=cfg.noisy_threshold, dataset=path.name, label_columns=cfg.labels)
    s = res.summary
    said.append(f"{path.name}: {s['n_images']} images, {s['n_latents']} latents; {s['n_dead_on_dataset']} never "
                f"fire on it; {s['n_noisy']} noisy (mean image activation > {cfg.noisy_threshold})")
    return res


def _galleries(cfg: StatsSettings, opened, results, said: list[str]) -> None:
    if not cfg.galleries:
        return
    if not all(draws_images(enc.store) for enc in opened):
        said.append("no galleries: a store of imported embeddings has no images or patch grid to draw")
        return
    from cytosae.analysis.heatmaps import CellViewer, write_latent_galleries

    for path, enc, res in zip(cfg.stores, opened, results):
        chosen = gallery_latents(res.latents, cfg.galleries, cfg.k, res.summary["n_images"])
        folder = cfg.out / "figures" / "galleries" / path.name
        written = write_latent_galleries(CellViewer(enc), res.top_images, chosen, folder,
                                         label_column=cfg.label_column)
        said.append(f"{path.name}: galleries of the {len(written)} latents with the lowest label entropy among "
                    f"those firing on >= {cfg.k} images -> {folder}")


def gallery_latents(latents, n: int, k: int, n_images: int) -> list[int]:
    """The most label-specific latents among those with a full set of k top images."""
    full = latents[(latents.freq_image * n_images >= k - 0.5) & latents.label_entropy.notna()]
    return [int(j) for j in full.sort_values(["label_entropy", "mean_act"], ascending=[True, False], kind="stable")
            .latent.head(n)]


def _factor_purity(cfg: StatsSettings, opened, results, said: list[str]) -> None:
    """Known factors (the synthetic sample's are ground truth): how purely the best latent's top-k holds each value."""
    import pandas as pd

    from cytosae.analysis import factor_purity
    from cytosae.analysis.heatmaps import CellViewer, write_latent_galleries
    from cytosae.store.format import atomic_write_bytes

    tables = []
    for path, enc, res in zip(cfg.stores, opened, results):
        st = enc.store
        missing = [f for f in cfg.factors if f not in st.images.columns]
        if missing:
            raise StepError(f"--factors: {path}/images.parquet has no column(s) {missing}; it has "
                            f"{list(st.images.columns)}")
        table = pd.concat([factor_purity(res.top_images, st.images, f, k=cfg.k) for f in cfg.factors],
                          ignore_index=True)
        tables.append(table.assign(dataset=path.name))
        best = sorted({int(j) for j in table.sort_values("purity", ascending=False).best_latent.head(6)})
        write_latent_galleries(CellViewer(enc), res.top_images, best,
                               cfg.out / "figures" / "galleries" / path.name, label_column=cfg.label_column)
        said.append(f"{path.name}: for each value of {len(cfg.factors)} known factors, the purity of the best "
                    f"latent's top-{cfg.k} images (n={len(table)} values): {int((table.purity >= 0.9).sum())} reach "
                    f"90%, median {table.purity.median():.0%}; best per factor: "
                    + ", ".join(f"{f}={r.value} {r.purity:.0%}" for f, g in table.groupby("factor", sort=False)
                                for r in [g.loc[g.purity.idxmax()]]))
    atomic_write_bytes(cfg.out / "factor_purity.csv", pd.concat(tables).to_csv(index=False).encode())
    said.append(f"factor purity -> {cfg.out / 'factor_purity.csv'}")


# ---------------------------------------------------------------- patients


def _placed_patients(cfg: PatientsSettings, rd: Run | None) -> PatientsSettings:
    if rd is not None:
        dataset = run_dataset(rd, cfg.dataset)
        out = cfg.out or (rd.external_patients_dir(dataset) if cfg.external else rd.patients_dir)
        cfg = cfg.model_copy(update={"dataset": dataset, "sae_dir": cfg.sae_dir or rd.sae_dir,
                                     "store": cfg.store or rd.store_dir(dataset), "out": out})
    need(cfg.sae_dir, "SAE_DIR", "use the run's SAE")
    need(cfg.store, "STORE", "use the run's dataset")
    need(cfg.out, "--out", "write to RUN/patients")
    return cfg


def run_patients(cfg: PatientsSettings, run: str | Path | Run | None = None, warn: Warn = None) -> AnalysisResult:
    """Patient barcodes (fraction of each patient's cells where each latent fires), a rank test between the
    target's groups and example cells of the most enriched latents."""
    from cytosae.analysis import patient_barcodes, write_patients
    from cytosae.analysis.patients import COMPARE

    started = time.time()
    rd = open_run(run, sae=cfg.sae_name)
    given, cfg = cfg, _placed_patients(cfg, rd)
    dev = device(cfg.device)
    sae = open_sae(cfg.sae_dir, cfg.allow_unfinished, warn).to(dev)
    encoded = encoded_store(open_store(cfg.store), sae, dev)
    with one_line(f"{cfg.store}: "):
        bc = patient_barcodes(encoded, encoded.store.images, threshold=cfg.threshold, token_policy=cfg.token_policy,
                              target=cfg.target)
    write_patients(bc, cfg.out, cfg.target, {"threshold": cfg.threshold, "token_policy": cfg.token_policy,
                                             "store": rd.portable(cfg.store) if rd else str(cfg.store),
                                             "dataset": cfg.dataset or cfg.store.name})
    result = AnalysisResult(cfg.out, [f"barcodes of {bc.patient_id.nunique()} patients x {sae.cfg.n_latents} latents "
                                      f"(token policy {cfg.token_policy}, threshold {cfg.threshold}) -> {cfg.out}"])
    if (cfg.out / COMPARE).is_file():
        _comparisons(cfg, encoded, result.said)
    record(rd, f"patients:{cfg.dataset}" if cfg.external else "patients", given, started, dataset=cfg.dataset)
    return result


def _comparisons(cfg: PatientsSettings, encoded, said: list[str]) -> None:
    from cytosae.analysis.patients import read_patients_summary

    with one_line():
        summary = read_patients_summary(cfg.out)
    for c in summary["comparisons"]:
        said.append(f"{cfg.target} {c['group_a']} vs {c['group_b']}: {c['n_q_below_0.05']} of {c['n_latents']} "
                    f"latents with BH q < 0.05 -> {cfg.out / c['figure']}")
    if cfg.examples and not draws_images(encoded.store):
        said.append("no example cells: a store of imported embeddings has no images or patch grid to draw")
    elif cfg.examples:
        from cytosae.analysis.patients import write_disease_examples

        drawn = write_disease_examples(encoded, cfg.out, cfg.target, per_comparison=cfg.examples)
        said.append(f"example cells with overlays for {sum(len(d['latents']) for d in drawn)} disease-specific "
                    f"latents -> {cfg.out / 'figures' / 'examples'}")
