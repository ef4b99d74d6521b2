"""Repeated stratified k-fold over patients with any model: out-of-fold, calibrated predictions and their scores."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import cross_val_predict

from .bootstrap import _bootstrap_ci
from .calibration import Calibration
from .folds import _splits, inner_folds
from .metrics import _confusion, _mean_scores, _scores, brier
from .models import ClassifyConfig, ModelOrPrior, _fit, _in_classes, _positive


def sklearn_fit_predict(xv: np.ndarray, yv: np.ndarray, kind: str, cfg: ClassifyConfig, classes: list[str]):
    """fit_predict(train, test) for a scikit-learn model: (test probabilities, held-out training labels and
    probabilities from an inner stratified k-fold of the training patients, for calibration, or None, None)."""
    def fit_predict(train: np.ndarray, test: np.ndarray):
        ytr = yv[train]
        model = _fit(kind, cfg, xv[train], ytr)
        proba = _in_classes(model.predict_proba(xv[test]), model.classes_, classes)
        inner = inner_folds(ytr, cfg)
        if inner is None or len(set(ytr)) < len(classes):
            return proba, None, None
        # every class is in every inner training fold (stratified, >= k patients each): columns = sorted classes
        held = cross_val_predict(ModelOrPrior(kind, cfg.seed, cfg.C, cfg.n_trees), xv[train], ytr, cv=inner,
                                 method="predict_proba")
        return proba, ytr, held
    return fit_predict


def _out_of_fold(yv: np.ndarray, fit_predict, cfg: ClassifyConfig, n_repeats: int, classes: list[str],
                 positive: str | None, on_fold=None) -> dict:
    """Every patient's out-of-fold raw and calibrated probabilities and decision, per repeat."""
    n_splits, cv = _splits(yv, cfg, n_repeats)
    oof = np.zeros((n_repeats, len(yv), len(classes)))
    raw = np.zeros_like(oof)
    decided = np.empty((n_repeats, len(yv)), dtype=object)
    thresholds = []
    for i, (train, test) in enumerate(cv.split(np.zeros(len(yv)), yv)):
        proba, held_y, held_p, *extra = fit_predict(train, test)
        cal = Calibration(classes, positive).fit(held_y, held_p)
        r = i // n_splits
        raw[r][test] = proba
        oof[r][test] = cal.apply(proba)
        decided[r][test] = cal.decide(oof[r][test])
        thresholds.append(cal.threshold)
        if on_fold is not None and extra:
            on_fold(r, test, *extra)
    return {"folds": n_splits, "oof": oof, "raw": raw, "decided": decided.astype(str), "thresholds": thresholds}


def run_cv(yv: np.ndarray, patients: list, fit_predict, cfg: ClassifyConfig, name: str, n_features: int,
           n_repeats: int | None = None, on_fold=None) -> dict:
    """Repeated stratified k-fold over patients with any model: `fit_predict(train, test)` returns (test
    probabilities in sorted-class order, held-out training labels, their probabilities) - the latter two calibrate
    and set the threshold (see Calibration). `on_fold(repeat, test, extra)` sees anything fit_predict returns
    beyond those three (e.g. attention). Returns scores, CIs and the out-of-fold calibrated probabilities
    averaged over repeats."""
    n_repeats = n_repeats or cfg.n_repeats
    classes = sorted(set(yv))
    positive = _positive(classes, yv, cfg)
    f = _out_of_fold(yv, fit_predict, cfg, n_repeats, classes, positive, on_fold)
    oof, decided = f["oof"], f["decided"]
    per_repeat = [_scores(yv, oof[r], classes, positive, decided[r]) for r in range(n_repeats)]
    vote = np.array([pd.Series(decided[:, j]).mode().sort_values().iloc[0] for j in range(len(yv))], dtype=str)
    result = {
        "model": name, "n_features": int(n_features), "n_patients": int(len(yv)), "folds": f["folds"],
        "repeats": n_repeats, "classes": classes, "positive": positive,
        "class_counts": {c: int((yv == c).sum()) for c in classes},
        **_mean_scores(per_repeat, classes),
        "macro_f1_uncalibrated_argmax": float(np.mean([_scores(yv, f["raw"][r], classes, positive)["macro_f1"]
                                                       for r in range(n_repeats)])),
        "brier": brier(yv, oof, classes),
        "confusion": _confusion(yv, vote, classes),
        **_bootstrap_ci(yv, oof, classes, positive, cfg.n_bootstrap, cfg.seed, decided),
    }
    if positive is not None:
        result["threshold_mean"] = float(np.mean(f["thresholds"]))
        result["threshold_sd"] = float(np.std(f["thresholds"]))
    return {"scores": result, "oof_proba": oof.mean(0), "y": yv, "patients": list(patients), "decision": vote}


def cross_validate(x: pd.DataFrame, y: pd.Series, kind: str, cfg: ClassifyConfig) -> dict:
    """Repeated stratified k-fold over patients (rows); returns scores, CIs and the averaged out-of-fold probabilities."""
    if not x.index.is_unique:
        raise ValueError("one row per patient is required: a patient must never be split across folds")
    yv = y.reindex(x.index).to_numpy()
    classes = sorted(set(yv))
    fit_predict = sklearn_fit_predict(x.to_numpy(dtype=np.float64), yv, kind, cfg, classes)
    return run_cv(yv, list(x.index), fit_predict, cfg, kind, x.shape[1])


def mil_fit_predict(bags, yv: np.ndarray, input_kind: str, mil_cfg, classes: list[str]):
    """fit_predict(train, test) for attention MIL over `bags` (row i = patient i of yv): calibration uses the MIL's
    own early-stopping split of the training patients; also returns the test cells' attention table."""
    from cytosae.analysis.mil import attention_table, fit_mil

    def fit_predict(train: np.ndarray, test: np.ndarray):
        fitted = fit_mil(bags.take(train), yv[train], classes, input_kind, mil_cfg)
        test_bags = bags.take(test)
        proba, att = fitted.predict(test_bags)
        return proba, fitted.val_y, fitted.val_proba, attention_table(fitted, test_bags, proba, att)
    return fit_predict


def cross_validate_mil(bags, y: pd.Series, input_kind: str, cfg: ClassifyConfig, mil_cfg=None) -> dict:
    """Attention MIL in the same repeated patient folds as `cross_validate` (same seed, same first repeats);
    also returns the out-of-fold attention of every cell in the first repeat ("attention")."""
    from cytosae.analysis.mil import MILConfig

    mil_cfg = mil_cfg or MILConfig(seed=cfg.seed)
    bags = bags.subset(list(y.index))
    yv = y.to_numpy().astype(str)
    tables = []

    def keep_first_repeat(r, test, table):
        if r == 0:
            tables.append(table)
    fit_predict = mil_fit_predict(bags, yv, input_kind, mil_cfg, sorted(set(yv)))
    out = run_cv(yv, list(y.index), fit_predict, cfg, f"mil_{input_kind}", bags.x.shape[1],
                 n_repeats=cfg.mil_repeats or cfg.n_repeats, on_fold=keep_first_repeat)
    out["attention"] = pd.concat(tables, ignore_index=True)
    return out
