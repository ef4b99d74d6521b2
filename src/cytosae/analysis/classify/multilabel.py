"""Multi-label targets (e.g. CT-RATE's abnormality columns): one binary model per label, per-label AUROC."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .bootstrap import mean_auroc_draws, percentile_ci
from .features import barcode_matrix, mean_embedding_features
from .folds import _group_folds
from .metrics import _auc
from .models import ClassifyConfig, _fit, _in_classes

LABELS_CI_METHOD = ("95% percentile bootstrap over patients (an image level without patients: over images) of the "
             "reported statistic: in each resample, the mean over repeats of each repeat's out-of-fold AUROC")


def truthy(values: pd.Series) -> pd.Series:
    """A label column as booleans: 1 / true / yes / y / positive (any case) are present; anything else absent."""
    if values.dtype == bool:
        return values
    if pd.api.types.is_numeric_dtype(values):
        return values.fillna(0) > 0
    return values.astype(str).str.strip().str.casefold().isin({"1", "1.0", "true", "yes", "y", "positive"})


def label_table(manifest: pd.DataFrame, labels: list[str], level: str = "image") -> pd.DataFrame:
    """(units x labels) booleans: images, or patients (a patient has a label when any of its images has it)."""
    missing = [c for c in labels if c not in manifest]
    if missing:
        raise ValueError(f"the manifest has no label column(s) {missing}; columns: {list(manifest.columns)}")
    table = pd.DataFrame({c: truthy(manifest[c]) for c in labels})
    if level == "image":
        return table.set_axis(manifest["image_id"].astype(str)).rename_axis("image_id")
    if level == "patient":
        if "patient_id" not in manifest or manifest["patient_id"].isna().all():
            raise ValueError("--level patient needs a patient_id column in the manifest")
        return table.groupby(manifest["patient_id"].astype(str).to_numpy()).any().rename_axis("patient_id")
    raise ValueError(f"level must be 'image' or 'patient', got {level!r}")


def _multilabel_oof(xv: np.ndarray, yv: np.ndarray, groups: np.ndarray, n_splits: int, cfg: ClassifyConfig,
                    kind: str) -> np.ndarray:
    """(repeats, units, labels) out-of-fold probabilities of each label, the same grouped folds for every label."""
    rng = np.random.default_rng(cfg.seed)
    oof = np.zeros((cfg.n_repeats, *yv.shape))
    for r in range(cfg.n_repeats):
        for train, test in _group_folds(groups, n_splits, rng):
            for j in range(yv.shape[1]):
                model = _fit(kind, cfg, xv[train], np.where(yv[train, j], "yes", "no"))
                oof[r][test, j] = _in_classes(model.predict_proba(xv[test]), model.classes_, ["no", "yes"])[:, 1]
    return oof


def classify_multilabel(x: pd.DataFrame, labels: pd.DataFrame, cfg: ClassifyConfig, groups: np.ndarray | None = None,
                        name: str = "concepts_logreg_l2", kind: str = "logreg_l2") -> dict:
    """One binary model per label on the same folds (grouped by patient when `groups` is given, so a patient's
    images never straddle a split); per-label out-of-fold AUROC (mean over repeats) with a bootstrap CI of that
    same statistic, resampling patients (`groups`) or, without them, units; and the macro AUROC over labels."""
    labels = labels.reindex(x.index)
    if labels.isna().any().any():
        raise ValueError("some rows of the features have no labels")
    grouped = groups is not None
    groups = np.asarray(x.index) if groups is None else np.asarray(groups)
    n_splits = min(cfg.n_splits, len(np.unique(groups)))
    if n_splits < 2:
        raise ValueError("multi-label cross-validation needs at least 2 patients / images")
    yv = labels.to_numpy(dtype=bool)
    oof = _multilabel_oof(x.to_numpy(dtype=np.float64), yv, groups, n_splits, cfg, kind)
    draws = mean_auroc_draws(yv, oof, groups, max(cfg.n_bootstrap, 0), cfg.seed)
    per_label = {}
    for j, col in enumerate(labels.columns):
        aucs = [_auc(yv[:, j], oof[r][:, j]) for r in range(cfg.n_repeats)]
        per_label[col] = {"auroc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan"),
                          "auroc_ci": percentile_ci(draws[:, j]), "n_positive": int(yv[:, j].sum()), "n": int(len(yv))}
    finite = [v["auroc"] for v in per_label.values() if np.isfinite(v["auroc"])]
    return {"model": name, "n_units": int(len(yv)), "folds": n_splits, "repeats": cfg.n_repeats,
            "grouped_by_patient": grouped and len(np.unique(groups)) < len(groups),
            "macro_auroc": float(np.mean(finite)) if finite else float("nan"),
            "macro_auroc_over": f"{len(finite)} of {len(per_label)} labels (a label without both values is left out)",
            "per_label": per_label, "_oof": oof.mean(0)}


def _label_feature_sets(store, level: str, encode, token_policy: str, barcodes) -> tuple[dict, dict | None]:
    """(name -> units x features, image -> patient or None): concepts and the embedding at image or patient level."""
    from cytosae.analysis.mil import image_features

    manifest, sets = store.images, {}
    if level != "image":
        if barcodes is not None:
            sets["concepts_logreg_l2"] = barcode_matrix(barcodes)
        sets["baseline_embedding_logreg_l2"] = mean_embedding_features(store)
        return sets, None
    ids, emb = image_features(store, "embedding")
    sets["baseline_embedding_logreg_l2"] = pd.DataFrame(emb.numpy(), index=pd.Index(ids, name="image_id"))
    if encode is not None:
        ids, z = image_features(store, "concepts", encode=encode, token_policy=token_policy)
        sets["concepts_logreg_l2"] = pd.DataFrame(z.numpy(), index=pd.Index(ids, name="image_id"))
    return sets, dict(zip(manifest["image_id"].astype(str), manifest.get("patient_id", manifest["image_id"])))


def _groups(index: pd.Index, pid: dict | None) -> np.ndarray | None:
    """Each image's patient (an image without one is its own group); None at patient level or with no patients."""
    if pid is None:
        return None
    g = pd.Series([pid.get(i) for i in index])
    return np.where(g.isna(), np.asarray(index), g.astype(str)) if g.notna().any() else None


