"""Patient-level diagnosis from concept barcodes, against baselines, in patient-level cross-validation.

One row per patient: a patient's cells are summarised before any split, so a patient is never in a
training and a test fold at once. Scores are computed on out-of-fold predictions:

- for each repeat of stratified k-fold, every patient gets one out-of-fold prediction; macro-F1,
  per-class F1 and AUROC (binary: of the positive class; several classes: one-vs-rest, macro) are
  computed over all patients of that repeat, then averaged over repeats;
- confidence intervals: 95% percentile bootstrap over patients (resampling patients with
  replacement) of that same statistic: in each resample, the per-repeat metrics averaged over repeats.

Feature sets ("models"): concept barcodes (fraction of the patient's cells where each latent fires)
with L1- and L2-regularised logistic regression and a random forest; baselines on the same cells:
the mean-pooled backbone embedding (CLS token of the stored block, averaged over the patient's
cells), the cell-type composition (fraction of each cell type) and, when asked, the proportion of one
cell type alone (the DeepAPL study's promyelocyte proportion).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import VarianceThreshold
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from scipy import stats as sps

CI_METHOD = ("95% percentile bootstrap over patients of the reported statistic: in each resample, the mean over "
             "repeats of each repeat's out-of-fold AUROC (calibrated probabilities) and macro-F1 (decisions)")


@dataclass
class ClassifyConfig:
    target: str = "diagnosis"
    n_splits: int = 5
    n_repeats: int = 10
    seed: int = 0
    n_bootstrap: int = 1000
    positive: str | None = None  # binary tasks: the class whose AUROC/ROC is reported; default the rarer one
    ablate: tuple[int, ...] = (1, 5, 10, 20)
    ablation_repeats: int = 3  # refits per removed set are costly; fewer repeats are enough to see a drop
    C: float = 1.0
    n_trees: int = 200
    models: tuple[str, ...] = ("logreg_l1", "logreg_l2", "random_forest")
    inner_folds: int = 3  # inner k-fold of each training fold that calibrates and sets the threshold (0: none)
    mil: tuple[str, ...] = ()  # attention MIL inputs to run: "embedding" and/or "concepts" (need per-cell bags)
    mil_repeats: int | None = None  # repeats of the MIL models (default n_repeats; the first repeats' folds are shared)


def make_model(kind: str, seed: int = 0, C: float = 1.0, n_trees: int = 200, n_classes: int = 2):
    """A fresh estimator. Features are standardised for the linear models so coefficients compare across latents."""
    if kind == "logreg_l1":
        # liblinear solves binary L1 exactly and fast; it has no multinomial mode, where saga takes over.
        solver = "liblinear" if n_classes == 2 else "saga"
        return make_pipeline(VarianceThreshold(0.0), StandardScaler(),
                             LogisticRegression(C=C, l1_ratio=1.0, solver=solver, class_weight="balanced",
                                                max_iter=10000, random_state=seed))
    if kind == "logreg_l2":
        return make_pipeline(VarianceThreshold(0.0), StandardScaler(),
                             LogisticRegression(C=C, l1_ratio=0.0, class_weight="balanced", max_iter=5000,
                                                random_state=seed))
    if kind == "random_forest":
        return RandomForestClassifier(n_estimators=n_trees, class_weight="balanced", random_state=seed, n_jobs=1)
    raise ValueError(f"unknown model {kind!r}: use logreg_l1, logreg_l2 or random_forest")


# ------------------------------------------------------------------ features per patient


def barcode_features(barcodes: pd.DataFrame, target: str = "diagnosis") -> tuple[pd.DataFrame, pd.Series]:
    """(patients x latents firing fractions, patients' target) from the long barcode table."""
    if target not in barcodes:
        raise ValueError(f"the barcodes have no column {target!r}; columns: {list(barcodes.columns)}. "
                         "Recompute them with `cytosae patients --target {target}`")
    x = barcodes.pivot(index="patient_id", columns="latent", values="frac").sort_index()
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


# ------------------------------------------------------------------ scores


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
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = sps.rankdata(score)  # ties get mean ranks, as the Mann-Whitney form of the AUROC needs
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _bootstrap_ci(y: np.ndarray, proba: np.ndarray, classes: list[str], positive: str | None, n: int,
                  seed: int, pred: np.ndarray | None = None) -> dict:
    """95% percentile CIs of the reported statistic: for each resample of patients, the mean over repeats of each
    repeat's macro-F1 and AUROC. `proba` is (n_patients, n_classes) or (repeats, n_patients, n_classes), `pred` the
    decisions likewise. (Bootstrapping probabilities averaged over repeats would score an ensemble, which ranks
    better than any one repeat: its interval can miss the reported point.)"""
    if n <= 0:
        return {"macro_f1_ci": None, "auroc_ci": None}
    rng = np.random.default_rng(seed)
    codes = np.searchsorted(classes, y)
    probas = proba[None] if proba.ndim == 2 else proba
    preds = [None] * len(probas) if pred is None else (np.asarray(pred)[None] if np.ndim(pred) == 1 else pred)
    pred_codes = [None if p is None else np.searchsorted(classes, np.asarray(p).astype(str)) for p in preds]
    pos = classes.index(positive) if positive is not None else None
    draws = np.array([np.mean([_fast_scores(codes[idx], pr[idx], pos, None if pc is None else pc[idx])
                               for pr, pc in zip(probas, pred_codes)], axis=0)
                      for idx in rng.integers(0, len(y), (n, len(y)))])

    def ci(v):
        v = v[np.isfinite(v)]
        return [float(x) for x in np.percentile(v, [2.5, 97.5])] if len(v) else None
    return {"macro_f1_ci": ci(draws[:, 0]), "auroc_ci": ci(draws[:, 1])}


# ------------------------------------------------------------------ calibration and decision threshold


class Calibration:
    """Maps a model's probabilities to calibrated ones and decides, fitted on training patients only.

    Fitted on held-out predictions of TRAINING patients (inner cross-validation of the training fold, or the MIL's
    inner validation split): a logistic regression on the log-odds of the positive class (Platt scaling; several
    classes: on the log-probabilities). Binary tasks then pick the decision threshold on the calibrated
    probability that maximises macro-F1 on those same training predictions (ties: the one nearest 0.5); more
    classes decide by the most probable class. Without enough held-out predictions (a class missing, or fewer
    than MIN_HELD_OUT patients) it is the identity with threshold 0.5."""

    MIN_HELD_OUT = 10

    def __init__(self, classes: list[str], positive: str | None):
        self.classes, self.positive = list(classes), positive
        self.model, self.threshold = None, 0.5

    def _features(self, proba: np.ndarray) -> np.ndarray:
        p = np.clip(proba, 1e-6, 1 - 1e-6)
        if self.positive is not None:
            q = p[:, self.classes.index(self.positive)]
            return np.log(q / (1 - q))[:, None]
        return np.log(p)

    def fit(self, y: np.ndarray | None, proba: np.ndarray | None) -> "Calibration":
        if y is None or proba is None or set(np.asarray(y)) != set(self.classes) or len(y) < self.MIN_HELD_OUT:
            return self
        self.model = LogisticRegression(C=1.0, max_iter=1000).fit(self._features(proba), np.asarray(y))
        if self.positive is not None:
            q = self.apply(proba)[:, self.classes.index(self.positive)]
            is_pos = np.asarray(y) == self.positive
            cands = np.unique(np.concatenate([[0.5], (np.sort(q)[1:] + np.sort(q)[:-1]) / 2]))
            f1 = [_binary_macro_f1(is_pos, q >= t) for t in cands]
            best = np.flatnonzero(np.isclose(f1, max(f1)))
            self.threshold = float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])
        return self

    def apply(self, proba: np.ndarray) -> np.ndarray:
        if self.model is None:
            return proba
        out = self.model.predict_proba(self._features(proba))
        return out[:, [list(self.model.classes_).index(c) for c in self.classes]]

    def decide(self, calibrated: np.ndarray) -> np.ndarray:
        """Class names decided from calibrated probabilities."""
        if self.positive is None:
            return np.asarray(self.classes)[calibrated.argmax(1)]
        other = next(c for c in self.classes if c != self.positive)
        return np.where(calibrated[:, self.classes.index(self.positive)] >= self.threshold, self.positive, other)


