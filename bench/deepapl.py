"""The whole concept pipeline on real patients: DeepAPL Discovery (82 patients, APL vs AML).

    python bench/deepapl.py [--backbone dinobloom-s] [--weights FILE] [--out bench/runs/deepapl]
    python bench/deepapl.py --max-patients 12 --repeats 2 --expansion 4   # minutes: a stratified subset

Extract (block -2) -> TopK SAE on all tokens -> statistics -> patient barcodes -> APL vs AML
rank tests -> patient-level classification in repeated 5-fold CV, against the mean-pooled
embedding, the cell-type composition, the promyelocyte proportion (the study's baseline) and
attention MIL (SCEMILA-style) over each cell's embedding and over its SAE concepts, in the same folds.
A subset (--max-patients) runs in its own folder and writes bench/results/deepapl_subN.json.
Each step is skipped when its output exists (rerun to resume). Writes bench/results/deepapl.json.

Without --weights the backbone has RANDOM weights (no DinoBloom weights exist on the development
machines): the figures then say how far concepts of an untrained ViT go, not what DinoBloom finds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _report import SHARED_DATA, write_result

REPO = Path(__file__).resolve().parents[1]
DEEPAPL = SHARED_DATA / "deepapl"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="dinobloom-s")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "runs" / "deepapl"))
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--token-policy", default="any_patch")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--stop-after", default=None, help="extract | sae: stop after this step")
    ap.add_argument("--max-patients", type=int, default=None, help="a stratified subset of this many patients")
    ap.add_argument("--mil", default="embedding,concepts", help="attention MIL inputs ('' for none)")
    ap.add_argument("--mil-repeats", type=int, default=None, help="repeats of the MIL models (default --repeats)")
    ap.add_argument("--device", default="cpu", help="MIL training device")
    args = ap.parse_args()
    if args.max_patients and args.out == str(REPO / "bench" / "runs" / "deepapl"):
        args.out += f"_sub{args.max_patients}"
    if not (DEEPAPL / "manifest.csv").is_file():
        raise SystemExit(f"{DEEPAPL}/manifest.csv not found: this benchmark needs ../shared/data/deepapl")

    from cytosae.analysis import compute_latent_stats, patient_barcodes, write_patients, write_stats
    from cytosae.analysis.classify import ClassifyConfig, classify_patients, write_classify
    from cytosae.backbones import load_backbone
    from cytosae.data import load_manifest
    from cytosae.sae import SAE, ShuffleBuffer, evaluate_sae, train_sae
    from cytosae.store import ActivationStore, ExtractConfig, extract
    from cytosae.store.format import atomic_write_json

    run = Path(args.out)
    timings = {}
    store_dir = run / "stores" / "deepapl"
    t0 = time.perf_counter()
    if not (store_dir / "manifest.json").is_file() or not json.loads((store_dir / "manifest.json").read_text()).get("complete"):
        manifest = _subset(load_manifest(DEEPAPL / "manifest.csv"), args.max_patients)
        torch.manual_seed(0)
        bb = load_backbone(args.backbone, weights=args.weights)
        extract(manifest, bb, store_dir, ExtractConfig(layer=-2, batch_size=32, shard_size=256, progress=True))
        timings["extract_s"] = time.perf_counter() - t0
    store = ActivationStore(store_dir)
    if args.stop_after == "extract":
        return

    sae_dir = run / "sae"
    if not (sae_dir / "sae.safetensors").is_file():
        t0 = time.perf_counter()
        total = store.n_images * store.n_tokens * args.epochs
        batches = ShuffleBuffer(262144, 0)(_epochs(store, args.epochs), batch_size=4096)
        train_sae(batches, store.d_model, "topk", args.expansion * store.d_model, total, seed=0, batch_size=4096,
                  k=args.k, checkpoint_dir=sae_dir, checkpoint_every=total // 4, progress=True)
        timings["sae_s"] = time.perf_counter() - t0
    sae = SAE.load(sae_dir)
    ev = evaluate_sae(sae, store)
    atomic_write_json(sae_dir / "eval.json", ev)
    if args.stop_after == "sae":
        return

    t0 = time.perf_counter()
    import pandas as pd

    from cytosae.analysis.patients import write_disease_examples
    from cytosae.analysis.encoded import EncodedStore

    encoded = EncodedStore(store, sae, torch.device("cpu"), batch_size=16)

    if not (run / "stats" / "latents.parquet").is_file():
        images = store.images.assign(label=store.images["cell_type"])  # the signed-off cell type is the label here
        stats = compute_latent_stats(encoded, images, dataset="deepapl")
        write_stats([stats], run / "stats")
    if not (run / "patients" / "barcodes.parquet").is_file():
        bc = patient_barcodes(encoded, store.images, token_policy=args.token_policy)
        write_patients(bc, run / "patients", summary={"threshold": 0.0, "token_policy": args.token_policy})
    bc = pd.read_parquet(run / "patients" / "barcodes.parquet")
    if not (run / "patients" / "figures" / "examples").is_dir():
        write_disease_examples(encoded, run / "patients", per_comparison=5, k=8, label_column="cell_type")
    timings["stats_patients_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from cytosae.analysis.mil import MILConfig, cell_features

    kinds = tuple(k for k in args.mil.split(",") if k)
    bags = {k: cell_features(store, k, encode=sae.encode, token_policy=args.token_policy) for k in kinds}
    timings["mil_features_s"] = time.perf_counter() - t0
    cfg = ClassifyConfig(target="diagnosis", n_splits=5, n_repeats=args.repeats, seed=0, mil=kinds,
                         mil_repeats=args.mil_repeats)
    res = classify_patients(bc, cfg, store=store, cell_type_column="cell_type", proportion="Promyelocyte",
                            dataset="deepapl", bags=bags, mil_cfg=MILConfig(seed=0, device=args.device))
    write_classify(res, run / "classify")
    timings["classify_s"] = time.perf_counter() - t0
    atomic_write_json(run / "run.json", {"datasets": {"deepapl": {"store": "stores/deepapl",
                                                                  "data": str(DEEPAPL / "manifest.csv")}},
                                         "sae": "sae", "backbone": {"name": args.backbone, "weights": args.weights,
                                                                    "layer": -2, "options": {}}})
    name = f"deepapl_sub{args.max_patients}" if args.max_patients else "deepapl"
    write_result(REPO / "bench" / "results" / f"{name}.json", {
        "what": "DeepAPL Discovery, patient-level APL vs AML from SAE concept barcodes vs baselines and attention MIL, "
                "repeated CV" + (f" (stratified subset of {args.max_patients} patients)" if args.max_patients else ""),
        "command": "python bench/deepapl.py " + " ".join(sys.argv[1:]),
        "backbone": args.backbone, "random_backbone_weights": args.weights is None,
        "n_cells": store.n_images, "n_patients": int(bc.patient_id.nunique()),
        "sae": {"arch": "topk", "k": args.k, "n_latents": sae.cfg.n_latents, "epochs": args.epochs,
                "eval_all_tokens": {m: ev["all"][m] for m in ("fvu", "l0", "dead_fraction")}},
        "token_policy": args.token_policy,
        "protocol": res["protocol"],
        "models": {model: {m: s[m] for m in ("macro_f1", "macro_f1_ci", "auroc", "auroc_ci", "per_class_f1",
                                              "weighted_f1", "macro_f1_uncalibrated_argmax", "threshold_mean",
                                              "brier", "repeats", "auroc_raw_feature") if m in s}
                   for model, s in res["models"].items()},
        "ablation": res["ablation"],
        "timings_s": timings,
    })


def _subset(manifest, n: int | None):
    """n patients, the diagnoses in their cohort proportions (at least 2 each, so CV can stratify), seed 0."""
    if not n:
        return manifest
    import numpy as np

    pats = manifest.drop_duplicates("patient_id")[["patient_id", "diagnosis"]]
    rng = np.random.default_rng(0)
    keep = []
    for _, group in pats.groupby("diagnosis"):
        k = max(2, round(n * len(group) / len(pats)))
        keep += list(rng.choice(group.patient_id.to_numpy(), min(k, len(group)), replace=False))
    return manifest[manifest.patient_id.isin(keep)].reset_index(drop=True)


def _epochs(store, epochs: int):
    for _ in range(epochs):
        yield from store.iter_tokens("all", batch_size=4096)


if __name__ == "__main__":
    main()
