"""Input checks shared by every public function, so users see one wording for each mistake."""

from __future__ import annotations

import numpy as np


class StatsInputError(ValueError):
    """Input the statistics cannot use; the message names the argument, column, index or line at fault."""


def check_truth(y_true: object, name: str = "y_true") -> np.ndarray:
    """Return binary truth (1 = malignant) as a boolean array, or raise naming the first bad entry."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise StatsInputError(f"{name} must be one-dimensional, got shape {y.shape}")
    if y.dtype == bool:
        return y
    if y.dtype.kind not in "iuf":
        raise StatsInputError(f"{name} must be binary 0/1 (1 = malignant), got dtype {y.dtype}")
    bad = ~((y == 0) | (y == 1))  # NaN fails both comparisons, so it is caught here too
    if bad.any():
        i = int(np.argmax(bad))
        raise StatsInputError(f"{name} must be binary 0/1 (1 = malignant); found {y[i].item()} at index {i}")
    return y == 1


def check_scores(y_score: object, n: int, name: str = "y_score") -> np.ndarray:
    """Return finite float scores of length ``n``, or raise naming the first bad entry."""
    try:
        s = np.asarray(y_score, dtype=float)
    except (TypeError, ValueError):
        raise StatsInputError(f"{name} must be numeric") from None
    if s.ndim != 1:
        raise StatsInputError(f"{name} must be one-dimensional, got shape {s.shape}")
    if len(s) != n:
        raise StatsInputError(f"lengths differ: y_true has {n} entries, {name} has {len(s)}")
    bad = ~np.isfinite(s)
    if bad.any():
        i = int(np.argmax(bad))
        raise StatsInputError(f"{name} has {s[i]} at index {i}; scores must be finite")
    return s


def check_class_counts(pos: np.ndarray, minimum: int, name: str = "y_true", why: str = "the AUC") -> None:
    """Require ``minimum`` positive and negative cases: one for an AUC, two for its DeLong variance."""
    n_pos = int(np.count_nonzero(pos))
    n_neg = len(pos) - n_pos
    if min(n_pos, n_neg) >= minimum:
        return
    if n_pos == 0 or n_neg == 0:
        present = "malignant (1)" if n_neg == 0 else "benign (0)"
        raise StatsInputError(f"only one class present in {name} (all {len(pos)} cases are {present}); "
                              f"{why} needs both positive and negative cases")
    raise StatsInputError(f"{why} needs at least {minimum} positive and {minimum} negative cases; "
                          f"{name} has {n_pos} positive and {n_neg} negative")


def check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise StatsInputError(f"confidence must be between 0 and 1, got {confidence}")
