"""Sparse probing (SAEBench): can the m scores most different between a class and the rest predict that class?

Definitions (also written to alignment.json):
- the image-level scores of every method are those of the label alignment (same pass, same token policy); the
  raw embedding is the backbone's own token vectors pooled per image (the CLS token for the cls policy, else the
  mean of the patch tokens, the usual pooled embedding), its dimensions taken as scores;
- folds: one split of the labelled images shared by every class, method and m, grouped by patient_id when the
  store has one (StratifiedGroupKFold), else stratified by class (StratifiedKFold), at most 5 folds, seed 0;
- per class (one vs rest) and fold, the m scores with the largest difference of mean score between the class and
  the rest are chosen on the training images only (SAEBench's selection; PCA components appear in both
  orientations, so the sign costs them nothing); a logistic regression (standardised inputs, balanced class
  weights, C = 1) is fitted on them and scored on the held-out images: balanced accuracy (mean of the true
  positive and true negative rates, since one class vs the rest is unbalanced) and AUROC;
- m = 1, 2, 5, 20, and for the raw embedding also every dimension at once (`m = D`, the probe an SAE's few
  latents are measured against);
- a class enters a fold's figures only when that fold's training and held-out images both hold it and the rest;
  the table's figures are means over folds, then over classes.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

DEFINITIONS = __doc__.split("Definitions (also written to alignment.json):\n")[1]
PROBE_M = (1, 2, 5, 20)


def top_by_mean_difference(scores: np.ndarray, positive: np.ndarray, m: int) -> np.ndarray:
    """(n, L) scores, (n,) bool -> the m columns of highest mean(positive) - mean(rest), best first (ties: lower
    column first, so the choice is a pure function of the data)."""
    diff = scores[positive].mean(0) - scores[~positive].mean(0)
    return np.argsort(-diff, kind="stable")[:min(m, scores.shape[1])]


def _class_sums(scores: np.ndarray, train: np.ndarray, y: np.ndarray, classes: list[str]) -> np.ndarray:
    """Per class, the mean difference over the training rows, for every score at once: (C, L) by one product."""
    s = scores[train].astype(np.float64)
    member = np.stack([y[train] == c for c in classes]).astype(np.float64)  # (C, n_train)
    n_pos = member.sum(1, keepdims=True)
    pos_sum = member @ s
    total = s.sum(0, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pos_sum / n_pos - (total - pos_sum) / (len(s) - n_pos)


def _probe(x_train, y_train, x_test, y_test) -> tuple[float, float]:
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
    # thousands of small fits: sklearn's per-call checks cost more than the fits (inputs are finite float arrays)
    with warnings.catch_warnings(), sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        warnings.simplefilter("ignore")  # a constant column (a dead latent) standardises to 0: harmless
        model.fit(x_train, y_train)
        p = model.predict_proba(x_test)[:, 1]
    return float(balanced_accuracy_score(y_test, p >= 0.5)), float(roc_auc_score(y_test, p))


def sparse_probing(scores: dict[str, np.ndarray], labels: np.ndarray, classes: list[str],
                   groups: np.ndarray | None = None, ms: tuple[int, ...] = PROBE_M,
                   full: tuple[str, ...] = ("raw",)) -> tuple[pd.DataFrame, str]:
    """Per method, m and class: mean balanced accuracy and AUROC over folds (module docstring). `scores`: method
    -> (n, L) image-level scores of the labelled images, in `labels` order; methods in `full` also get the probe
    on all their columns. Returns the per-class table and how the folds were made."""
    from cytosae.analysis.spliced import cell_folds

    from threadpoolctl import threadpool_limits

    folds, how = cell_folds(labels, groups)
    with threadpool_limits(1):  # small fits: BLAS threads only contend (a 2-core machine ran 10x slower with them)
        per_fold = _fold_rows(scores, labels, classes, folds, ms, full)
    per_class = per_fold.groupby(["method", "m", "class"], sort=False).agg(
        balanced_accuracy=("balanced_accuracy", "mean"), auroc=("auroc", "mean"),
        n_folds=("auroc", "size")).reset_index()
    return per_class, how


def _fold_rows(scores: dict[str, np.ndarray], labels: np.ndarray, classes: list[str], folds: list,
               ms: tuple[int, ...], full: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for method, s in scores.items():
        widths = sorted({min(m, s.shape[1]) for m in ms} | ({s.shape[1]} if method in full else set()))
        for train, test in folds:
            diff = _class_sums(s, train, labels, classes)
            s_train, s_test = s[train], s[test]
            for c, cls in enumerate(classes):
                y_tr, y_te = labels[train] == cls, labels[test] == cls
                if not (0 < y_tr.sum() < len(y_tr) and 0 < y_te.sum() < len(y_te)):
                    continue
                order = np.argsort(-np.nan_to_num(diff[c], nan=-np.inf), kind="stable")
                for m in widths:
                    cols = order[:m]
                    bacc, auc = _probe(s_train[:, cols], y_tr, s_test[:, cols], y_te)
                    rows.append({"method": method, "m": m, "class": cls, "balanced_accuracy": bacc, "auroc": auc})
    return pd.DataFrame(rows, columns=["method", "m", "class", "balanced_accuracy", "auroc"])


def probing_table(per_class: pd.DataFrame) -> pd.DataFrame:
    """One row per method and m: the means over classes."""
    table = per_class.groupby(["method", "m"], sort=False).agg(
        balanced_accuracy=("balanced_accuracy", "mean"), auroc=("auroc", "mean"),
        n_classes=("class", "size")).reset_index()
    return table
