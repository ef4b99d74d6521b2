"""Percentile bootstrap CIs of the reported statistics, resampling patients (never cells or images of one)."""
from __future__ import annotations

import numpy as np
import pandas as pd


CI_METHOD = ("95% percentile bootstrap over patients of the reported statistic: in each resample, the mean over "
             "repeats of each repeat's out-of-fold AUROC (calibrated probabilities) and macro-F1 (decisions)")


def percentile_ci(values: np.ndarray) -> list[float] | None:
    """The 2.5th and 97.5th percentiles of the finite draws (a resample without both classes has no AUROC)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return [float(x) for x in np.percentile(v, [2.5, 97.5])] if len(v) else None


def _bootstrap_ci(y: np.ndarray, proba: np.ndarray, classes: list[str], positive: str | None, n: int,
                  seed: int, pred: np.ndarray | None = None) -> dict:
    """95% percentile CIs of the reported statistic: for each resample of patients, the mean over repeats of each
    repeat's macro-F1 and AUROC. `proba` is (n_patients, n_classes) or (repeats, n_patients, n_classes), `pred` the
    decisions likewise. (Bootstrapping probabilities averaged over repeats would score an ensemble, which ranks
    better than any one repeat: its interval can miss the reported point.)"""
    if n <= 0:
        return {"macro_f1_ci": None, "auroc_ci": None}
    rng = np.random.default_rng(seed)  # scikit-learn has no bootstrap CI; these draws are the seeded, tested ones
    codes = np.searchsorted(classes, y)
    probas = proba[None] if proba.ndim == 2 else proba
    preds = [None] * len(probas) if pred is None else (np.asarray(pred)[None] if np.ndim(pred) == 1 else pred)
    pred_codes = [pr.argmax(1) if p is None else np.searchsorted(classes, np.asarray(p).astype(str))
                  for pr, p in zip(probas, preds)]
    pos = classes.index(positive) if positive is not None else None
    idx = rng.integers(0, len(y), (n, len(y)))
    step = max(1, 4_000_000 // max(len(y), 1))  # draws x patients counts held at once
    chunks = []
    for start in range(0, n, step):
        w = _counts(idx[start:start + step], len(y))
        chunks.append(np.mean([weighted_scores(codes, pr, pos, pc, w) for pr, pc in zip(probas, pred_codes)], axis=0))
    draws = np.concatenate(chunks)
    return {"macro_f1_ci": percentile_ci(draws[:, 0]), "auroc_ci": percentile_ci(draws[:, 1])}


def _counts(idx: np.ndarray, n_units: int) -> np.ndarray:
    """(draws, units) how often each unit is in each resample of indices `idx` (draws, size)."""
    rows = len(idx)
    flat = (idx + n_units * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n_units).reshape(rows, n_units).astype(np.float64)


def weighted_scores(codes: np.ndarray, proba: np.ndarray, positive: int | None, pred: np.ndarray,
                    weights: np.ndarray) -> np.ndarray:
    """(draws, 2): `_fast_scores` (macro-F1, AUROC) of every resample at once, each resample given by how often it
    drew each unit (a row of `weights`): a unit drawn twice counts twice in every sum and every pair, which is
    what scoring the resampled arrays does (tests/test_analysis_classify.py compares them)."""
    n_classes = proba.shape[1]
    f1 = []
    for c in range(n_classes):
        truth, said = codes == c, pred == c
        tp, denom = weights[:, truth & said].sum(1), weights[:, said].sum(1) + weights[:, truth].sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1.append(np.where(denom > 0, 2 * tp / denom, 0.0))
    if positive is not None:
        auc = weighted_auc(codes == positive, proba[:, positive], weights)
    else:  # one-vs-rest macro, only in resamples that hold every class
        present = np.stack([weights[:, codes == c].sum(1) > 0 for c in range(n_classes)], 1).all(1)
        auc = np.mean([weighted_auc(codes == c, proba[:, c], weights) for c in range(n_classes)], axis=0)
        auc = np.where(present, auc, np.nan)
    return np.stack([np.mean(f1, axis=0), auc], 1)


def group_weights(groups: np.ndarray, n: int, seed: int, chunk_cells: int = 4_000_000):
    """Yields (draws x units) counts of how often each unit is in a resample, `n` draws in all: patients (groups)
    are drawn with replacement and bring all their units, so a patient's correlated images move together.
    With one unit per group this is the ordinary bootstrap over units."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(groups).astype(str)))
    n_groups = len(uniques)
    rng = np.random.default_rng(seed)
    step = max(1, chunk_cells // max(len(codes), 1))
    for start in range(0, n, step):
        rows = min(step, n - start)
        yield _counts(rng.integers(0, n_groups, (rows, n_groups)), n_groups)[:, codes]


def weighted_auc(is_pos: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of each row of `weights` (how often each unit was drawn), ties counting half: `_auc` of the resampled
    units without re-ranking per resample (one sort, then cumulative negative weights), so that 1,000 draws x
    repeats x labels stay cheap."""
    neg_order = np.argsort(score[~is_pos], kind="stable")
    s_neg = score[~is_pos][neg_order]
    cum = np.zeros((len(weights), len(s_neg) + 1))
    np.cumsum(weights[:, ~is_pos][:, neg_order], axis=1, out=cum[:, 1:])
    below = np.searchsorted(s_neg, score[is_pos], side="left")  # negatives scored strictly lower
    upto = np.searchsorted(s_neg, score[is_pos], side="right")  # ... or tied
    w_pos = weights[:, is_pos]
    n_pos, n_neg = w_pos.sum(1), cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (w_pos * (cum[:, below] + cum[:, upto])).sum(1) / 2 / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def mean_auroc_draws(y: np.ndarray, oof: np.ndarray, groups: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, labels) bootstrap draws of the reported multi-label statistic: per resample of patients, each repeat's
    out-of-fold AUROC of each label, averaged over repeats. `y` (units, labels) bool, `oof` (repeats, units, labels)."""
    out = []
    for w in group_weights(groups, n, seed):
        out.append(np.stack([np.mean([weighted_auc(y[:, j], oof[r, :, j], w) for r in range(len(oof))], axis=0)
                             for j in range(y.shape[1])], axis=1))
    return np.concatenate(out) if out else np.empty((0, y.shape[1]))
