"""Binary-decision statistics against their textbook formulas."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom, binomtest, chi2
from sklearn.metrics import cohen_kappa_score

from common.stats import StatsInputError, binary_metrics, cohen_kappa, mcnemar_tests, wilson
from common.stats.binary import confusion, kappa_table, mcnemar, mcnemar_counts, pair_table, weighted_kappa

Z95 = 1.959963984540054


def wilson_formula(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * np.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2))
    return centre - half, centre + half


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_matches_formula(kn):
    k, n = kn
    prop = wilson(k, n)
    assert prop.value == k / n
    assert (prop.lo, prop.hi) == pytest.approx(wilson_formula(k, n), abs=1e-12)


def test_binary_metrics_counts_and_undefined_denominators():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    pred = np.array([1, 0, 1, 0, 1, 0, 0, 1])  # TP 3, FN 1, FP 1, TN 3
    m = binary_metrics(y, pred)
    assert (m["sensitivity"].successes, m["sensitivity"].total) == (3, 4)
    assert (m["specificity"].successes, m["specificity"].total) == (3, 4)
    assert m["accuracy"].value == 6 / 8
    assert m["ppv"].value == 3 / 4 and m["npv"].value == 3 / 4
    assert (m["accuracy"].lo, m["accuracy"].hi) == pytest.approx(wilson_formula(6, 8))
    nobody_positive = binary_metrics(y, np.zeros(8, dtype=int))
    assert np.isnan(nobody_positive["ppv"].value) and nobody_positive["ppv"].total == 0
    assert nobody_positive["specificity"].value == 1.0


def test_mcnemar_exact_and_chi_square():
    a = np.array([True] * 7 + [False] * 2 + [True] * 20)
    b = np.array([False] * 7 + [True] * 2 + [True] * 20)  # b = 7, c = 2 discordant: exact
    test = mcnemar(a, b)
    assert (test.b, test.c, test.method) == (7, 2, "exact")
    assert test.p == pytest.approx(min(1.0, 2 * binom.cdf(2, 9, 0.5)))
    a = np.array([True] * 30 + [False] * 10 + [True] * 5)
    b = np.array([False] * 30 + [True] * 10 + [True] * 5)  # 40 discordant: continuity-corrected chi-square
    test = mcnemar(a, b)
    assert test.method == "chi2"
    assert test.statistic == pytest.approx((30 - 10 - 1) ** 2 / 40)
    assert test.p == pytest.approx(chi2.sf((30 - 10 - 1) ** 2 / 40, 1))
    same = mcnemar(a, a)
    assert (same.p, same.statistic) == (1.0, 0.0)


def test_mcnemar_tests_use_the_right_cases():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    a = np.array([1, 1, 1, 0, 0, 0, 1, 1])
    b = np.array([0, 0, 1, 0, 0, 1, 1, 1])
    tests = mcnemar_tests(y, a, b)
    assert (tests["sensitivity"].b, tests["sensitivity"].c) == (2, 0)  # positives: a caught 2 that b missed
    assert (tests["specificity"].b, tests["specificity"].c) == (1, 0)  # negatives: a cleared one b flagged
    assert (tests["accuracy"].b, tests["accuracy"].c) == (3, 0)


def kappa_of_cells(p: np.ndarray) -> float:
    rows, cols = p.sum(1), p.sum(0)
    chance = rows @ cols
    return (np.trace(p) - chance) / (1 - chance)


@settings(max_examples=40, deadline=None)
@given(st.integers(10, 200).flatmap(lambda n: st.tuples(
    st.lists(st.booleans(), min_size=n, max_size=n), st.lists(st.booleans(), min_size=n, max_size=n))))
def test_kappa_matches_sklearn_and_delta_method(pair):
    a, b = np.array(pair[0]), np.array(pair[1])
    k = cohen_kappa(a, b)
    p = np.array([[np.mean(~a & ~b), np.mean(~a & b)], [np.mean(a & ~b), np.mean(a & b)]])
    if p.sum(1) @ p.sum(0) == 1:  # both readers gave one and the same call throughout
        assert np.isnan(k.value)
        return
    assert k.value == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    # The Fleiss–Cohen–Everitt variance is the multinomial delta method: check it numerically.
    flat, eps = p.ravel(), 1e-7
    step = eps * np.eye(4)
    grad = np.array([kappa_of_cells((flat + d).reshape(2, 2)) - kappa_of_cells((flat - d).reshape(2, 2))
                     for d in step]) / (2 * eps)
    var = grad @ (np.diag(flat) - np.outer(flat, flat)) @ grad / len(a)
    assert k.se == pytest.approx(np.sqrt(max(var, 0)), abs=1e-6)
    assert (k.lo, k.hi) == pytest.approx((max(-1, k.value - Z95 * k.se), min(1, k.value + Z95 * k.se)))


def test_kappa_edge_cases():
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]).value == 1.0
    assert np.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]).value)  # chance agreement 1: undefined


def test_validation():
    with pytest.raises(StatsInputError, match="lengths differ: y_true has 3 entries, y_pred has 2"):
        binary_metrics([0, 1, 1], [0, 1])
    with pytest.raises(StatsInputError, match="y_pred_b must be binary"):
        mcnemar_tests([0, 1], [0, 1], [0, 3])
    with pytest.raises(StatsInputError, match="lengths differ: y_pred_a has 2 entries, y_pred_b has 1"):
        cohen_kappa([0, 1], [1])


def test_wilson_and_exact_mcnemar_equal_scipys_binomtest():
    for n in range(1, 40):
        for k in range(n + 1):
            ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
            assert (wilson(k, n).lo, wilson(k, n).hi) == pytest.approx((ci.low, ci.high), abs=1e-14)
            if n < 25:
                assert mcnemar_counts(k, n - k).p == pytest.approx(binomtest(k, n).pvalue, abs=1e-14)


def test_pair_table_orientation_and_the_table_versions():
    a = np.array([1, 1, 1, 0, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 0, 1, 1], dtype=bool)
    assert pair_table(a, b).tolist() == [[1, 1], [2, 2]]  # [a's call][b's call]
    assert kappa_table(pair_table(a, b)) == cohen_kappa(a, b)
    with pytest.raises(StatsInputError, match="at least one case"):
        kappa_table(np.zeros((2, 2)))


@settings(max_examples=30, deadline=None)
@given(st.integers(5, 200).flatmap(lambda n: st.tuples(st.lists(st.sampled_from([2, 3, 4, 5]), min_size=n,
                                                                 max_size=n),
                                                        st.lists(st.sampled_from([2, 3, 4, 5]), min_size=n,
                                                                 max_size=n))))
def test_weighted_kappa_matches_sklearn_and_its_unweighted_form_is_cohens(pair):
    reference, calls = np.array(pair[0], dtype=float), np.array(pair[1], dtype=float)
    kappa = weighted_kappa(reference, calls, [2, 3, 4, 5])
    if np.isnan(kappa.value):
        assert len(set(reference) | set(calls)) == 1
        return
    assert kappa.value == pytest.approx(cohen_kappa_score(reference, calls, weights="linear"), abs=1e-12)
    assert kappa.lo <= kappa.value <= kappa.hi
    table = confusion(reference, calls, np.array([2.0, 3, 4, 5]))
    assert table.sum() == len(reference) and table[0, 1] == np.count_nonzero((reference == 2) & (calls == 3))
    plain = kappa_table(table)
    assert plain.value == pytest.approx(cohen_kappa_score(reference, calls), abs=1e-12)


def test_confusion_names_a_value_off_the_categories():
    with pytest.raises(StatsInputError, match=r"calls: 6.0 at index 1 is not one of the categories 2, 3, 4"):
        confusion(np.array([2.0, 3.0]), np.array([2.0, 6.0]), np.array([2.0, 3, 4, 5]))
