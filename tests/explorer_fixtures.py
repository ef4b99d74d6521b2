"""A small but complete run directory (docs/run-layout.md) for explorer tests.

Tokens are built so that each class lights up a known latent on a known block of
patches; all tables are computed from those tokens with an independent numpy encoder,
so tests can check API values against `expected`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from safetensors.numpy import save_file

GRID = 16
N_TOKENS = 1 + GRID * GRID
CLASSES = ["neutrophil", "lymphocyte", "monocyte"]


@dataclass
class FixtureRun:
    path: Path
    data: dict[str, Path]
    n_latents: int
    d: int
    acts: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # dataset -> image_id -> (257, n_latents)
    w_dec: np.ndarray | None = None


def encode(x: np.ndarray, w_enc, b_enc, b_dec) -> np.ndarray:
    return np.maximum((x - b_dec) @ w_enc + b_enc, 0.0).astype(np.float32)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) if len(p) else 0.0


def make_run(root: Path, n_latents: int = 48, d: int = 32, n_per_dataset=(12, 6), seed: int = 0) -> FixtureRun:
    from cytosae.store import import_embeddings

    rng = np.random.default_rng(seed)
    root = Path(root)
    run = root / "run"
    (run / "sae").mkdir(parents=True)
    # decoder: unit rows; latent j < 3 is "class j", latents 3,4 are near-duplicates of latent 0 (neighbours)
    w_dec = rng.normal(size=(n_latents, d)).astype(np.float32)
    w_dec[3] = w_dec[0] + 0.05 * rng.normal(size=d)
    w_dec[4] = w_dec[0] + 0.20 * rng.normal(size=d)
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    w_enc = w_dec.T.copy()
    b_enc = np.full(n_latents, -1.5, np.float32)
    b_dec = np.zeros(d, np.float32)
    save_file({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, str(run / "sae" / "sae.safetensors"))
    (run / "sae" / "config.json").write_text(json.dumps({"arch": "relu", "d_in": d, "n_latents": n_latents}))

    fx = FixtureRun(run, {}, n_latents, d, w_dec=w_dec)
    datasets = {"acevedo": n_per_dataset[0], "mll": n_per_dataset[1]}
    stats_rows, top_rows, cp_rows, hist_rows = [], [], [], []
    cls_all: dict[str, np.ndarray] = {}
    manifests = {}
    for ds, n in datasets.items():
        data = root / "data" / ds
        rows, tokens = [], np.zeros((n, N_TOKENS, d), np.float32)
        for i in range(n):
            c = i % len(CLASSES)
            rel = f"{CLASSES[c]}/cell_{i:02d}.png"
            (data / CLASSES[c]).mkdir(parents=True, exist_ok=True)
            img = np.full((48, 64, 3), 200, np.uint8)
            img[10:38, 16:48] = (120 + 40 * c, 60, 150)
            Image.fromarray(img).save(data / rel)
            rows.append({"image_id": rel, "path": str(data / rel), "label": CLASSES[c],
                         "patient_id": f"{ds}_p{i % 4}", "diagnosis": ["AML", "control"][i % 4 % 2]})
            tok = 0.1 * rng.normal(size=(N_TOKENS, d)).astype(np.float32)
            # class latent c fires (strength grows with i) on a 4x4 block of patches whose position depends on i
            r0, c0 = (i * 3) % 12, (i * 5) % 12
            strength = 2.0 + 0.25 * i
            for r in range(r0, r0 + 4):
                for cc in range(c0, c0 + 4):
                    tok[1 + r * GRID + cc] += strength * w_dec[c]
            tok[0] += (strength - 0.3) * w_dec[c]  # CLS carries the class latent too
            tokens[i] = tok
        manifest = pd.DataFrame(rows)
        manifests[ds] = manifest
        np.save(root / f"{ds}.npy", tokens)
        import_embeddings(root / f"{ds}.npy", manifest, run / "stores" / ds, dtype="float32", shard_size=5)
        fx.data[ds] = data
        acts = {rows[i]["image_id"]: encode(tokens[i], w_enc, b_enc, b_dec) for i in range(n)}
        fx.acts[ds] = acts

        cls = np.stack([acts[r["image_id"]][0] for r in rows])  # (n, n_latents)
        patch_max = np.stack([acts[r["image_id"]][1:].max(0) for r in rows])
        patch_arg = np.stack([acts[r["image_id"]][1:].argmax(0) for r in rows])
        cls_all[ds] = cls
        labels = manifest["label"].to_numpy()
        tok_all = np.concatenate([acts[r["image_id"]] for r in rows])
        for j in range(n_latents):
            fires = cls[:, j] > 0
            counts = np.array([(fires & (labels == k)).sum() for k in CLASSES])
            stats_rows.append({
                "dataset": ds, "latent": j, "freq_image": float(fires.mean()),
                "freq_token": float((tok_all[:, j] > 0).mean()),
                "mean_act": float(cls[fires, j].mean()) if fires.any() else 0.0,
                "max_act": float(cls[:, j].max()), "label_entropy": _entropy(counts),
                "top_label": CLASSES[int(counts.argmax())] if fires.any() else None, "noisy": False})
            for by, vals in (("image", cls[:, j]), ("patch", patch_max[:, j])):
                order = np.argsort(-vals, kind="stable")[:5]
                for rank, i in enumerate(order):
                    if vals[i] <= 0:
                        break
                    top_rows.append({"dataset": ds, "latent": j, "by": by, "rank": rank, "image_id": rows[i]["image_id"],
                                     "value": float(vals[i]), "patch": int(patch_arg[i, j]) if by == "patch" else -1,
                                     "label": labels[i]})
            for k in CLASSES:
                m = labels == k
                cp_rows.append({"dataset": ds, "latent": j, "class": k, "mean_act": float(cls[m, j].mean()),
                                "freq": float((cls[m, j] > 0).mean())})
            nz = cls[cls[:, j] > 0, j]
            counts_h, edges = np.histogram(nz, bins=8) if len(nz) else (np.zeros(8, int), np.linspace(0, 1, 9))
            hist_rows.append({"dataset": ds, "latent": j, "bin_edges": edges.tolist(), "counts": counts_h.tolist()})

    (run / "stats").mkdir()
    pd.DataFrame(stats_rows).to_parquet(run / "stats" / "latents.parquet", index=False)
    pd.DataFrame(top_rows).to_parquet(run / "stats" / "top_images.parquet", index=False)
    pd.DataFrame(cp_rows).to_parquet(run / "stats" / "class_profile.parquet", index=False)
    pd.DataFrame(hist_rows).to_parquet(run / "stats" / "histograms.parquet", index=False)
    (run / "stats" / "summary.json").write_text(json.dumps({
        "datasets": list(datasets), "n_images": datasets, "n_latents": n_latents, "thresholds": {"fire": 0.0}, "k": 5,
        "token_policy": "image-level activation = CLS token"}))

    # patients: barcodes from the first dataset
    ds = "acevedo"
    man, cls = manifests[ds], cls_all[ds]
    bc_rows = []
    for pid, g in man.groupby("patient_id"):
        idx = g.index.to_numpy()
        for j in range(n_latents):
            cnt = int((cls[idx, j] > 0).sum())
            bc_rows.append({"patient_id": pid, "diagnosis": g["diagnosis"].iloc[0], "latent": j,
                            "frac": cnt / len(idx), "count": cnt, "n_cells": len(idx)})
    bc = pd.DataFrame(bc_rows)
    (run / "patients").mkdir()
    bc.to_parquet(run / "patients" / "barcodes.parquet", index=False)
    bc.groupby(["diagnosis", "latent"], as_index=False)["frac"].mean().rename(columns={"frac": "frac_mean"}).to_parquet(
        run / "patients" / "disease_barcodes.parquet", index=False)
    cmp_rows = []
    for j in range(n_latents):
        a = bc[(bc.latent == j) & (bc.diagnosis == "AML")]["frac"]
        b = bc[(bc.latent == j) & (bc.diagnosis == "control")]["frac"]
        eff = float(a.mean() - b.mean())
        p = float(min(1.0, 0.01 + abs(0.5 - j / n_latents)))
        cmp_rows.append({"latent": j, "group_a": "AML", "group_b": "control", "statistic": eff * 10, "p": p,
                         "q": min(1.0, p * 2), "effect": eff})
        cmp_rows.append({"latent": j, "group_a": "AML", "group_b": "rest", "statistic": -eff, "p": 0.5,
                         "q": 0.9, "effect": -eff / 2})
    pd.DataFrame(cmp_rows).to_parquet(run / "patients" / "compare.parquet", index=False)
    (run / "patients" / "summary.json").write_text(json.dumps({"dataset": ds, "n_patients": 4}))
    (run / "classify").mkdir()
    (run / "classify" / "results.json").write_text(json.dumps({
        "task": "diagnosis", "dataset": ds, "models": {
            "sae_barcode_logreg": {"macro_f1": 0.81, "auroc": 0.9, "auroc_ci": [0.8, 0.97],
                                   "per_class_f1": {"AML": 0.85, "control": 0.77}, "folds": 4, "repeats": 2},
            "baseline_mean_embedding": {"macro_f1": 0.7, "auroc": 0.82, "auroc_ci": [0.7, 0.9],
                                        "per_class_f1": {"AML": 0.72, "control": 0.68}, "folds": 4, "repeats": 2}}}))
    (run / "run.json").write_text(json.dumps({
        "datasets": {name: {"store": f"stores/{name}", "data": str(fx.data[name])} for name in datasets},
        "sae": "sae", "created": "2026-11-22T00:00:00+00:00", "cytosae_version": "0.1.0"}))
    return fx