def _binary_macro_f1(is_pos: np.ndarray, said_pos: np.ndarray) -> float:
    f = []
    for truth, said in ((is_pos, said_pos), (~is_pos, ~said_pos)):
        denom = truth.sum() + said.sum()
        f.append(2 * (truth & said).sum() / denom if denom else 0.0)
    return float(np.mean(f))


# ------------------------------------------------------------------ cross-validation


def _splits(y: np.ndarray, cfg: ClassifyConfig, n_repeats: int):
    smallest = int(pd.Series(y).value_counts().min())
    if smallest < 2:
        raise ValueError(f"every class needs at least 2 patients for cross-validation; counts: "
                         f"{pd.Series(y).value_counts().to_dict()}")
    n_splits = min(cfg.n_splits, smallest)
    return n_splits, RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=cfg.seed)


def _positive(classes: list[str], y: np.ndarray, cfg: ClassifyConfig) -> str | None:
    if len(classes) != 2:
        return None
    if cfg.positive is not None:
        if cfg.positive not in classes:
            raise ValueError(f"--positive {cfg.positive!r} is not a class of {cfg.target!r}: {classes}")
        return cfg.positive
    counts = pd.Series(y).value_counts()
    return str(min(classes, key=lambda c: (counts.get(c, 0), c)))


