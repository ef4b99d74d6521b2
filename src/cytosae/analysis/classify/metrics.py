"""Scores of predictions: F1, AUROC, Brier, confusion (scikit-learn), and numpy twins for the bootstrap."""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats as sps
from sklearn.metrics import brier_score_loss, confusion_matrix, f1_score, roc_auc_score


def _scores(y: np.ndarray, proba: np.ndarray, classes: list[str], positive: str | None,
            pred: np.ndarray | None = None) -> dict:
    """macro-, weighted and per-class F1 of the decisions `pred` (default: the most probable class) and AUROC
    (binary: of the positive class; more classes: one-vs-rest, macro, and per class), with scikit-learn."""
    pred = np.asarray(classes)[proba.argmax(1)] if pred is None else np.asarray(pred)
    f1 = f1_score(y, pred, average=None, labels=classes, zero_division=0)
    support = np.array([(y == c).sum() for c in classes], dtype=np.float64)
    out = {"macro_f1": float(f1.mean()), "weighted_f1": float((f1 * support).sum() / max(support.sum(), 1)),
           "per_class_f1": dict(zip(classes, map(float, f1)))}
    present = set(y)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif len(classes) == 2:
        out["auroc"] = float(roc_auc_score(y == positive, proba[:, classes.index(positive)]))
    elif present == set(classes):
        out["auroc"] = float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes))
    else:
        out["auroc"] = float("nan")
    if len(classes) > 2:
        out["per_class_auroc"] = {c: _auc(y == c, proba[:, i]) for i, c in enumerate(classes)}
    return out


def _fast_scores(codes: np.ndarray, proba: np.ndarray, positive: int | None,
                 pred: np.ndarray | None = None) -> tuple[float, float]:
    """(macro-F1, AUROC) as `_scores` computes them, in numpy: scikit-learn's input checks cost ~25 ms per
    call, which makes a 1,000-resample bootstrap of six models take minutes. Tested equal to `_scores`."""
    n_classes = proba.shape[1]
    pred = proba.argmax(1) if pred is None else pred
    f1 = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (codes == c))
        denom = np.sum(pred == c) + np.sum(codes == c)
        f1.append(2 * tp / denom if denom else 0.0)
    if positive is not None:
        aucs = [_auc(codes == positive, proba[:, positive])]
    elif len(np.unique(codes)) == n_classes:
        aucs = [_auc(codes == c, proba[:, c]) for c in range(n_classes)]
    else:
        aucs = [np.nan]
    return float(np.mean(f1)), float(np.mean(aucs))


def _auc(is_pos: np.ndarray, score: np.ndarray) -> float:
    """AUROC, NaN when a class is absent (roc_auc_score raises there, and its checks are the bootstrap's cost)."""
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = sps.rankdata(score)  # ties get mean ranks, as the Mann-Whitney form of the AUROC needs
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _binary_macro_f1(is_pos: np.ndarray, said_pos: np.ndarray) -> float:
    """Macro-F1 of two classes in numpy: called once per candidate threshold, where f1_score's checks dominate."""
    f = []
    for truth, said in ((is_pos, said_pos), (~is_pos, ~said_pos)):
        denom = truth.sum() + said.sum()
        f.append(2 * (truth & said).sum() / denom if denom else 0.0)
    return float(np.mean(f))


def _mean_scores(per_repeat: list[dict], classes: list[str]) -> dict:
    """Each repeat's scores averaged over repeats (and their spread)."""
    out = {"macro_f1": float(np.mean([s["macro_f1"] for s in per_repeat])),
           "macro_f1_sd_over_repeats": float(np.std([s["macro_f1"] for s in per_repeat])),
           "weighted_f1": float(np.mean([s["weighted_f1"] for s in per_repeat])),
           "per_class_f1": {c: float(np.mean([s["per_class_f1"][c] for s in per_repeat])) for c in classes},
           "auroc": float(np.nanmean([s["auroc"] for s in per_repeat])),
           "auroc_sd_over_repeats": float(np.nanstd([s["auroc"] for s in per_repeat]))}
    if "per_class_auroc" in per_repeat[0]:
        out["per_class_auroc"] = {c: float(np.nanmean([s["per_class_auroc"][c] for s in per_repeat])) for c in classes}
    return out


def brier(y: np.ndarray, probas: np.ndarray, classes: list[str]) -> float:
    """Brier score summed over classes (0 perfect, 2 worst), averaged over repeats of (repeats, n, classes)."""
    with warnings.catch_warnings():  # MIL's float32 softmax sums to 1 within ~1e-7, short of sklearn's float64 check
        warnings.filterwarnings("ignore", "The y_prob values do not sum to one")
        return float(np.mean([brier_score_loss(y, p, labels=classes, scale_by_half=False) for p in probas]))


def _confusion(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    """rows: true class, columns: decided class (patients' majority decision over repeats)."""
    m = confusion_matrix(y, pred, labels=classes)
    return {"classes": classes, "matrix": m.tolist(), "rows": "true class", "columns": "decided class"}
