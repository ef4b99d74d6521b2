"""Patient-level diagnosis from concept barcodes, against baselines, in patient-level cross-validation.

One row per patient: a patient's cells are summarised before any split, so a patient is never in a
training and a test fold at once. Scores are computed on out-of-fold predictions:

- for each repeat of stratified k-fold, every patient gets one out-of-fold prediction; macro-F1,
  per-class F1 and AUROC (binary: of the positive class; several classes: one-vs-rest, macro) are
  computed over all patients of that repeat, then averaged over repeats;
- confidence intervals: 95% percentile bootstrap over patients (resampling patients with
  replacement) of the metric on the out-of-fold probabilities averaged over repeats.

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
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import VarianceThreshold
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score, roc_curve
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from scipy import stats as sps

CI_METHOD = ("95% percentile bootstrap over patients of the metric on the out-of-fold probabilities "
             "averaged over repeats")


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


# ------------------------------------------------------------------ cross-validation


def _scores(y: np.ndarray, proba: np.ndarray, classes: list[str], positive: str | None) -> dict:
    """macro-F1, per-class F1 (prediction = most probable class) and AUROC, with scikit-learn."""
    pred = np.asarray(classes)[proba.argmax(1)]
    out = {"macro_f1": float(f1_score(y, pred, average="macro", labels=classes, zero_division=0)),
           "per_class_f1": dict(zip(classes, map(float, f1_score(y, pred, average=None, labels=classes,
                                                                  zero_division=0))))}
    present = set(y)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif len(classes) == 2:
        out["auroc"] = float(roc_auc_score(y == positive, proba[:, classes.index(positive)]))
    elif present == set(classes):
        out["auroc"] = float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes))
    else:
        out["auroc"] = float("nan")
    return out


def _fast_scores(codes: np.ndarray, proba: np.ndarray, positive: int | None) -> tuple[float, float]:
    """(macro-F1, AUROC) as `_scores` computes them, in numpy: scikit-learn's input checks cost ~25 ms per
    call, which makes a 1,000-resample bootstrap of six models take minutes. Tested equal to `_scores`."""
    n_classes = proba.shape[1]
    pred = proba.argmax(1)
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
                  seed: int) -> dict:
    if n <= 0:
        return {"macro_f1_ci": None, "auroc_ci": None}
    rng = np.random.default_rng(seed)
    codes = np.searchsorted(classes, y)
    pos = classes.index(positive) if positive is not None else None
    draws = np.array([_fast_scores(codes[idx], proba[idx], pos)
                      for idx in rng.integers(0, len(y), (n, len(y)))])

    def ci(v):
        v = v[np.isfinite(v)]
        return [float(x) for x in np.percentile(v, [2.5, 97.5])] if len(v) else None
    return {"macro_f1_ci": ci(draws[:, 0]), "auroc_ci": ci(draws[:, 1])}


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


def cross_validate(x: pd.DataFrame, y: pd.Series, kind: str, cfg: ClassifyConfig) -> dict:
    """Repeated stratified k-fold over patients (rows); returns scores, CIs and the averaged out-of-fold probabilities."""
    if not x.index.is_unique:
        raise ValueError("one row per patient is required: a patient must never be split across folds")
    yv = y.reindex(x.index).to_numpy()
    classes = sorted(set(yv))
    positive = _positive(classes, yv, cfg)
    n_splits, cv = _splits(yv, cfg, cfg.n_repeats)
    xv = x.to_numpy(dtype=np.float64)
    oof = np.zeros((cfg.n_repeats, len(yv), len(classes)))
    for i, (train, test) in enumerate(cv.split(xv, yv)):
        model = make_model(kind, cfg.seed, cfg.C, cfg.n_trees, len(set(yv[train]))).fit(xv[train], yv[train])
        proba = model.predict_proba(xv[test])
        cols = [list(model.classes_).index(c) if c in model.classes_ else None for c in classes]
        oof[i // n_splits][test] = np.stack([proba[:, j] if j is not None else np.zeros(len(test)) for j in cols], 1)
    per_repeat = [_scores(yv, oof[r], classes, positive) for r in range(cfg.n_repeats)]
    mean_proba = oof.mean(0)
    result = {
        "model": kind, "n_features": int(x.shape[1]), "n_patients": int(len(yv)), "folds": n_splits,
        "repeats": cfg.n_repeats, "classes": classes, "positive": positive,
        "class_counts": {c: int((yv == c).sum()) for c in classes},
        "macro_f1": float(np.mean([s["macro_f1"] for s in per_repeat])),
        "macro_f1_sd_over_repeats": float(np.std([s["macro_f1"] for s in per_repeat])),
        "per_class_f1": {c: float(np.mean([s["per_class_f1"][c] for s in per_repeat])) for c in classes},
        "auroc": float(np.nanmean([s["auroc"] for s in per_repeat])),
        "auroc_sd_over_repeats": float(np.nanstd([s["auroc"] for s in per_repeat])),
        **_bootstrap_ci(yv, mean_proba, classes, positive, cfg.n_bootstrap, cfg.seed),
    }
    return {"scores": result, "oof_proba": mean_proba, "y": yv, "patients": list(x.index)}


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


def external_validation(x_train: pd.DataFrame, y_train: pd.Series, x_test: pd.DataFrame, y_test: pd.Series,
                        kind: str, cfg: ClassifyConfig) -> dict:
    """Fit on every patient of one cohort, score on another (same features, e.g. the same SAE's latents)."""
    missing = [c for c in x_train.columns if c not in x_test.columns]
    if missing:
        raise ValueError(f"the external cohort lacks {len(missing)} feature(s) of the training cohort "
                         f"(first: {missing[:5]}): both must come from the same SAE / cell-type list")
    x_test = x_test.reindex(columns=x_train.columns)
    ytr, yte = y_train.reindex(x_train.index).to_numpy(), y_test.reindex(x_test.index).to_numpy()
    classes = sorted(set(ytr))
    unseen = sorted(set(yte) - set(classes))
    if unseen:
        raise ValueError(f"the external cohort has classes the training cohort lacks: {unseen}")
    positive = _positive(classes, ytr, cfg)
    model = make_model(kind, cfg.seed, cfg.C, cfg.n_trees, len(classes)).fit(x_train.to_numpy(dtype=np.float64), ytr)
    proba = model.predict_proba(x_test.to_numpy(dtype=np.float64))[:, [list(model.classes_).index(c) for c in classes]]
    s = _scores(yte, proba, classes, positive)
    return {"model": kind, "n_train": int(len(ytr)), "n_test": int(len(yte)), "classes": classes, "positive": positive,
            **s, **_bootstrap_ci(yte, proba, classes, positive, cfg.n_bootstrap, cfg.seed)}


# ------------------------------------------------------------------ the whole analysis


def classify_patients(barcodes: pd.DataFrame, cfg: ClassifyConfig, store=None, cell_type_column: str | None = None,
                      proportion: str | None = None, external: pd.DataFrame | None = None,
                      dataset: str | None = None) -> dict:
    """Everything `cytosae classify` reports; returns the results dict and the out-of-fold curves under "_curves"."""
    x, y = barcode_features(barcodes, cfg.target)
    feature_sets: dict[str, tuple[pd.DataFrame, str]] = {f"concepts_{m}": (x, m) for m in cfg.models}
    notes = {}
    if store is not None:
        emb = mean_embedding_features(store).reindex(x.index)
        if emb.isna().any().any():
            raise ValueError("some patients of the barcodes have no cell in the store given for the baselines")
        feature_sets["baseline_mean_embedding_logreg_l2"] = (emb, "logreg_l2")
        notes["baseline_mean_embedding"] = "mean over the patient's cells of the stored CLS token, L2 logistic regression"
        manifest = store.images
        column = cell_type_column or next((c for c in ("cell_type", "label") if c in manifest
                                           and manifest[c].notna().any()), None)
        if column is not None:
            comp = composition_features(manifest, column).reindex(x.index).fillna(0.0)
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
    models, curves = {}, {}
    for name, (feats, kind) in feature_sets.items():
        cv = cross_validate(feats, y, kind, cfg)
        models[name] = cv["scores"]
        curves[name] = (cv["patients"], cv["y"], cv["oof_proba"], cv["scores"])
        positive = cv["scores"]["positive"]
        if feats.shape[1] == 1 and positive is not None:
            # The study's form of a one-number baseline: the number itself ranks patients, nothing is fitted.
            # Fitted per fold, patients tied at 0 get fold-dependent intercepts, which adds noise to the CV AUROC.
            models[name]["auroc_raw_feature"] = float(roc_auc_score(y.reindex(feats.index) == positive,
                                                                    feats.iloc[:, 0]))
    importance = {k: concept_importance(x, y, cfg, kind=k) for k in ("logreg_l1", "logreg_l2")}
    results = {
        "task": cfg.target, "dataset": dataset, "n_patients": int(len(y)),
        "class_counts": y.value_counts().sort_index().astype(int).to_dict(),
        "protocol": {"cv": "repeated stratified k-fold over patients (one row per patient: never split)",
                     "folds": next(iter(models.values()))["folds"], "repeats": cfg.n_repeats, "seed": cfg.seed,
                     "ci": CI_METHOD, "n_bootstrap": cfg.n_bootstrap,
                     "auroc": "binary: of the positive class; more classes: one-vs-rest macro average",
                     "config": asdict(cfg)},
        "models": models, "baselines": notes,
        "importance": {k: v.to_dict("records") for k, v in importance.items()},
        "ablation": ablation(x, y, cfg) if cfg.ablate else [],
    }
    if external is not None:
        xe, ye = barcode_features(external, cfg.target)
        results["external"] = {f"concepts_{m}": external_validation(x, y, xe, ye, m, cfg) for m in cfg.models}
    results["_curves"] = curves
    return results


def write_classify(results: dict, out_dir: str | Path) -> Path:
    """results.json (as the explorer reads it), importance.parquet, predictions.parquet and figures/roc.png."""
    from cytosae.analysis import figures
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = results.pop("_curves", {})
    preds, roc = [], {}
    for name, (patients, y, proba, s) in curves.items():
        classes, positive = s["classes"], s["positive"]
        if positive is not None:
            fpr, tpr, _ = roc_curve(y == positive, proba[:, classes.index(positive)])
        else:  # several classes: micro-average of one-vs-rest curves
            onehot = np.asarray(classes)[None, :] == np.asarray(y)[:, None]
            fpr, tpr, _ = roc_curve(onehot.ravel(), proba.ravel())
        roc[name] = (fpr, tpr, s["auroc"])
        preds.append(pd.DataFrame({"model": name, "patient_id": patients, "true": y, **{f"p_{c}": proba[:, i] for i, c in enumerate(classes)}}))
    if preds:
        atomic_write_parquet(out / "predictions.parquet", pd.concat(preds, ignore_index=True))
        first = next(iter(curves.values()))[3]
        what = (f"positive class {first['positive']}" if first["positive"] is not None
                else "micro-average over one-vs-rest classes")
        pr = results["protocol"]
        title = (f"patient-level {results['task']} ({what}), {results['n_patients']} patients, "
                 f"{pr['repeats']} x {pr['folds']}-fold CV\ncurves: out-of-fold probabilities averaged over repeats; "
                 f"AUROC: mean over repeats")
        figures.save_figure(figures.roc_figure(roc, title), out / "figures" / "roc.png")
        results["figures"] = {"roc": "figures/roc.png"}
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
