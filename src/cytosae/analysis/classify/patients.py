"""`cytosae classify`: every feature set and model in the same patient folds, importance, ablation, external."""
from __future__ import annotations

from dataclasses import asdict

import pandas as pd
from sklearn.metrics import roc_auc_score

from .bootstrap import CI_METHOD
from .calibration import Calibration
from .cv import cross_validate, cross_validate_mil
from .external import _external_all
from .features import _baseline_sets, barcode_features
from .importance import ablation, concept_contributions, concept_importance
from .models import ClassifyConfig

MIL_NOTES = {"mil_embedding": "attention MIL (gated attention, one branch per class, as SCEMILA) over each cell's "
                              "stored embedding",
             "mil_concepts": "attention MIL over each cell's SAE concept activations (token policy of the barcodes)"}


def _cross_validate_all(feature_sets: dict, y: pd.Series, cfg: ClassifyConfig, bags, mil_cfg, notes: dict):
    """(scores, curves, attention tables) of every feature set's model and of each MIL input, same folds."""
    models, curves, attention = {}, {}, []
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
        attention.append(cv["attention"].assign(model=name))
        notes[name] = MIL_NOTES[name]
    return models, curves, attention


def _protocol(cfg: ClassifyConfig, folds: int) -> dict:
    return {"cv": "repeated stratified k-fold over patients (one row per patient: never split)",
            "folds": folds, "repeats": cfg.n_repeats, "seed": cfg.seed,
            "ci": CI_METHOD, "n_bootstrap": cfg.n_bootstrap,
            "auroc": "binary: of the positive class; more classes: one-vs-rest macro average (per class "
                     "in per_class_auroc)",
            "calibration": Calibration.__doc__.split("\n\n")[1].strip() if Calibration.__doc__ else "",
            "f1": "macro_f1 / weighted_f1 / per_class_f1 of the calibrated decisions (threshold chosen on "
                  "training patients only); macro_f1_uncalibrated_argmax: of the most probable class",
            "config": asdict(cfg)}


def _mil_concept_weights(bags, y: pd.Series, cfg: ClassifyConfig, mil_cfg) -> dict:
    from cytosae.analysis.mil import MILConfig, concept_weights, fit_mil

    concept_bags = bags["concepts"].subset(list(y.index))
    fitted = fit_mil(concept_bags, y.to_numpy(), sorted(set(y)), "concepts", mil_cfg or MILConfig(seed=cfg.seed))
    return {"what": "concept MIL fitted on all patients: per class, the latents whose input weights most raise that "
                    "class's attention and score (linearised through the first layer; see mil.concept_weights)",
            "weights": concept_weights(fitted, concept_bags).to_dict("records")}


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
    models, curves, attention = _cross_validate_all(feature_sets, y, cfg, bags, mil_cfg, notes)
    importance = {k: concept_importance(x, y, cfg, kind=k) for k in ("logreg_l1", "logreg_l2")}
    results = {
        "task": cfg.target, "dataset": dataset, "n_patients": int(len(y)),
        "class_counts": y.value_counts().sort_index().astype(int).to_dict(),
        "protocol": _protocol(cfg, next(iter(models.values()))["folds"]),
        "models": models, "baselines": notes,
        "importance": {k: v.to_dict("records") for k, v in importance.items()},
        "ablation": ablation(x, y, cfg) if cfg.ablate else [],
    }
    if "concepts" in cfg.mil:
        results["mil_concept_weights"] = _mil_concept_weights(bags, y, cfg, mil_cfg)
    if external is not None:
        results["external"] = _external_all(x, y, feature_sets, external, cfg, store, external_store,
                                            cell_type_column, proportion, bags, external_bags, mil_cfg, models)
    extras = {"attention": attention, "explanations": concept_contributions(x, y, cfg)}
    results["_curves"], results["_extras"] = curves, extras
    return results
