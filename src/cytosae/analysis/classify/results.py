"""What a classification run writes: results.json (as the explorer reads it), predictions, figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from cytosae.analysis.classify_results import (ATTENTION, EXPLANATIONS, PREDICTIONS,  # names and readers live there
                                               RESULTS)


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


def _roc_and_predictions(curves: dict) -> tuple[dict, list[pd.DataFrame]]:
    """Per model, its ROC curve (binary: of the positive class; more: micro-average of one-vs-rest) and its rows
    of predictions.parquet."""
    preds, roc = [], {}
    for name, (patients, y, proba, s, decided) in curves.items():
        classes, positive = s["classes"], s["positive"]
        if positive is not None:
            fpr, tpr, _ = roc_curve(y == positive, proba[:, classes.index(positive)])
        else:
            onehot = np.asarray(classes)[None, :] == np.asarray(y)[:, None]
            fpr, tpr, _ = roc_curve(onehot.ravel(), proba.ravel())
        roc[name] = (fpr, tpr, s["auroc"])
        preds.append(pd.DataFrame({"model": name, "patient_id": patients, "true": y, "decided": decided,
                                   **{f"p_{c}": proba[:, i] for i, c in enumerate(classes)}}))
    return roc, preds


def _write_figures(results: dict, curves: dict, roc: dict, out: Path) -> None:
    from cytosae.analysis import figures

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


def write_classify(results: dict, out_dir: str | Path) -> Path:
    """results.json (as the explorer reads it), predictions.parquet, explanations.parquet (per patient, the
    concepts that pushed its prediction), attention.parquet (MIL: every cell's out-of-fold attention, first repeat)
    and figures/roc.png, figures/confusion.png."""
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = results.pop("_curves", {})
    extras = results.pop("_extras", {})
    roc, preds = _roc_and_predictions(curves)
    files = {}
    if preds:
        atomic_write_parquet(out / PREDICTIONS, pd.concat(preds, ignore_index=True))
        _write_figures(results, curves, roc, out)
    if extras.get("explanations") is not None and len(extras["explanations"]):
        atomic_write_parquet(out / EXPLANATIONS, extras["explanations"])
        files["explanations"] = ("explanations.parquet: per patient, the top concepts by |coefficient x standardised "
                                 "barcode| of an L2 logistic regression fitted on all patients")
    if extras.get("attention"):
        atomic_write_parquet(out / ATTENTION, pd.concat(extras["attention"], ignore_index=True))
        files["attention"] = ("attention.parquet: per MIL model and cell, its attention for the class its patient was "
                              "predicted (out-of-fold, first repeat); rank 0 = the cell that weighed most")
    if files:
        results["files"] = files
    atomic_write_json(out / RESULTS, _finite(results))
    return out


def write_labels(results: dict, out_dir: str | Path) -> Path:
    """results.json and predictions.parquet (per model and unit, the out-of-fold probability of each label)."""
    from cytosae.store.format import atomic_write_json, atomic_write_parquet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    oof, y = results.pop("_oof"), results.pop("_y")
    rows = [pd.DataFrame({"model": name, "unit": units, **{f"true_{c}": y.reindex(units)[c].to_numpy() for c in y},
                          **{f"p_{c}": p[:, j] for j, c in enumerate(y.columns)}}) for name, (units, p) in oof.items()]
    atomic_write_parquet(out / PREDICTIONS, pd.concat(rows, ignore_index=True))
    atomic_write_json(out / RESULTS, _finite(results))
    return out
