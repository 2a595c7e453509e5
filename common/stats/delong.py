"""Mann–Whitney AUC with DeLong's variance, confidence interval and tests, by the fast midrank algorithm.

For positive cases X_1..X_m and negative cases Y_1..Y_n, DeLong, DeLong & Clarke-Pearson (1988) define
the structural components (placement values), with ψ(x, y) = 1 if x > y, ½ if tied, 0 otherwise,

    V10(X_i) = (1/n) Σ_j ψ(X_i, Y_j),      V01(Y_j) = (1/m) Σ_i ψ(X_i, Y_j),

so that AUC = mean V10 = mean V01 (Mann–Whitney, ties count ½) and, for raters r and s,

    Cov(AUC_r, AUC_s) = S10_rs / m + S01_rs / n,

S10 and S01 being the sample covariances (denominators m − 1 and n − 1) of the components. Sun & Xu
(IEEE SPL 2014) get the components from midranks in O(N log N): V10(X_i) = (T_Z(X_i) − T_X(X_i)) / n and
V01(Y_j) = 1 − (T_Z(Y_j) − T_Y(Y_j)) / m, T being midranks among all cases, positives, negatives. Those
midrank differences depend only on a case's score value, and for a value v they equal

    V10(v) = (#negatives below v + ½ #negatives at v) / n,
    V01(v) = (#positives above v + ½ #positives at v) / m,

which cumulative sums of a per-class histogram over the ordered score values give exactly. Every path
here goes through that histogram form: the pooled one on the distinct values found by one sort per rater,
the federated one (``federated.py``) on the fixed score grid. One core, so the two cannot drift apart.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr, ndtri  # the normal CDF and its inverse; scipy.stats takes 1.5 s to import

from common.stats._validation import (
    StatsInputError,
    check_class_counts,
    check_confidence,
    check_scores,
    check_truth,
)


def cell_placements(hist_pos: np.ndarray, hist_neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and the placement values V10, V01 of each cell of per-class histograms in increasing score order.

    Cells may be empty; counts may be floats (noisy federated histograms).
    """
    m = hist_pos.sum()
    n = hist_neg.sum()
    v10 = (np.cumsum(hist_neg) - 0.5 * hist_neg) / n
    v01 = (m - np.cumsum(hist_pos) + 0.5 * hist_pos) / m
    return float(hist_pos @ v10 / m), v10, v01


def centered_cross_products(placements: np.ndarray, auc: np.ndarray, weights: np.ndarray | None = None
                            ) -> np.ndarray:
    """Σ_i w_i (V_i − AUC)(V_i − AUC)ᵀ over the columns of ``placements`` (raters × cases or cells).

    Centering on the AUC before multiplying keeps the sums accurate however many cases there are.
    """
    centered = placements - auc[:, None]
    return (centered if weights is None else centered * weights) @ centered.T


def auc_covariance(sum10: np.ndarray, sum01: np.ndarray, n_pos: float, n_neg: float) -> np.ndarray:
    """DeLong covariance of AUCs from the centered cross-product sums of the positives' and negatives'
    placements: S10 / m + S01 / n with S10 = sum10 / (m − 1), S01 = sum01 / (n − 1)."""
    return sum10 / ((n_pos - 1) * n_pos) + sum01 / ((n_neg - 1) * n_neg)


