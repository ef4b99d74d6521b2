"""`make demo`: the whole pipeline on the built-in synthetic sample, into one run directory."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Callable

import pandas as pd

from cytosae import __version__


def run_demo(out: str | Path, seed: int = 0, n_patients: int = 12, cells_per_patient: int = 24,
             backbone: str = "dinobloom-s", weights: str | Path | None = None, expansion: int = 8, k: int = 16,
             say: Callable[[str], None] = print) -> dict:
    """Sample -> backbone tokens -> store -> TopK SAE -> evaluation -> concepts, factor purity, patient barcodes,
    disease comparison and diagnosis, written as a run (docs/run-layout.md)."""
    from cytosae.backbones import load_backbone
    from cytosae.data import load_manifest
    from cytosae.data.synthetic import make_sample
    from cytosae.sae import ShuffleBuffer, evaluate_sae, train_sae
    from cytosae.store import ActivationStore, ExtractConfig, extract
    from cytosae.store.format import atomic_write_json

    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    manifest_csv = make_sample(run / "data" / "sample", seed=seed, n_patients=n_patients,
                               cells_per_patient=cells_per_patient)
    manifest = load_manifest(manifest_csv)
    say(f"[1/7] synthetic sample: {len(manifest)} cells of {manifest.label.nunique()} classes from "
        f"{manifest.patient_id.nunique()} patients ({', '.join(sorted(manifest.diagnosis.unique()))}) -> {manifest_csv.parent}")

    bb = load_backbone(backbone, weights=weights, seed=seed)  # random weights, if any, are a function of the seed
    if bb.random_weights:
        say("      !!! the backbone has RANDOM weights (none given): the demo shows the machinery, not biology !!!")
    res = extract(manifest, bb, run / "stores" / "sample", ExtractConfig(layer=-2, batch_size=16, shard_size=128))
    say(f"[2/7] store: {res.n_images} images x {bb.n_tokens} tokens x {bb.embed_dim} dims from {bb.name} block -2 "
        f"({res.n_skipped} skipped, {res.images_per_second:.1f} images/s) -> {res.out_dir}")

    store = ActivationStore(res.out_dir)
    total = store.n_images * store.n_tokens
    batches = ShuffleBuffer(65536, seed)(store.iter_tokens("all", batch_size=2048), batch_size=2048)
    sae = train_sae(batches, store.d_model, "topk", expansion * store.d_model, total, seed=seed, batch_size=2048, k=k,
                    checkpoint_dir=run / "sae", checkpoint_every=total)
    say(f"[3/7] SAE: topk k={k}, {sae.cfg.n_latents} latents ({expansion}x d={store.d_model}), one pass over "
        f"{total:,} tokens -> {run / 'sae'}")

    ev = evaluate_sae(sae, store)
    atomic_write_json(run / "sae" / "eval.json", ev)
    for group in ("all", "cls", "patch"):
        if group in ev:
            g = ev[group]
            say(f"[4/7] {group:>5} tokens of the sample: FVU {g['fvu']:.3f}, L0 {g['l0']:.1f}, "
                f"dead {g['dead_fraction']:.1%}, cosine {g['cosine_similarity']:.3f}")

    from cytosae.analysis import compute_latent_stats, factor_purity, write_stats

    stats = compute_latent_stats(sae.encode, store.iter_images(8), store.images, sae.cfg.n_latents, k=16, dataset="sample")
    write_stats([stats], run / "stats")
    factors = ["label", "nucleus_shape", "granule_colour", "size_px", "cytoplasm_colour", "background"]
    purity = [factor_purity(stats.top_images, store.images, f, k=16) for f in factors]
    table = pd.concat(purity, ignore_index=True)
    table.to_csv(run / "stats" / "factor_purity.csv", index=False)
    n90 = int((table.purity >= 0.9).sum())
    say(f"[5/7] concepts: for each generating factor value, the purity of the best latent's top-16 images "
        f"(n={len(table)} values): {n90} reach 90%, median {table.purity.median():.0%}; best per factor: "
        + ", ".join(f"{f}={r.value} {r.purity:.0%}" for f, g in table.groupby("factor", sort=False)
                    for r in [g.loc[g.purity.idxmax()]]) + f" -> {run / 'stats' / 'factor_purity.csv'}")
    from cytosae.analysis.heatmaps import CellViewer, write_latent_galleries

    viewer = CellViewer(store, sae.encode)
    best = sorted({int(j) for j in table.sort_values("purity", ascending=False).best_latent.head(6)})
    write_latent_galleries(viewer, stats.top_images, best, run / "stats" / "figures" / "galleries" / "sample")

    from cytosae.analysis import patient_barcodes, write_patients
    from cytosae.analysis.patients import write_disease_examples

    bc = patient_barcodes(sae.encode, store.iter_images(8), store.images, sae.cfg.n_latents, token_policy="any_patch")
    write_patients(bc, run / "patients", summary={"threshold": 0.0, "token_policy": "any_patch"})
    write_disease_examples(sae.encode, store, run / "patients", per_comparison=3, k=8)
    cmp = pd.read_parquet(run / "patients" / "compare.parquet")
    say(f"[6/7] patients: barcodes of {bc.patient_id.nunique()} patients (fraction of their cells where each latent "
        f"fires on any patch); APL vs AML Mann-Whitney per latent: {int((cmp.q < 0.05).sum())} of {len(cmp)} latents "
        f"with BH q < 0.05; volcano, correlation heatmap and example cells -> {run / 'patients'}")

    atomic_write_json(run / "run.json", {
        "datasets": {"sample": {"store": "stores/sample", "data": str(manifest_csv)}},
        "sae": "sae",
        "backbone": {"name": backbone, "weights": str(weights) if weights else None, "layer": -2, "options": {}},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cytosae_version": __version__,
    })
    from cytosae.analysis.classify import ClassifyConfig, classify_patients, write_classify

    # cross_validate lowers k to the smallest class itself; it cannot run below 2 patients per diagnosis
    if int(bc.drop_duplicates("patient_id").diagnosis.value_counts().min()) >= 2:
        res = classify_patients(bc, ClassifyConfig(n_repeats=5, seed=seed), store=store,
                                cell_type_column="label", dataset="sample",
                                proportion="promyelocyte" if (store.images.label == "promyelocyte").any() else None)
        write_classify(res, run / "classify")
        say(f"[7/7] diagnosis (APL vs AML) of {res['n_patients']} patients, {res['protocol']['repeats']} x "
            f"{res['protocol']['folds']}-fold CV over patients, out-of-fold AUROC / macro-F1: "
            + "; ".join(f"{name} {m['auroc']:.2f} / {m['macro_f1']:.2f}" for name, m in res["models"].items())
            + f" -> {run / 'classify'}")
    else:
        say("[7/7] diagnosis: skipped, cross-validation needs at least 2 patients per diagnosis")
    say(f"run written to {run} (layout: docs/run-layout.md). Browse it: cytosae explore {run}")
    return ev
