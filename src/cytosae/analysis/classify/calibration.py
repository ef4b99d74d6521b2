"""Calibration of a model's probabilities and its decisions, fitted on training patients only."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

from .thresholds import best_threshold


class Calibration:
    """Maps a model's probabilities to calibrated ones and decides, fitted on training patients only.

    Fitted on held-out predictions of TRAINING patients (inner cross-validation of the training fold, or the MIL's
    inner validation split): a logistic regression on the log-odds of the positive class (Platt scaling; several
    classes: on the log-probabilities). Binary tasks then pick the decision threshold on the calibrated
    probability that maximises macro-F1 on those same training predictions (ties: the one nearest 0.5); more
    classes decide by the most probable class. Without enough held-out predictions (a class missing, or fewer
    than MIN_HELD_OUT patients) it is the identity with threshold 0.5."""

    # Hand-written, not CalibratedClassifierCV: that one needs a scikit-learn estimator (MIL is torch, with its own
    # validation split), calibrates a random forest's probabilities rather than their log-odds, fits unregularised
    # one-vs-rest sigmoids (here one C=1 logistic regression, multinomial over classes), and sets no threshold.
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
            self.threshold = best_threshold(np.asarray(y) == self.positive, q)
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
