"""External validation: fit on every patient of one cohort, score on another."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .bootstrap import _bootstrap_ci
from .calibration import Calibration
from .cv import mil_fit_predict, sklearn_fit_predict
from .features import _baseline_sets, barcode_features
from .metrics import _confusion, _scores
from .models import ClassifyConfig, _positive


def _external(ytr: np.ndarray, yte: np.ndarray, fit_predict, cfg: ClassifyConfig, name: str) -> dict:
    """Fit on every training patient (positions 0..n_train-1 of fit_predict's data), score on the rest."""
    classes = sorted(set(ytr))
    unseen = sorted(set(yte) - set(classes))
    if unseen:
        raise ValueError(f"the external cohort has classes the training cohort lacks: {unseen}")
    positive = _positive(classes, ytr, cfg)
    proba, held_y, held_p, *_ = fit_predict(np.arange(len(ytr)), np.arange(len(ytr), len(ytr) + len(yte)))
    cal = Calibration(classes, positive).fit(held_y, held_p)
    calibrated = cal.apply(proba)
    decided = cal.decide(calibrated)
    s = _scores(yte, calibrated, classes, positive, decided)
    out = {"model": name, "n_train": int(len(ytr)), "n_test": int(len(yte)), "classes": classes, "positive": positive,
           **s, "macro_f1_uncalibrated_argmax": _scores(yte, proba, classes, positive)["macro_f1"],
           "confusion": _confusion(yte, decided, classes),
           **_bootstrap_ci(yte, calibrated, classes, positive, cfg.n_bootstrap, cfg.seed, decided)}
    if positive is not None:
        out["threshold"] = cal.threshold
    return out


def external_validation(x_train: pd.DataFrame, y_train: pd.Series, x_test: pd.DataFrame, y_test: pd.Series,
                        kind: str, cfg: ClassifyConfig) -> dict:
    """Fit on every patient of one cohort, score on another (same features, e.g. the same SAE's latents);
    calibration and threshold from an inner CV of the training cohort only."""
    missing = [c for c in x_train.columns if c not in x_test.columns]
    if missing:
        raise ValueError(f"the external cohort lacks {len(missing)} feature(s) of the training cohort "
                         f"(first: {missing[:5]}): both must come from the same SAE / cell-type list")
    x_test = x_test.reindex(columns=x_train.columns)
    ytr, yte = y_train.reindex(x_train.index).to_numpy(), y_test.reindex(x_test.index).to_numpy()
    xv = np.concatenate([x_train.to_numpy(dtype=np.float64), x_test.to_numpy(dtype=np.float64)])
    yall = np.concatenate([ytr, yte])
    return _external(ytr, yte, sklearn_fit_predict(xv, yall, kind, cfg, sorted(set(ytr))), cfg, kind)


def external_validation_mil(bags_train, y_train: pd.Series, bags_test, y_test: pd.Series, input_kind: str,
                            cfg: ClassifyConfig, mil_cfg=None) -> dict:
    """Attention MIL trained on one cohort's cells, scored on another's."""
    from cytosae.analysis.mil import MILConfig, concat_bags

    mil_cfg = mil_cfg or MILConfig(seed=cfg.seed)
    bags = concat_bags(bags_train.subset(list(y_train.index)), bags_test.subset(list(y_test.index)))
    ytr, yte = y_train.to_numpy().astype(str), y_test.to_numpy().astype(str)
    fit_predict = mil_fit_predict(bags, np.concatenate([ytr, yte]), input_kind, mil_cfg, sorted(set(ytr)))
    return _external(ytr, yte, fit_predict, cfg, f"mil_{input_kind}")


def _external_all(x, y, feature_sets, external, cfg, store, external_store, cell_type_column, proportion, bags,
                  external_bags, mil_cfg, models) -> dict:
    """Every model trained on all patients here, tested on the external cohort; with each one's drop from CV."""
    xe, ye = barcode_features(external, cfg.target)
    out = {f"concepts_{m}": external_validation(x, y, xe, ye, m, cfg) for m in cfg.models}
    if store is not None and external_store is not None:
        columns = {name: list(f.columns) for name, (f, _) in feature_sets.items()}
        ext_sets, _ = _baseline_sets(xe, external_store, cell_type_column, proportion, columns)
        for name, (feats, kind) in feature_sets.items():
            if name in ext_sets:
                out[name] = external_validation(feats, y, ext_sets[name][0], ye, kind, cfg)
    for kind in cfg.mil:
        if external_bags and kind in external_bags:
            out[f"mil_{kind}"] = external_validation_mil(bags[kind], y, external_bags[kind], ye, kind, cfg, mil_cfg)
    for name, ext in out.items():
        ext["auroc_cv"], ext["macro_f1_cv"] = models[name]["auroc"], models[name]["macro_f1"]
        ext["auroc_drop_from_cv"] = models[name]["auroc"] - ext["auroc"]
        ext["macro_f1_drop_from_cv"] = models[name]["macro_f1"] - ext["macro_f1"]
    return out
