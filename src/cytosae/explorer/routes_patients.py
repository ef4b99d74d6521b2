"""Patients: barcodes, disease comparison (volcano) and a patient's cells (`patients_router`); classifier results
(`classify_router`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from fastapi import APIRouter, HTTPException, Query

from .state import Explorer, ExplorerDep, FastJSON, nan_none
from .tables import records, to_json

patients_router = APIRouter()
classify_router = APIRouter()


@patients_router.get("/api/patients/barcodes",
                     summary="Patient barcodes: fraction of each patient's cells where a latent fires")
def barcodes(ex: ExplorerDep, top: int = Query(48, ge=1, le=512),
             latents: str | None = Query(None, max_length=4000, pattern=r"^ *[0-9]{1,10} *(, *[0-9]{1,10} *)*,? *$",
                                         description="comma-separated latent ids")):
    idx = ex.run.table("patients/barcodes")
    if idx is None:
        raise ex.run.missing("patients/barcodes.parquet")
    raw = idx.df  # one copy in memory, sorted by latent
    chosen = _chosen_latents(ex, latents) if latents else [int(j) for j in _latents_by_variance(ex, raw)[:top]]
    pats = _barcode_patients(ex, raw)
    sub = pd.concat([idx.rows(j) for j in chosen]) if chosen else raw.iloc[:0]
    mat = sub.pivot_table(index="patient_id", columns="latent", values="frac", aggfunc="first")
    mat = mat.reindex(index=pats["patient_id"], columns=chosen).fillna(0.0)
    return {"patients": records(pats), "latents": chosen,
            "frac": np.round(mat.to_numpy(dtype=float), 5).tolist(),
            "measured": "fraction of each patient's cells in which the latent fires (token policy: patients/summary.json)"}


@patients_router.get("/api/patients/compare", summary="Disease comparison per latent (volcano: effect vs -log10 q)")
def compare(ex: ExplorerDep, group_a: str | None = None, group_b: str | None = None):
    raw = ex.run.raw_table("patients/compare")
    if raw is None:
        raise ex.run.missing("patients/compare.parquet")
    pairs = sorted({(str(a), str(b)) for a, b in zip(raw["group_a"], raw["group_b"])})
    if group_a is None and group_b is None and pairs:
        group_a, group_b = pairs[0]
    df = raw[(raw["group_a"].astype(str) == group_a) & (raw["group_b"].astype(str) == group_b)]
    if not len(df):
        raise HTTPException(404, f"no comparison {group_a!r} vs {group_b!r}; available: {pairs}")
    cols = {c: nan_none(df[c]) for c in ("latent", "statistic", "p", "q", "effect") if c in df}
    return FastJSON({"group_a": group_a, "group_b": group_b, "pairs": [list(p) for p in pairs], "n": len(df),
                     "columns": cols, "measured": (ex.run.summary("patients") or {}).get("compare") or
                     "per latent: difference between patient groups of the fraction of cells where it fires; "
                     "q = Benjamini-Hochberg adjusted p"})


@patients_router.get("/api/patients/{patient_id}/cells",
                     summary="A patient's cells ranked by MIL attention (classify/attention.parquet)")
def patient_cells(ex: ExplorerDep, patient_id: str, model: str | None = Query(None, max_length=200),
                  top: int = Query(48, ge=1, le=1000)):
    att = ex.run.raw_table("classify/attention")
    if att is None:
        raise ex.run.missing("classify/attention.parquet")
    models = sorted(att["model"].astype(str).unique())
    model = model or models[0]
    if model not in models:
        raise HTTPException(404, f"no MIL model {model!r} in classify/attention.parquet; available: {models}")
    rows = att[(att["model"] == model) & (att["patient_id"].astype(str) == patient_id)].sort_values("rank")
    if not len(rows):
        raise HTTPException(404, f"patient {patient_id!r} has no cells in classify/attention.parquet")
    cols = [c for c in ("image_id", "rank", "attention", "predicted") if c in rows]
    return {"patient_id": patient_id, "model": model, "models": models, "n_cells": int(len(rows)),
            "dataset": (ex.run.classify_results or {}).get("dataset"), "cells": records(rows[cols].head(top)),
            "measured": "attention of each cell for the class the MIL model predicted for this patient, "
                        "out of fold (first repeat); rank 0 = the cell that weighed most"}


@classify_router.get("/api/classify", summary="Patient-level diagnosis classifiers: results.json")
def classify(ex: ExplorerDep):
    res = ex.run.classify_results
    if res is None:
        raise ex.run.missing("classify/results.json")
    return ex.redact_deep(to_json(res))


def _chosen_latents(ex: Explorer, latents: str) -> list[int]:
    """The barcode columns a client named (at most 512), each checked to exist."""
    try:
        chosen = [int(x) for x in latents.split(",") if x.strip()]
    except ValueError:
        raise HTTPException(400, "latents must be comma-separated integers") from None
    for j in chosen:
        ex.latent(j)
    return chosen[:512]


def _barcode_patients(ex: Explorer, raw: pd.DataFrame) -> pd.DataFrame:
    """One row per patient, grouped by diagnosis: the barcode rows (cached, the table does not change)."""
    return ex.run.cached("barcode_patients", lambda: (
        raw.drop_duplicates("patient_id")[[c for c in ("patient_id", "diagnosis", "n_cells") if c in raw]]
        .sort_values([c for c in ("diagnosis", "patient_id") if c in raw], kind="stable").reset_index(drop=True)))


def _latents_by_variance(ex: Explorer, raw: pd.DataFrame) -> list[int]:
    """Latents ordered by how much their fraction varies between patients: the informative barcode columns."""
    def order():
        var = raw.groupby("latent")["frac"].var().fillna(0).sort_values(ascending=False, kind="stable")
        return [int(j) for j in var.index]
    return ex.run.cached("barcode_variance_order", order)
