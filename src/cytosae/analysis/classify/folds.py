"""The folds: repeated stratified k-fold over patients (scikit-learn), and grouped folds for multi-label targets."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import RepeatedStratifiedKFold, StratifiedKFold

from .models import ClassifyConfig


def _splits(y: np.ndarray, cfg: ClassifyConfig, n_repeats: int) -> tuple[int, RepeatedStratifiedKFold]:
    """(folds, splitter): cfg.n_splits folds, fewer when the smallest class has fewer patients."""
    smallest = int(pd.Series(y).value_counts().min())
    if smallest < 2:
        raise ValueError(f"every class needs at least 2 patients for cross-validation; counts: "
                         f"{pd.Series(y).value_counts().to_dict()}")
    n_splits = min(cfg.n_splits, smallest)
    # One row per patient, so patients are the rows: StratifiedGroupKFold would add nothing but other folds.
    return n_splits, RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=cfg.seed)


def inner_folds(y: np.ndarray, cfg: ClassifyConfig) -> StratifiedKFold | None:
    """The inner k-fold of a training fold whose held-out predictions calibrate; None where it cannot run."""
    smallest = int(pd.Series(y).value_counts().min())
    if cfg.inner_folds < 2 or smallest < 2:
        return None
    return StratifiedKFold(min(cfg.inner_folds, smallest), shuffle=True, random_state=cfg.seed)


def _group_folds(groups: np.ndarray, n_splits: int, rng: np.random.Generator):
    """k folds over groups (patients): every unit of a group in the same fold.
    Hand-written: GroupKFold(shuffle=True) cuts a RandomState permutation into contiguous blocks, not this
    round-robin over a Generator's, so it would move today's seeded folds; and no scikit-learn splitter
    stratifies several labels at once (StratifiedGroupKFold takes one)."""
    uniq = rng.permutation(np.unique(groups))
    fold_of = {g: i % n_splits for i, g in enumerate(uniq)}
    f = np.array([fold_of[g] for g in groups])
    return [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in range(n_splits)]