def _in_classes(proba: np.ndarray, model_classes, classes: list[str]) -> np.ndarray:
    """Columns of `proba` (in `model_classes` order) rearranged to `classes`; a class the model never saw gets 0."""
    cols = [list(model_classes).index(c) if c in list(model_classes) else None for c in classes]
    return np.stack([proba[:, j] if j is not None else np.zeros(len(proba)) for j in cols], 1)


def _fit(kind: str, cfg: ClassifyConfig, x: np.ndarray, y: np.ndarray):
    """The model fitted; when no feature varies among these patients, the class frequencies (nothing to learn)."""
    if not (np.ptp(x, axis=0) > 0).any():
        return DummyClassifier(strategy="prior").fit(x, y)
    return make_model(kind, cfg.seed, cfg.C, cfg.n_trees, len(set(y))).fit(x, y)


def sklearn_fit_predict(xv: np.ndarray, yv: np.ndarray, kind: str, cfg: ClassifyConfig, classes: list[str]):
    """fit_predict(train, test) for a scikit-learn model: (test probabilities, held-out training labels and
    probabilities from an inner stratified k-fold of the training patients, for calibration, or None, None)."""
    def fit_predict(train: np.ndarray, test: np.ndarray):
        ytr = yv[train]
        n_cls = len(set(ytr))
        model = _fit(kind, cfg, xv[train], ytr)
        proba = _in_classes(model.predict_proba(xv[test]), model.classes_, classes)
        smallest = int(pd.Series(ytr).value_counts().min())
        if cfg.inner_folds < 2 or smallest < 2 or n_cls < len(classes):
            return proba, None, None
        inner = StratifiedKFold(min(cfg.inner_folds, smallest), shuffle=True, random_state=cfg.seed)
        held = np.zeros((len(train), len(classes)))
        for a, b in inner.split(xv[train], ytr):
            m = _fit(kind, cfg, xv[train][a], ytr[a])
            held[b] = _in_classes(m.predict_proba(xv[train][b]), m.classes_, classes)
        return proba, ytr, held
    return fit_predict


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
    per_repeat = [_scores(yv, oof[r], classes, positive, decided[r].astype(str)) for r in range(n_repeats)]
    mean_proba = oof.mean(0)
    vote = np.array([pd.Series(decided[:, j]).mode().sort_values().iloc[0] for j in range(len(yv))], dtype=str)
    result = {
        "model": name, "n_features": int(n_features), "n_patients": int(len(yv)), "folds": n_splits,
        "repeats": n_repeats, "classes": classes, "positive": positive,
        "class_counts": {c: int((yv == c).sum()) for c in classes},
        **_mean_scores(per_repeat, classes),
        "macro_f1_uncalibrated_argmax": float(np.mean([_scores(yv, raw[r], classes, positive)["macro_f1"]
                                                       for r in range(n_repeats)])),
        "brier": float(np.mean(((oof - (np.asarray(classes)[None, None, :] == yv[None, :, None])) ** 2).sum(2))),
        "confusion": _confusion(yv, vote, classes),
        **_bootstrap_ci(yv, oof, classes, positive, cfg.n_bootstrap, cfg.seed, decided.astype(str)),
    }
    if positive is not None:
        result["threshold_mean"], result["threshold_sd"] = float(np.mean(thresholds)), float(np.std(thresholds))
    return {"scores": result, "oof_proba": mean_proba, "y": yv, "patients": list(patients), "decision": vote}


