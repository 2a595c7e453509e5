"""Statistics of binary decisions: sensitivity, specificity, accuracy, PPV, NPV with Wilson intervals,
McNemar's paired test, and Cohen's kappa between two readers with its confidence interval."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import chdtrc, ndtri

from common.stats._validation import StatsInputError, check_confidence, check_truth

EXACT_BELOW = 25  # McNemar: exact binomial test when fewer discordant pairs, where χ² is unreliable


@dataclass(frozen=True)
class Proportion:
    """A proportion with its Wilson score interval; value and bounds are NaN when ``total`` is 0."""

    value: float
    lo: float
    hi: float
    successes: int
    total: int


@dataclass(frozen=True)
class McNemar:
    """McNemar's test: ``b`` pairs only rater a got right, ``c`` only rater b; ``method`` is "exact"
    (two-sided binomial test of b against b + c, statistic = b) or "chi2" (continuity corrected)."""

    statistic: float
    p: float
    b: int
    c: int
    method: str


@dataclass(frozen=True)
class Kappa:
    """Cohen's kappa with its asymptotic standard error (Fleiss, Cohen & Everitt 1969; SPSS's
    "Asymp. Std. Error") and Wald interval clipped to [−1, 1]; NaN when chance agreement is 1."""

    value: float
    lo: float
    hi: float
    se: float


def wilson(successes: int, total: int, confidence: float = 0.95) -> Proportion:
    """Proportion ``successes / total`` with its Wilson score interval (no continuity correction)."""
    if total == 0:
        return Proportion(float("nan"), float("nan"), float("nan"), 0, 0)
    # Imported here: scipy.stats takes 1.5 s to import, paid by every ClientApp process (Flower starts
    # one per message) that imports this module without computing an interval.
    from scipy.stats import binomtest

    ci = binomtest(successes, total).proportion_ci(confidence, method="wilson")
    return Proportion(successes / total, float(ci.low), float(ci.high), successes, total)


def _aligned(**arrays: object) -> list[np.ndarray]:
    """Validate binary arrays of equal length, named as the caller's arguments for the messages."""
    (first, first_value), *rest = arrays.items()
    checked = [check_truth(first_value, first)]
    for name, value in rest:
        checked.append(check_truth(value, name))
        if len(checked[-1]) != len(checked[0]):
            raise StatsInputError(f"lengths differ: {first} has {len(checked[0])} entries, "
                                  f"{name} has {len(checked[-1])}")
    return checked


def binary_metrics(y_true: object, y_pred: object, confidence: float = 0.95) -> dict[str, Proportion]:
    """Sensitivity, specificity, accuracy, PPV and NPV of binary decisions (1 = called malignant)."""
    truth, pred = _aligned(y_true=y_true, y_pred=y_pred)
    tp = int(np.count_nonzero(truth & pred))
    fn = int(np.count_nonzero(truth & ~pred))
    fp = int(np.count_nonzero(~truth & pred))
    tn = len(truth) - tp - fn - fp
    return {
        "sensitivity": wilson(tp, tp + fn, confidence),
        "specificity": wilson(tn, tn + fp, confidence),
        "accuracy": wilson(tp + tn, len(truth), confidence),
        "ppv": wilson(tp, tp + fp, confidence),
        "npv": wilson(tn, tn + fn, confidence),
    }


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's test on paired outcomes (True = rater got the case right)."""
    b = int(np.count_nonzero(correct_a & ~correct_b))
    c = int(np.count_nonzero(~correct_a & correct_b))
    if b + c == 0:
        return McNemar(0.0, 1.0, 0, 0, "exact")
    if b + c < EXACT_BELOW:
        from scipy.stats import binomtest  # see `wilson`

        return McNemar(float(b), float(binomtest(b, b + c).pvalue), b, c, "exact")
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    return McNemar(statistic, float(chdtrc(1, statistic)), b, c, "chi2")


def mcnemar_tests(y_true: object, y_pred_a: object, y_pred_b: object) -> dict[str, McNemar]:
    """McNemar's paired tests of sensitivity (on the positives), specificity (on the negatives) and
    accuracy (on all cases) of two raters' decisions on the same cases."""
    truth, a, b = _aligned(y_true=y_true, y_pred_a=y_pred_a, y_pred_b=y_pred_b)
    return {
        "sensitivity": mcnemar(a[truth], b[truth]),
        "specificity": mcnemar(~a[~truth], ~b[~truth]),
        "accuracy": mcnemar(a == truth, b == truth),
    }


def cohen_kappa(y_pred_a: object, y_pred_b: object, confidence: float = 0.95) -> Kappa:
    """Cohen's kappa between two readers' binary decisions on the same cases, with its CI."""
    check_confidence(confidence)
    a, b = _aligned(y_pred_a=y_pred_a, y_pred_b=y_pred_b)
    if len(a) == 0:
        raise StatsInputError("cohen_kappa needs at least one case")
    n = len(a)
    p = np.histogram2d(a, b, bins=2, range=[[-0.5, 1.5], [-0.5, 1.5]])[0] / n
    rows, cols = p.sum(axis=1), p.sum(axis=0)
    observed, chance = np.trace(p), rows @ cols
    if chance == 1:
        nan = float("nan")
        return Kappa(nan, nan, nan, nan)
    kappa = (observed - chance) / (1 - chance)
    # Fleiss, Cohen & Everitt (1969): the large-sample variance without assuming kappa = 0.
    diagonal = np.diag(p) @ (1 - (rows + cols) * (1 - kappa)) ** 2
    disagree = ~np.eye(2, dtype=bool)
    off = (1 - kappa) ** 2 * (p * (cols[:, None] + rows[None, :]) ** 2)[disagree].sum()
    variance = (diagonal + off - (kappa - chance * (1 - kappa)) ** 2) / (n * (1 - chance) ** 2)
    se = float(np.sqrt(max(variance, 0.0)))
    half = ndtri(0.5 + confidence / 2) * se
    return Kappa(float(kappa), float(max(kappa - half, -1.0)), float(min(kappa + half, 1.0)), se)