def classify_labels(store, labels: list[str], cfg: ClassifyConfig, level: str = "image", encode=None,
                    token_policy: str = "cls", barcodes: pd.DataFrame | None = None) -> dict:
    """Multi-label targets (e.g. CT-RATE's abnormality columns): per label AUROC and the macro AUROC, for the
    concepts (image level: the SAE activations of each image under `token_policy`; patient level: the barcodes)
    and the backbone embedding (image level: the stored CLS token; patient level: its mean over the patient)."""
    y = label_table(store.images, labels, level)
    sets, pid = _label_feature_sets(store, level, encode, token_policy, barcodes)
    models, oof = {}, {}
    for name, x in sets.items():
        x = x[x.index.isin(y.index)]
        res = classify_multilabel(x, y, cfg, groups=_groups(x.index, pid), name=name)
        oof[name] = (list(x.index), res.pop("_oof"))
        models[name] = res
    return {"task": "multi-label", "labels": list(labels), "level": level, "n_units": int(len(y)),
            "prevalence": {c: float(y[c].mean()) for c in labels},
            "protocol": {"cv": f"{cfg.n_repeats} x {cfg.n_splits}-fold over "
                               + ("images grouped by patient" if level == "image" else "patients"),
                         "model": "one L2 logistic regression per label (class-balanced, standardised features)",
                         "ci": LABELS_CI_METHOD, "seed": cfg.seed, "n_bootstrap": cfg.n_bootstrap},
            "models": models, "_oof": oof, "_y": y}
