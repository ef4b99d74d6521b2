"""The settings of a classification run and the estimators it fits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.feature_selection import VarianceThreshold
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


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


class ModelOrPrior(ClassifierMixin, BaseEstimator):
    """make_model(kind), or the class frequencies when no feature varies among the training rows (nothing to
    learn: VarianceThreshold would leave no column). An estimator, so cross_val_predict can clone it."""

    def __init__(self, kind: str = "logreg_l2", seed: int = 0, C: float = 1.0, n_trees: int = 200):
        self.kind, self.seed, self.C, self.n_trees = kind, seed, C, n_trees

    def fit(self, x, y):
        if not (np.ptp(x, axis=0) > 0).any():
            self.model_ = DummyClassifier(strategy="prior")
        else:
            self.model_ = make_model(self.kind, self.seed, self.C, self.n_trees, len(set(y)))
        self.model_.fit(x, y)
        self.classes_ = self.model_.classes_
        return self

    def predict_proba(self, x):
        return self.model_.predict_proba(x)

    def predict(self, x):
        return self.model_.predict(x)


def _fit(kind: str, cfg: ClassifyConfig, x: np.ndarray, y: np.ndarray) -> ModelOrPrior:
    return ModelOrPrior(kind, cfg.seed, cfg.C, cfg.n_trees).fit(x, y)


def _in_classes(proba: np.ndarray, model_classes, classes: list[str]) -> np.ndarray:
    """Columns of `proba` (in `model_classes` order) rearranged to `classes`; a class the model never saw gets 0."""
    cols = [list(model_classes).index(c) if c in list(model_classes) else None for c in classes]
    return np.stack([proba[:, j] if j is not None else np.zeros(len(proba)) for j in cols], 1)


def _positive(classes: list[str], y: np.ndarray, cfg: ClassifyConfig) -> str | None:
    """Binary tasks: the class whose AUROC is reported (cfg.positive, else the rarer; ties: the first by name)."""
    if len(classes) != 2:
        return None
    if cfg.positive is not None:
        if cfg.positive not in classes:
            raise ValueError(f"--positive {cfg.positive!r} is not a class of {cfg.target!r}: {classes}")
        return cfg.positive
    counts = pd.Series(y).value_counts()
    return str(min(classes, key=lambda c: (counts.get(c, 0), c)))
