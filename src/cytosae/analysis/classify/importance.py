"""Which concepts a linear model leans on: coefficients, per-patient contributions, and ablation in CV."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import clone

from .folds import _splits
from .metrics import _scores
from .models import ClassifyConfig, _positive, make_model


def _fit_all(x: pd.DataFrame, y: pd.Series, cfg: ClassifyConfig, kind: str):
    yv = y.reindex(x.index).to_numpy()
    return make_model(kind, cfg.seed, cfg.C, cfg.n_trees, len(set(yv))).fit(x.to_numpy(dtype=np.float64), yv)


def concept_importance(x: pd.DataFrame, y: pd.Series, cfg: ClassifyConfig, kind: str = "logreg_l1",
                       top: int = 20) -> pd.DataFrame:
    """Coefficients (standardised features) of a linear model fitted on all patients; largest |coef| first."""
    model = _fit_all(x, y, cfg, kind)
    kept = x.columns[model[0].get_support()]
    classes = list(model.classes_)
    rows = [{"class": classes[1] if len(classes) == 2 else classes[ci], "feature": feat, "coef": float(w)}
            for ci, row in enumerate(model[-1].coef_) for feat, w in zip(kept, row)]
    table = pd.DataFrame(rows)
    table["abs_coef"] = table.coef.abs()
    return (table[table.abs_coef > 0].sort_values("abs_coef", ascending=False).groupby("class").head(top)
            .reset_index(drop=True))


def concept_contributions(x: pd.DataFrame, y: pd.Series, cfg: ClassifyConfig, kind: str = "logreg_l2",
                          top: int = 10) -> pd.DataFrame:
    """Per patient, the concepts that pushed its prediction: coefficient x standardised barcode value of a linear
    model fitted on all patients (binary: toward the positive class; more classes: toward the predicted class)."""
    model = _fit_all(x, y, cfg, kind)
    kept = x.columns[model[0].get_support()]
    z = model[:-1].transform(x.to_numpy(dtype=np.float64))
    coef, classes = model[-1].coef_, list(model[-1].classes_)
    proba = model.predict_proba(x.to_numpy(dtype=np.float64))
    rows = []
    for i, patient in enumerate(x.index):
        c = 0 if len(classes) == 2 else int(proba[i].argmax())
        toward = classes[1] if len(classes) == 2 else classes[c]
        contrib = coef[c] * z[i]
        for rank, j in enumerate(np.argsort(-np.abs(contrib), kind="stable")[:top]):
            rows.append({"patient_id": patient, "model": f"concepts_{kind}", "toward": toward,
                         "predicted": classes[int(proba[i].argmax())], "latent": kept[j],
                         "contribution": float(contrib[j]), "rank": rank})
    return pd.DataFrame(rows)


def _ablation_oof(xv: np.ndarray, yv: np.ndarray, cfg: ClassifyConfig, kind: str, sizes: tuple[int, ...],
                  classes: list[str]) -> dict:
    """Per number m of removed top concepts, the out-of-fold probabilities (repeats, patients, classes)."""
    n_splits, cv = _splits(yv, cfg, cfg.ablation_repeats)
    oof = {m: np.zeros((cfg.ablation_repeats, len(yv), len(classes))) for m in (0, *sizes)}
    for i, (train, test) in enumerate(cv.split(xv, yv)):
        full = make_model(kind, cfg.seed, cfg.C, cfg.n_trees, len(set(yv[train]))).fit(xv[train], yv[train])
        support = np.flatnonzero(full[0].get_support())
        order = support[np.argsort(-np.abs(full[-1].coef_).max(0), kind="stable")]
        for m in (0, *sizes):
            cols = np.setdiff1d(np.arange(xv.shape[1]), order[:m])
            model = full if m == 0 else clone(full).fit(xv[train][:, cols], yv[train])
            proba = model.predict_proba(xv[test][:, cols] if m else xv[test])
            oof[m][i // n_splits][test] = proba[:, [list(model.classes_).index(c) for c in classes]]
    return oof


def ablation(x: pd.DataFrame, y: pd.Series, cfg: ClassifyConfig, kind: str = "logreg_l2",
             sizes: tuple[int, ...] | None = None) -> list[dict]:
    """Drop in CV score when the top-m concepts are removed, the ranking made inside each training fold
    (|coefficient| of `kind` fitted on that fold only, so the test fold never picks what is removed)."""
    sizes = tuple(m for m in (sizes or cfg.ablate) if m < x.shape[1])
    yv = y.reindex(x.index).to_numpy()
    classes = sorted(set(yv))
    positive = _positive(classes, yv, cfg)
    oof = _ablation_oof(x.to_numpy(dtype=np.float64), yv, cfg, kind, sizes, classes)
    rows = []
    for m, p in oof.items():
        s = [_scores(yv, p[r], classes, positive) for r in range(cfg.ablation_repeats)]
        rows.append({"removed_top": m, "model": kind, "macro_f1": float(np.mean([v["macro_f1"] for v in s])),
                     "auroc": float(np.nanmean([v["auroc"] for v in s]))})
    base = rows[0]
    for r in rows:
        r["macro_f1_drop"] = base["macro_f1"] - r["macro_f1"]
        r["auroc_drop"] = base["auroc"] - r["auroc"]
    return rows
