"""Features per patient: concept barcodes and the baselines computed from the same cells."""
from __future__ import annotations

import numpy as np
import pandas as pd


def barcode_matrix(barcodes: pd.DataFrame) -> pd.DataFrame:
    """(patients x latents) firing fractions from the long barcode table, patients sorted."""
    return barcodes.pivot(index="patient_id", columns="latent", values="frac").sort_index()


def barcode_features(barcodes: pd.DataFrame, target: str = "diagnosis") -> tuple[pd.DataFrame, pd.Series]:
    """(patients x latents firing fractions, patients' target) from the long barcode table."""
    if target not in barcodes:
        raise ValueError(f"the barcodes have no column {target!r}; columns: {list(barcodes.columns)}. "
                         "Recompute them with `cytosae patients --target {target}`")
    x = barcode_matrix(barcodes)
    y = barcodes.drop_duplicates("patient_id").set_index("patient_id")[target].reindex(x.index)
    keep = y.notna()
    return x[keep], y[keep].astype(str)


def mean_embedding_features(store) -> pd.DataFrame:
    """Per patient, the mean over its cells of the stored CLS token (the backbone's embedding at that block)."""
    patient_of = dict(zip(store.images["image_id"], store.images["patient_id"]))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for ids, tokens in store.iter_images(64, tokens="cls"):
        cls = tokens.reshape(len(ids), -1).double().numpy()
        for image_id, row in zip(ids, cls):
            p = patient_of.get(image_id)
            if p is None or (isinstance(p, float) and np.isnan(p)):
                continue
            sums[p] = sums.get(p, 0) + row
            counts[p] = counts.get(p, 0) + 1
    patients = sorted(sums)
    return pd.DataFrame(np.stack([sums[p] / counts[p] for p in patients]), index=pd.Index(patients, name="patient_id"))


def composition_features(manifest: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per patient, the fraction of its cells of each cell type (cells without a type count as 'unlabelled')."""
    if column not in manifest:
        raise ValueError(f"the manifest has no cell-type column {column!r}; columns: {list(manifest.columns)}")
    types = manifest[column].fillna("").astype(str).replace("", "unlabelled")
    table = pd.crosstab(manifest["patient_id"], types, normalize="index")
    table.index.name = "patient_id"
    return table


def _slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "_" for c in str(name)).strip("_")


COMPOSITION = "baseline_cell_type_composition_logreg_l2"


def _baseline_sets(x: pd.DataFrame, store, cell_type_column: str | None, proportion: str | None,
                   columns: dict | None = None) -> tuple[dict, dict]:
    """Baseline feature sets of the patients of `x` from the same cells' store; `columns` (name -> the training
    cohort's columns) aligns an external cohort's cell types to the training cohort's (a missing type is 0)."""
    feature_sets, notes = {}, {}
    emb = mean_embedding_features(store).reindex(x.index)
    if emb.isna().any().any():
        raise ValueError("some patients of the barcodes have no cell in the store given for the baselines")
    feature_sets["baseline_mean_embedding_logreg_l2"] = (emb, "logreg_l2")
    notes["baseline_mean_embedding"] = "mean over the patient's cells of the stored CLS token, L2 logistic regression"
    manifest = store.images
    column = cell_type_column or next((c for c in ("cell_type", "label") if c in manifest
                                       and manifest[c].notna().any()), None)
    if column is None:
        return feature_sets, notes
    comp = composition_features(manifest, column).reindex(x.index).fillna(0.0)
    if columns is not None and COMPOSITION in columns:
        comp = comp.reindex(columns=columns[COMPOSITION], fill_value=0.0)
    feature_sets[COMPOSITION] = (comp, "logreg_l2")
    notes["baseline_cell_type_composition"] = (f"fraction of the patient's cells of each {column!r} value "
                                               f"({comp.shape[1]} types), L2 logistic regression")
    if proportion is not None:
        match = [c for c in comp.columns if c.casefold() == proportion.casefold()]
        if not match:
            raise ValueError(f"cell type {proportion!r} not in column {column!r}: {list(comp.columns)}")
        feature_sets[f"baseline_{_slug(match[0])}_proportion"] = (comp[match], "logreg_l2")
        notes[f"baseline_{_slug(match[0])}_proportion"] = (f"proportion of {match[0]!r} cells alone "
                                                           "(one feature, logistic regression)")
    return feature_sets, notes
