"""Patient barcodes and disease comparison.

A patient's barcode is, per latent, the FRACTION of the patient's cells in which the
latent fires above a threshold. CytoSAE divided the firing counts by the number of
latents instead of the number of cells, which makes barcodes depend on the SAE's size
and not on the patient; here the denominator is the patient's cell count, and the raw
counts and cell counts are kept beside the fractions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

TOKEN_POLICIES = ("cls", "any_patch", "mean")


def cell_activation(z: torch.Tensor, policy: str) -> torch.Tensor:
    """(b, T, n_latents) token activations -> (b, n_latents) per cell, CLS at token 0."""
    if policy == "cls":
        return z[:, 0]
    if policy == "any_patch":
        return z[:, 1:].amax(1)
    if policy == "mean":
        return z[:, 1:].mean(1)
    raise ValueError(f"token policy must be one of {TOKEN_POLICIES}, got {policy!r}")


def patient_barcodes(encode: Callable[[torch.Tensor], torch.Tensor], images: Iterable[tuple[list[str], torch.Tensor]],
                     manifest: pd.DataFrame, n_latents: int, threshold: float = 0.0, token_policy: str = "cls",
                     target: str = "diagnosis") -> pd.DataFrame:
    """Long table: patient_id, <target>, latent, frac, count, n_cells."""
    if "patient_id" not in manifest or manifest["patient_id"].isna().all():
        raise ValueError("the data manifest has no patient_id column: barcodes need patients "
                         "(a patient-per-folder tree with --patients, or a CSV with patient_id)")
    if token_policy not in TOKEN_POLICIES:
        raise ValueError(f"token policy must be one of {TOKEN_POLICIES}, got {token_policy!r}")
    patient_of = dict(zip(manifest["image_id"], manifest["patient_id"]))
    patients = sorted({p for p in patient_of.values() if p is not None})
    index = {p: i for i, p in enumerate(patients)}
    counts = torch.zeros(len(patients), n_latents, dtype=torch.long)
    n_cells = torch.zeros(len(patients), dtype=torch.long)
    with torch.inference_mode():
        for ids, tokens in images:
            b, t, d = tokens.shape
            fires = cell_activation(encode(tokens.reshape(-1, d)).reshape(b, t, n_latents), token_policy) > threshold
            rows = torch.tensor([index.get(patient_of.get(i), -1) for i in ids])
            keep = rows >= 0
            counts.index_add_(0, rows[keep], fires[keep].long())
            n_cells.index_add_(0, rows[keep], torch.ones(int(keep.sum()), dtype=torch.long))
    if int(n_cells.sum()) == 0:
        raise ValueError("no stored cell belongs to a patient in the manifest")
    diagnosis = manifest.drop_duplicates("patient_id").set_index("patient_id")[target] if target in manifest else None
    frac = counts.double() / n_cells.clamp(min=1)[:, None]
    return pd.DataFrame({
        "patient_id": np.repeat(patients, n_latents),
        target: np.repeat([diagnosis.get(p) if diagnosis is not None else None for p in patients], n_latents),
        "latent": np.tile(np.arange(n_latents), len(patients)),
        "frac": frac.flatten().numpy(),
        "count": counts.flatten().numpy(),
        "n_cells": np.repeat(n_cells.numpy(), n_latents),
    })


def disease_barcodes(barcodes: pd.DataFrame, target: str = "diagnosis") -> pd.DataFrame:
    """Mean barcode over the patients of each group (each patient weighs the same, whatever its cell count)."""
    return barcodes.groupby([target, "latent"], as_index=False)["frac"].mean().rename(columns={"frac": "frac_mean"})


def compare_groups(barcodes: pd.DataFrame, target: str = "diagnosis") -> pd.DataFrame:
    """Per latent and group: Mann-Whitney U of the group's patients against all others (one-vs-rest),
    Benjamini-Hochberg q over all tests, effect = difference of mean fractions (group - rest)."""
    wide = barcodes.pivot(index="patient_id", columns="latent", values="frac")
    groups = barcodes.drop_duplicates("patient_id").set_index("patient_id")[target].reindex(wide.index)
    labels = sorted(groups.dropna().unique())
    if len(labels) < 2:
        raise ValueError(f"column {target!r} has {len(labels)} group(s) among the patients; a comparison needs two or more")
    rows = []
    pairs = [(labels[0], labels[1])] if len(labels) == 2 else [(g, "rest") for g in labels]
    for a, b in pairs:
        in_a = (groups == a).to_numpy()
        in_b = (groups == b).to_numpy() if b != "rest" else ~in_a & groups.notna().to_numpy()
        xa, xb = wide.to_numpy()[in_a], wide.to_numpy()[in_b]
        test = sps.mannwhitneyu(xa, xb, axis=0, alternative="two-sided")
        p = np.where(np.isnan(test.pvalue), 1.0, test.pvalue)  # a latent constant in both groups shows no difference
        rows.append(pd.DataFrame({"latent": wide.columns.to_numpy(), "group_a": a, "group_b": b,
                                  "statistic": test.statistic, "p": p, "effect": xa.mean(0) - xb.mean(0)}))
    table = pd.concat(rows, ignore_index=True)
    table["q"] = sps.false_discovery_control(table["p"].to_numpy(), method="bh")
    return table[["latent", "group_a", "group_b", "statistic", "p", "q", "effect"]].sort_values(["q", "p"]).reset_index(drop=True)


def write_patients(barcodes: pd.DataFrame, out_dir: str | Path, target: str = "diagnosis", summary: dict | None = None) -> Path:
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"barcodes": barcodes, "disease_barcodes": disease_barcodes(barcodes, target)}
    if barcodes[target].nunique() >= 2:
        tables["compare"] = compare_groups(barcodes, target)
    for name, table in tables.items():
        atomic_write_parquet(out / f"{name}.parquet", table)
    atomic_write_json(out / "summary.json", {
        "n_patients": int(barcodes.patient_id.nunique()), "target": target,
        "definition": "frac = cells of the patient where the latent fires above threshold / cells of the patient",
        **(summary or {})})
    return out