def _mean_scores(per_repeat: list[dict], classes: list[str]) -> dict:
    out = {"macro_f1": float(np.mean([s["macro_f1"] for s in per_repeat])),
           "macro_f1_sd_over_repeats": float(np.std([s["macro_f1"] for s in per_repeat])),
           "weighted_f1": float(np.mean([s["weighted_f1"] for s in per_repeat])),
           "per_class_f1": {c: float(np.mean([s["per_class_f1"][c] for s in per_repeat])) for c in classes},
           "auroc": float(np.nanmean([s["auroc"] for s in per_repeat])),
           "auroc_sd_over_repeats": float(np.nanstd([s["auroc"] for s in per_repeat]))}
    if "per_class_auroc" in per_repeat[0]:
        out["per_class_auroc"] = {c: float(np.nanmean([s["per_class_auroc"][c] for s in per_repeat])) for c in classes}
    return out


def _confusion(y: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    """rows: true class, columns: decided class (patients' majority decision over repeats)."""
    m = confusion_matrix(y, pred, labels=classes)
    return {"classes": classes, "matrix": m.tolist(), "rows": "true class", "columns": "decided class"}


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


def concept_importance(x: pd.DataFrame, y: pd.Series, cfg: ClassifyConfig, kind: str = "logreg_l1",
                       top: int = 20) -> pd.DataFrame:
    """Coefficients (standardised features) of a linear model fitted on all patients; largest |coef| first."""
    yv = y.reindex(x.index).to_numpy()
    model = make_model(kind, cfg.seed, cfg.C, cfg.n_trees, len(set(yv))).fit(x.to_numpy(dtype=np.float64), yv)
    kept = x.columns[model[0].get_support()]
    coef = model[-1].coef_
    rows = []
    classes = list(model.classes_)
    for ci, row in enumerate(coef):
        cls = classes[1] if len(classes) == 2 else classes[ci]
        for feat, w in zip(kept, row):
            rows.append({"class": cls, "feature": feat, "coef": float(w)})
    table = pd.DataFrame(rows)
    table["abs_coef"] = table.coef.abs()
    return (table[table.abs_coef > 0].sort_values("abs_coef", ascending=False).groupby("class").head(top)
            .reset_index(drop=True))


def ablation(x: pd.DataFrame, y: pd.Series, cfg: ClassifyConfig, kind: str = "logreg_l2",
             sizes: tuple[int, ...] | None = None) -> list[dict]:
    """Drop in CV score when the top-m concepts are removed, the ranking made inside each training fold
    (|coefficient| of `kind` fitted on that fold only, so the test fold never picks what is removed)."""
    sizes = tuple(m for m in (sizes or cfg.ablate) if m < x.shape[1])
    yv = y.reindex(x.index).to_numpy()
    classes = sorted(set(yv))
    positive = _positive(classes, yv, cfg)
    n_splits, cv = _splits(yv, cfg, cfg.ablation_repeats)
    xv = x.to_numpy(dtype=np.float64)
    oof = {m: np.zeros((cfg.ablation_repeats, len(yv), len(classes))) for m in (0, *sizes)}
    for i, (train, test) in enumerate(cv.split(xv, yv)):
        full = make_model(kind, cfg.seed, cfg.C, cfg.n_trees, len(set(yv[train]))).fit(xv[train], yv[train])
        support = np.flatnonzero(full[0].get_support())
        order = support[np.argsort(-np.abs(full[-1].coef_).max(0), kind="stable")]
        for m in (0, *sizes):
            cols = np.setdiff1d(np.arange(xv.shape[1]), order[:m])
            model = full if m == 0 else clone(full).fit(xv[train][:, cols], yv[train])
            proba = model.predict_proba(xv[test][:, cols] if m else xv[test])
            idx = [list(model.classes_).index(c) for c in classes]
            oof[m][i // n_splits][test] = proba[:, idx]
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


# ------------------------------------------------------------------ the whole analysis


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
    if columns is not None and "baseline_cell_type_composition_logreg_l2" in columns:
        comp = comp.reindex(columns=columns["baseline_cell_type_composition_logreg_l2"], fill_value=0.0)
    feature_sets["baseline_cell_type_composition_logreg_l2"] = (comp, "logreg_l2")
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


MIL_NOTES = {"mil_embedding": "attention MIL (gated attention, one branch per class, as SCEMILA) over each cell's "
                              "stored embedding",
             "mil_concepts": "attention MIL over each cell's SAE concept activations (token policy of the barcodes)"}


def classify_patients(barcodes: pd.DataFrame, cfg: ClassifyConfig, store=None, cell_type_column: str | None = None,
                      proportion: str | None = None, external: pd.DataFrame | None = None,
                      dataset: str | None = None, external_store=None, bags: dict | None = None,
                      external_bags: dict | None = None, mil_cfg=None) -> dict:
    """Everything `cytosae classify` reports; returns the results dict and the out-of-fold curves under "_curves".

    `bags` / `external_bags`: per MIL input kind of cfg.mil, the cells' features (mil.cell_features) of this / the
    external cohort. With `external`, every model whose inputs exist for the external cohort (baselines need
    `external_store`, MIL needs `external_bags`) is also trained on all patients here and tested there."""
    x, y = barcode_features(barcodes, cfg.target)
    feature_sets: dict[str, tuple[pd.DataFrame, str]] = {f"concepts_{m}": (x, m) for m in cfg.models}
    notes = {}
    if store is not None:
        more, notes = _baseline_sets(x, store, cell_type_column, proportion)
        feature_sets.update(more)
    missing = [k for k in cfg.mil if k not in (bags or {})]
    if missing:
        raise ValueError(f"MIL over {missing} needs those cells' features (a store, and the SAE for concepts)")
    models, curves, extras = {}, {}, {"attention": []}
    for name, (feats, kind) in feature_sets.items():
        cv = cross_validate(feats, y, kind, cfg)
        models[name] = cv["scores"]
        curves[name] = (cv["patients"], cv["y"], cv["oof_proba"], cv["scores"], cv["decision"])
        positive = cv["scores"]["positive"]
        if feats.shape[1] == 1 and positive is not None:
            # The study's form of a one-number baseline: the number itself ranks patients, nothing is fitted.
            # Fitted per fold, patients tied at 0 get fold-dependent intercepts, which adds noise to the CV AUROC.
            models[name]["auroc_raw_feature"] = float(roc_auc_score(y.reindex(feats.index) == positive,
                                                                    feats.iloc[:, 0]))
    for kind in cfg.mil:
        name = f"mil_{kind}"
        cv = cross_validate_mil(bags[kind], y, kind, cfg, mil_cfg)
        models[name] = cv["scores"]
        curves[name] = (cv["patients"], cv["y"], cv["oof_proba"], cv["scores"], cv["decision"])
        extras["attention"].append(cv["attention"].assign(model=name))
        notes[name] = MIL_NOTES[name]
    importance = {k: concept_importance(x, y, cfg, kind=k) for k in ("logreg_l1", "logreg_l2")}
    results = {
        "task": cfg.target, "dataset": dataset, "n_patients": int(len(y)),
        "class_counts": y.value_counts().sort_index().astype(int).to_dict(),
        "protocol": {"cv": "repeated stratified k-fold over patients (one row per patient: never split)",
                     "folds": next(iter(models.values()))["folds"], "repeats": cfg.n_repeats, "seed": cfg.seed,
                     "ci": CI_METHOD, "n_bootstrap": cfg.n_bootstrap,
                     "auroc": "binary: of the positive class; more classes: one-vs-rest macro average (per class "
                              "in per_class_auroc)",
                     "calibration": Calibration.__doc__.split("\n\n")[1].strip() if Calibration.__doc__ else "",
                     "f1": "macro_f1 / weighted_f1 / per_class_f1 of the calibrated decisions (threshold chosen on "
                           "training patients only); macro_f1_uncalibrated_argmax: of the most probable class",
                     "config": asdict(cfg)},
        "models": models, "baselines": notes,
        "importance": {k: v.to_dict("records") for k, v in importance.items()},
        "ablation": ablation(x, y, cfg) if cfg.ablate else [],
    }
    if "concepts" in cfg.mil:
        from cytosae.analysis.mil import MILConfig, concept_weights, fit_mil

        concept_bags = bags["concepts"].subset(list(y.index))
        fitted = fit_mil(concept_bags, y.to_numpy(), sorted(set(y)), "concepts", mil_cfg or MILConfig(seed=cfg.seed))
        results["mil_concept_weights"] = {
            "what": "concept MIL fitted on all patients: per class, the latents whose input weights most raise that "
                    "class's attention and score (linearised through the first layer; see mil.concept_weights)",
            "weights": concept_weights(fitted, concept_bags).to_dict("records")}
    if external is not None:
        results["external"] = _external_all(x, y, feature_sets, external, cfg, store, external_store,
                                            cell_type_column, proportion, bags, external_bags, mil_cfg, models)
    extras["explanations"] = concept_contributions(x, y, cfg)
    results["_curves"], results["_extras"] = curves, extras
    return results


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


def concept_contributions(x: pd.DataFrame, y: pd.Series, cfg: ClassifyConfig, kind: str = "logreg_l2",
                          top: int = 10) -> pd.DataFrame:
    """Per patient, the concepts that pushed its prediction: coefficient x standardised barcode value of a linear
    model fitted on all patients (binary: toward the positive class; more classes: toward the predicted class)."""
    yv = y.reindex(x.index).to_numpy()
    model = make_model(kind, cfg.seed, cfg.C, cfg.n_trees, len(set(yv))).fit(x.to_numpy(dtype=np.float64), yv)
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


def write_classify(results: dict, out_dir: str | Path) -> Path:
    """results.json (as the explorer reads it), predictions.parquet, explanations.parquet (per patient, the
    concepts that pushed its prediction), attention.parquet (MIL: every cell's out-of-fold attention, first repeat)
    and figures/roc.png, figures/confusion.png."""
    from cytosae.analysis import figures
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = results.pop("_curves", {})
    extras = results.pop("_extras", {})
    preds, roc = [], {}
    for name, (patients, y, proba, s, decided) in curves.items():
        classes, positive = s["classes"], s["positive"]
        if positive is not None:
            fpr, tpr, _ = roc_curve(y == positive, proba[:, classes.index(positive)])
        else:  # several classes: micro-average of one-vs-rest curves
            onehot = np.asarray(classes)[None, :] == np.asarray(y)[:, None]
            fpr, tpr, _ = roc_curve(onehot.ravel(), proba.ravel())
        roc[name] = (fpr, tpr, s["auroc"])
        preds.append(pd.DataFrame({"model": name, "patient_id": patients, "true": y, "decided": decided,
                                   **{f"p_{c}": proba[:, i] for i, c in enumerate(classes)}}))
    files = {}
    if preds:
        atomic_write_parquet(out / "predictions.parquet", pd.concat(preds, ignore_index=True))
        first = next(iter(curves.values()))[3]
        what = (f"positive class {first['positive']}" if first["positive"] is not None
                else "micro-average over one-vs-rest classes")
        pr = results["protocol"]
        cv = f"{results['n_patients']} patients, {pr['repeats']} x {pr['folds']}-fold CV"
        title = (f"patient-level {results['task']} ({what}), {cv}\ncurves: out-of-fold calibrated probabilities "
                 f"averaged over repeats; AUROC: mean over repeats")
        figures.save_figure(figures.roc_figure(roc, title), out / "figures" / "roc.png")
        figures.save_figure(figures.confusion_figure(
            {n: c[3]["confusion"] for n, c in curves.items()},
            f"patient-level {results['task']}, {cv}: each patient's majority decision over repeats "
            f"(calibrated, threshold from training folds)"), out / "figures" / "confusion.png")
        results["figures"] = {"roc": "figures/roc.png", "confusion": "figures/confusion.png"}
    if extras.get("explanations") is not None and len(extras["explanations"]):
        atomic_write_parquet(out / "explanations.parquet", extras["explanations"])
        files["explanations"] = ("explanations.parquet: per patient, the top concepts by |coefficient x standardised "
                                 "barcode| of an L2 logistic regression fitted on all patients")
    if extras.get("attention"):
        atomic_write_parquet(out / "attention.parquet", pd.concat(extras["attention"], ignore_index=True))
        files["attention"] = ("attention.parquet: per MIL model and cell, its attention for the class its patient was "
                              "predicted (out-of-fold, first repeat); rank 0 = the cell that weighed most")
    if files:
        results["files"] = files
    atomic_write_json(out / "results.json", _finite(results))
    return out


def _finite(obj):
    """JSON has no NaN: undefined scores (e.g. AUROC of a one-class fold) become null."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _slug(name: str) -> str:
    return "".join(c.lower() if c.isalnum() else "_" for c in str(name)).strip("_")


# ------------------------------------------------------------------ multi-label targets


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


def _group_folds(groups: np.ndarray, n_splits: int, rng: np.random.Generator):
    """k folds over groups (patients): every unit of a group in the same fold."""
    uniq = rng.permutation(np.unique(groups))
    fold_of = {g: i % n_splits for i, g in enumerate(uniq)}
    f = np.array([fold_of[g] for g in groups])
    return [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in range(n_splits)]


def classify_multilabel(x: pd.DataFrame, labels: pd.DataFrame, cfg: ClassifyConfig, groups: np.ndarray | None = None,
                        name: str = "concepts_logreg_l2", kind: str = "logreg_l2") -> dict:
    """One binary model per label on the same folds (grouped by patient when `groups` is given, so a patient's
    images never straddle a split); per-label out-of-fold AUROC (mean over repeats) with a bootstrap CI over units
    of the probabilities averaged over repeats, and the macro AUROC over labels."""
    labels = labels.reindex(x.index)
    if labels.isna().any().any():
        raise ValueError("some rows of the features have no labels")
    groups = np.asarray(x.index) if groups is None else np.asarray(groups)
    n_splits = min(cfg.n_splits, len(np.unique(groups)))
    if n_splits < 2:
        raise ValueError("multi-label cross-validation needs at least 2 patients / images")
    xv, yv = x.to_numpy(dtype=np.float64), labels.to_numpy(dtype=bool)
    rng = np.random.default_rng(cfg.seed)
    oof = np.zeros((cfg.n_repeats, *yv.shape))
    for r in range(cfg.n_repeats):
        for train, test in _group_folds(groups, n_splits, rng):
            for j in range(yv.shape[1]):
                ytr = np.where(yv[train, j], "yes", "no")
                model = _fit(kind, cfg, xv[train], ytr)
                oof[r][test, j] = _in_classes(model.predict_proba(xv[test]), model.classes_, ["no", "yes"])[:, 1]
    per_label = {}
    boot = np.random.default_rng(cfg.seed)
    draws = boot.integers(0, len(yv), (cfg.n_bootstrap, len(yv))) if cfg.n_bootstrap > 0 else []
    for j, col in enumerate(labels.columns):
        aucs = [_auc(yv[:, j], oof[r][:, j]) for r in range(cfg.n_repeats)]
        mean_p = oof[:, :, j].mean(0)
        b = np.array([_auc(yv[idx, j], mean_p[idx]) for idx in draws])
        b = b[np.isfinite(b)]
        per_label[col] = {"auroc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan"),
                          "auroc_ci": [float(v) for v in np.percentile(b, [2.5, 97.5])] if len(b) else None,
                          "n_positive": int(yv[:, j].sum()), "n": int(len(yv))}
    finite = [v["auroc"] for v in per_label.values() if np.isfinite(v["auroc"])]
    return {"model": name, "n_units": int(len(yv)), "folds": n_splits, "repeats": cfg.n_repeats,
            "grouped_by_patient": groups is not None and len(np.unique(groups)) < len(groups),
            "macro_auroc": float(np.mean(finite)) if finite else float("nan"),
            "macro_auroc_over": f"{len(finite)} of {len(per_label)} labels (a label without both values is left out)",
            "per_label": per_label, "_oof": oof.mean(0)}


def classify_labels(store, labels: list[str], cfg: ClassifyConfig, level: str = "image", encode=None,
                    token_policy: str = "cls", barcodes: pd.DataFrame | None = None) -> dict:
    """Multi-label targets (e.g. CT-RATE's abnormality columns): per label AUROC and the macro AUROC, for the
    concepts (image level: the SAE activations of each image under `token_policy`; patient level: the barcodes)
    and the backbone embedding (image level: the stored CLS token; patient level: its mean over the patient)."""
    from cytosae.analysis.mil import image_features

    manifest = store.images
    y = label_table(manifest, labels, level)
    sets = {}
    if level == "image":
        ids, emb = image_features(store, "embedding")
        sets["baseline_embedding_logreg_l2"] = pd.DataFrame(emb.numpy(), index=pd.Index(ids, name="image_id"))
        if encode is not None:
            ids, z = image_features(store, "concepts", encode=encode, token_policy=token_policy)
            sets["concepts_logreg_l2"] = pd.DataFrame(z.numpy(), index=pd.Index(ids, name="image_id"))
        pid = dict(zip(manifest["image_id"].astype(str), manifest.get("patient_id", manifest["image_id"])))
    else:
        if barcodes is not None:
            sets["concepts_logreg_l2"] = barcodes.pivot(index="patient_id", columns="latent", values="frac").sort_index()
        sets["baseline_embedding_logreg_l2"] = mean_embedding_features(store)
        pid = None
    models, oof = {}, {}
    for name, x in sets.items():
        x = x[x.index.isin(y.index)]
        groups = None
        if pid is not None:
            g = pd.Series([pid.get(i) for i in x.index])
            groups = np.where(g.isna(), np.asarray(x.index), g.astype(str)) if g.notna().any() else None
        res = classify_multilabel(x, y, cfg, groups=groups, name=name)
        oof[name] = (list(x.index), res.pop("_oof"))
        models[name] = res
    return {"task": "multi-label", "labels": list(labels), "level": level, "n_units": int(len(y)),
            "prevalence": {c: float(y[c].mean()) for c in labels},
            "protocol": {"cv": f"{cfg.n_repeats} x {cfg.n_splits}-fold over "
                               + ("images grouped by patient" if level == "image" else "patients"),
                         "model": "one L2 logistic regression per label (class-balanced, standardised features)",
                         "ci": "95% percentile bootstrap over units of the out-of-fold probabilities averaged over "
                               "repeats", "seed": cfg.seed, "n_bootstrap": cfg.n_bootstrap},
            "models": models, "_oof": oof, "_y": y}


def write_labels(results: dict, out_dir: str | Path) -> Path:
    """results.json and predictions.parquet (per model and unit, the out-of-fold probability of each label)."""
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    oof, y = results.pop("_oof"), results.pop("_y")
    rows = [pd.DataFrame({"model": name, "unit": units, **{f"true_{c}": y.reindex(units)[c].to_numpy() for c in y},
                          **{f"p_{c}": p[:, j] for j, c in enumerate(y.columns)}}) for name, (units, p) in oof.items()]
    atomic_write_parquet(out / "predictions.parquet", pd.concat(rows, ignore_index=True))
    atomic_write_json(out / "results.json", _finite(results))
    return out