def normal_ci(estimate: float, variance: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wald interval ``estimate ± z·sd`` clipped to [0, 1], as pROC's and SPSS's DeLong AUC interval."""
    check_confidence(confidence)
    half = ndtri(0.5 + confidence / 2) * np.sqrt(max(variance, 0.0))
    return float(max(estimate - half, 0.0)), float(min(estimate + half, 1.0))


def z_test(difference: float, variance: float) -> tuple[float, float]:
    """Two-sided Z test of a difference with the given variance.

    A variance that is zero (or below zero only by rounding) carries no uncertainty: an exactly zero
    difference then gives Z = 0, p = 1 (e.g. two raters with the same ranking), any other gives ±inf, p = 0.
    """
    if variance > 0:
        z = difference / np.sqrt(variance)
        return float(z), float(2 * ndtr(-abs(z)))
    if difference == 0:
        return 0.0, 1.0
    return float(np.copysign(np.inf, difference)), 0.0


def paired_z(auc: np.ndarray, cov: np.ndarray, a: int, b: int) -> tuple[float, float]:
    """DeLong's Z and two-sided p for AUC[a] − AUC[b] given the AUCs' covariance matrix."""
    return z_test(auc[a] - auc[b], cov[a, a] + cov[b, b] - 2 * cov[a, b])


def _distinct_cells(score: np.ndarray) -> tuple[np.ndarray, int]:
    """Index of each case's score among the sorted distinct scores, and how many distinct scores there are.

    One O(N log N) sort; the order among tied cases does not matter, so the fast unstable sort will do.
    """
    order = np.argsort(score)
    ordered = score[order]
    new_value = np.empty(len(score), dtype=bool)
    new_value[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new_value[1:])
    cells = np.empty(len(score), dtype=np.intp)
    cells[order] = np.cumsum(new_value) - 1
    return cells, int(cells[order[-1]]) + 1


def _prepare(y_true: object, y_scores: tuple[object, ...], minimum: int, why: str
             ) -> tuple[np.ndarray, list[np.ndarray]]:
    pos = check_truth(y_true)
    names = ["y_score"] if len(y_scores) == 1 else [f"y_score[{i}]" for i in range(len(y_scores))]
    scores = [check_scores(s, len(pos), name) for s, name in zip(y_scores, names, strict=True)]
    check_class_counts(pos, minimum, why=why)
    return pos, scores


def roc_auc(y_true: object, y_score: object) -> float:
    """Area under the ROC curve: the Mann–Whitney statistic with ties counted ½ (equals sklearn's
    ``roc_auc_score``). Needs at least one positive and one negative case."""
    pos, (score,) = _prepare(y_true, (y_score,), 1, "the AUC")
    cells, n_cells = _distinct_cells(score)
    auc, _, _ = cell_placements(np.bincount(cells[pos], minlength=n_cells),
                                np.bincount(cells[~pos], minlength=n_cells))
    return auc


def delong_cov(y_true: object, *y_scores: object) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of one or more raters scored on the same cases and DeLong's covariance matrix of those AUCs.

    Needs at least two positive and two negative cases (the variance divides by m − 1 and n − 1).
    """
    if not y_scores:
        raise StatsInputError("delong_cov needs at least one y_score")
    pos, scores = _prepare(y_true, y_scores, 2, "the DeLong variance")
    auc = np.empty(len(scores))
    rows10, rows01 = [], []
    for r, score in enumerate(scores):
        cells, n_cells = _distinct_cells(score)
        cells_pos, cells_neg = cells[pos], cells[~pos]
        auc[r], v10, v01 = cell_placements(np.bincount(cells_pos, minlength=n_cells),
                                           np.bincount(cells_neg, minlength=n_cells))
        rows10.append(v10[cells_pos])
        rows01.append(v01[cells_neg])
    cov = auc_covariance(centered_cross_products(np.array(rows10), auc),
                         centered_cross_products(np.array(rows01), auc), len(rows10[0]), len(rows01[0]))
    return auc, cov


def auc_ci(y_true: object, y_score: object, confidence: float = 0.95) -> tuple[float, float, float]:
    """AUC and its DeLong confidence interval (pROC's ``ci.auc(method="delong")``, SPSS's nonparametric CI).

    >>> auc, lo, hi = auc_ci([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    """
    auc, cov = delong_cov(y_true, y_score)
    lo, hi = normal_ci(auc[0], cov[0, 0], confidence)
    return float(auc[0]), lo, hi


def delong_test(y_true: object, y_score_a: object, y_score_b: object) -> tuple[float, float]:
    """DeLong's test of two correlated AUCs (two raters, same cases): Z = (AUC_a − AUC_b) / SE, two-sided p.

    ``z, p = delong_test(y_true, model_score, reader_birads)``; Z > 0 when rater a has the larger AUC.
    """
    auc, cov = delong_cov(y_true, y_score_a, y_score_b)
    return paired_z(auc, cov, 0, 1)


def delong_test_unpaired(y_true_a: object, y_score_a: object, y_true_b: object, y_score_b: object
                         ) -> tuple[float, float]:
    """Z test of two AUCs from disjoint case sets (e.g. two sites): the covariance term is zero."""
    auc_a, var_a = delong_cov(y_true_a, y_score_a)
    auc_b, var_b = delong_cov(y_true_b, y_score_b)
    return z_test(auc_a[0] - auc_b[0], var_a[0, 0] + var_b[0, 0])
