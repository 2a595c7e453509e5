"""Statistics of binary decisions: sensitivity, specificity, accuracy, PPV, NPV with Wilson intervals,
McNemar's paired test, and Cohen's kappa (and its weighted form for ordinal categories) with its CI.

McNemar's tests and kappa are functions of the two raters' contingency table alone: the case-level
functions build that table (:func:`pair_table`) and call the table versions (:func:`mcnemar_tables`,
:func:`kappa_table`), which the federated path calls on the tables the sites sent, added up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import bdtr, chdtrc, ndtri  # not scipy.stats: 1.5 s to import in every ClientApp process

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
    """Proportion ``successes / total`` with its Wilson score interval (no continuity correction), in
    Newcombe's (1998) closed form, as scipy's ``binomtest(...).proportion_ci(method="wilson")``."""
    if total == 0:
        return Proportion(float("nan"), float("nan"), float("nan"), 0, 0)
    p = successes / total
    z = ndtri(0.5 + confidence / 2)
    denominator = 2 * (total + z**2)
    center = (2 * total * p + z**2) / denominator
    half = z / denominator * np.sqrt(4 * total * p * (1 - p) + z**2)
    lo = 0.0 if successes == 0 else center - half
    hi = 1.0 if successes == total else center + half
    return Proportion(p, float(lo), float(hi), successes, total)


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


def pair_table(calls_a: np.ndarray, calls_b: np.ndarray) -> np.ndarray:
    """2×2 counts of two raters' binary calls on the same cases: entry [i, j] counts the cases rater a
    called i and rater b called j (1 = positive)."""
    return np.bincount(2 * np.asarray(calls_a, dtype=np.intp) + np.asarray(calls_b, dtype=np.intp),
                       minlength=4).reshape(2, 2)


def mcnemar_counts(b: int, c: int) -> McNemar:
    """McNemar's test from the discordant counts: ``b`` pairs only rater a got right, ``c`` only rater b."""
    b, c = int(b), int(c)
    if b + c == 0:
        return McNemar(0.0, 1.0, 0, 0, "exact")
    if b + c < EXACT_BELOW:  # two-sided binomial test at ½: twice the smaller tail
        return McNemar(float(b), float(min(1.0, 2 * bdtr(min(b, c), b + c, 0.5))), b, c, "exact")
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    return McNemar(statistic, float(chdtrc(1, statistic)), b, c, "chi2")


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """McNemar's test on paired outcomes (True = rater got the case right)."""
    table = pair_table(correct_a, correct_b)
    return mcnemar_counts(table[1, 0], table[0, 1])


def mcnemar_tables(malignant: np.ndarray, benign: np.ndarray) -> dict[str, McNemar]:
    """McNemar's tests of sensitivity, specificity and accuracy from the raters' :func:`pair_table` on the
    malignant and on the benign cases: a right call is positive on the first, negative on the second."""
    return {
        "sensitivity": mcnemar_counts(malignant[1, 0], malignant[0, 1]),
        "specificity": mcnemar_counts(benign[0, 1], benign[1, 0]),
        "accuracy": mcnemar_counts(malignant[1, 0] + benign[0, 1], malignant[0, 1] + benign[1, 0]),
    }


def mcnemar_tests(y_true: object, y_pred_a: object, y_pred_b: object) -> dict[str, McNemar]:
    """McNemar's paired tests of sensitivity (on the positives), specificity (on the negatives) and
    accuracy (on all cases) of two raters' decisions on the same cases."""
    truth, a, b = _aligned(y_true=y_true, y_pred_a=y_pred_a, y_pred_b=y_pred_b)
    return mcnemar_tables(pair_table(a[truth], b[truth]), pair_table(a[~truth], b[~truth]))


def linear_weights(categories: int) -> np.ndarray:
    """Cohen's (1968) linear agreement weights 1 − |i − j| / (k − 1) for k ordered categories."""
    index = np.arange(categories)
    return 1 - np.abs(index[:, None] - index[None, :]) / (categories - 1)


def kappa_table(table: np.ndarray, weights: np.ndarray | None = None, confidence: float = 0.95) -> Kappa:
    """Cohen's kappa from a k×k table of two raters' counts (rows rater a, columns rater b), weighted by
    agreement ``weights`` (default: the identity, plain kappa), with the large-sample variance of
    Fleiss, Cohen & Everitt (1969), which does not assume kappa = 0."""
    check_confidence(confidence)
    counts = np.asarray(table, dtype=float)
    n = counts.sum()
    if n == 0:
        raise StatsInputError("kappa needs at least one case")
    w = np.eye(len(counts)) if weights is None else np.asarray(weights, dtype=float)
    p = counts / n
    rows, cols = p.sum(axis=1), p.sum(axis=0)
    observed, chance = float((w * p).sum()), float(rows @ w @ cols)
    if chance == 1:
        nan = float("nan")
        return Kappa(nan, nan, nan, nan)
    kappa = (observed - chance) / (1 - chance)
    mean_rows, mean_cols = w @ cols, rows @ w  # w̄_i. and w̄_.j
    spread = (p * (w - (mean_rows[:, None] + mean_cols[None, :]) * (1 - kappa)) ** 2).sum()
    variance = (spread - (kappa - chance * (1 - kappa)) ** 2) / (n * (1 - chance) ** 2)
    se = float(np.sqrt(max(variance, 0.0)))
    half = ndtri(0.5 + confidence / 2) * se
    return Kappa(float(kappa), float(max(kappa - half, -1.0)), float(min(kappa + half, 1.0)), se)


def cohen_kappa(y_pred_a: object, y_pred_b: object, confidence: float = 0.95) -> Kappa:
    """Cohen's kappa between two readers' binary decisions on the same cases, with its CI."""
    check_confidence(confidence)
    a, b = _aligned(y_pred_a=y_pred_a, y_pred_b=y_pred_b)
    if len(a) == 0:
        raise StatsInputError("cohen_kappa needs at least one case")
    return kappa_table(pair_table(a, b), confidence=confidence)


def confusion(reference: np.ndarray, calls: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """k×k counts of ordinal categories: rows the reference's category, columns the calls'."""
    k = len(categories)
    index = [np.searchsorted(categories, v) for v in (reference, calls)]
    for name, values, i in zip(("reference", "calls"), (reference, calls), index, strict=True):
        bad = (i >= k) | (categories[np.minimum(i, k - 1)] != values)
        if bad.any():
            j = int(np.argmax(bad))
            raise StatsInputError(f"{name}: {values[j]} at index {j} is not one of the categories "
                                  f"{', '.join(f'{c:g}' for c in categories)}")
    return np.bincount(k * index[0] + index[1], minlength=k * k).reshape(k, k)


def weighted_kappa(reference: object, calls: object, categories: object, confidence: float = 0.95) -> Kappa:
    """Linearly weighted kappa of ordinal calls (e.g. the model's BI-RADS) against a reference read."""
    ordered = np.asarray(categories, dtype=float)
    table = confusion(np.asarray(reference, dtype=float), np.asarray(calls, dtype=float), ordered)
    return kappa_table(table, linear_weights(len(ordered)), confidence)
