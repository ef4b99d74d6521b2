"""The binary decision threshold, chosen on training patients' held-out probabilities."""
from __future__ import annotations

import numpy as np

from .metrics import _binary_macro_f1


def best_threshold(is_pos: np.ndarray, q: np.ndarray) -> float:
    """The threshold on `q` (probability of the positive class) maximising macro-F1; ties: the one nearest 0.5.
    Hand-written: TunedThresholdClassifierCV scans a fixed grid of 100 cut points, keeps the first best (not the
    one nearest 0.5) and refits the model in its own CV; each of those would move the tested decisions."""
    s = np.sort(q)
    cands = np.unique(np.concatenate([[0.5], (s[1:] + s[:-1]) / 2]))  # 0.5 and the midpoints between scores
    f1 = [_binary_macro_f1(is_pos, q >= t) for t in cands]
    best = np.flatnonzero(np.isclose(f1, max(f1)))
    return float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])
