"""Fast DeLong against the definitions: O(m·n) Mann–Whitney and DeLong's 1988 structural components."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from common.stats import StatsInputError, auc_ci, delong_cov, delong_test, delong_test_unpaired, roc_auc


def psi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """DeLong's kernel for every (positive, negative) pair: 1 if x > y, ½ if tied, 0 otherwise."""
    return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])


def brute_delong(y, *scores):
    """DeLong, DeLong & Clarke-Pearson (1988), written out naively: AUCs and their covariance."""
    y = np.asarray(y, dtype=bool)
    m, n = y.sum(), (~y).sum()
    theta, v10, v01 = [], [], []
    for s in scores:
        s = np.asarray(s, dtype=float)
        kernel = psi(s[y], s[~y])
        theta.append(kernel.sum() / (m * n))
        v10.append(kernel.sum(axis=1) / n)
        v01.append(kernel.sum(axis=0) / m)
    theta = np.array(theta)
    k = len(scores)
    s10, s01 = np.zeros((k, k)), np.zeros((k, k))
    for r in range(k):
        for q in range(k):
            s10[r, q] = sum((v10[r][i] - theta[r]) * (v10[q][i] - theta[q]) for i in range(m)) / (m - 1)
            s01[r, q] = sum((v01[r][j] - theta[r]) * (v01[q][j] - theta[q]) for j in range(n)) / (n - 1)
    return theta, s10 / m + s01 / n


@st.composite
def tied_cases(draw, raters=2, min_size=4, max_size=60):
    """Binary truth with both classes at least twice, and scores drawn from a few values (heavy ties)."""
    n = draw(st.integers(min_size, max_size))
    y = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    y[:2], y[2:4] = True, False
    levels = draw(st.integers(1, 6))
    scores = [np.array(draw(st.lists(st.integers(0, levels), min_size=n, max_size=n)), dtype=float)
              for _ in range(raters)]
    return y, scores


@settings(max_examples=60, deadline=None)
@given(tied_cases(raters=3))
def test_matches_delong_1988_with_heavy_ties(case):
    y, scores = case
    auc, cov = delong_cov(y, *scores)
    want_auc, want_cov = brute_delong(y, *scores)
    np.testing.assert_allclose(auc, want_auc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, want_cov, rtol=0, atol=1e-12)
    assert roc_auc(y, scores[0]) == pytest.approx(roc_auc_score(y, scores[0]), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(tied_cases(raters=2))
def test_paired_test_and_ci_match_definitions(case):
    y, (a, b) = case
    theta, cov = brute_delong(y, a, b)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z, p = delong_test(y, a, b)
    if var > 1e-14:
        assert z == pytest.approx((theta[0] - theta[1]) / np.sqrt(var), rel=1e-9, abs=1e-9)
        assert p == pytest.approx(2 * norm.sf(abs((theta[0] - theta[1]) / np.sqrt(var))), rel=1e-9, abs=1e-12)
    auc, lo, hi = auc_ci(y, a)
    half = 1.959963984540054 * np.sqrt(cov[0, 0])
    assert (auc, lo, hi) == pytest.approx((theta[0], max(0, theta[0] - half), min(1, theta[0] + half)),
                                          abs=1e-12)


def test_continuous_scores_against_definitions_and_sklearn():
    rng = np.random.default_rng(7)
    y = rng.random(1500) < 0.3
    a = rng.normal(size=1500) + y
    b = np.round(a + rng.normal(size=1500), 1)  # correlated with a, with ties
    want_auc, want_cov = brute_delong(y[:400], a[:400], b[:400])
    auc, cov = delong_cov(y[:400], a[:400], b[:400])
    np.testing.assert_allclose(auc, want_auc, atol=1e-13)
    np.testing.assert_allclose(cov, want_cov, atol=1e-13)
    assert roc_auc(y, b) == pytest.approx(roc_auc_score(y, b), abs=1e-12)


def test_large_input_is_fast_enough_to_be_subquadratic():
    # 3·10^5 cases: an O(m·n) pair matrix would need ~2·10^10 entries; this finishes in well under a second.
    rng = np.random.default_rng(0)
    y = rng.random(300_000) < 0.5
    s = np.round(rng.random(300_000) * 100 + 5 * y, 1)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_published_hanley_mcneil_example():
    # Hanley & McNeil (1982), Table 1: five-point ratings of 58 normal and 51 abnormal CT images, AUC 0.893.
    y = np.r_[np.zeros(58), np.ones(51)]
    s = np.r_[np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2]), np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])]
    auc, lo, hi = auc_ci(y, s)
    assert round(auc, 3) == 0.893
    assert lo < auc < hi


def test_sklearn_docstring_example():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_invariances():
    rng = np.random.default_rng(3)
    y = rng.random(200) < 0.4
    a, b = rng.integers(0, 5, 200) + y, rng.random(200) + 0.5 * y
    auc, cov = delong_cov(y, a, b)
    auc_t, cov_t = delong_cov(y, np.exp(a), 3 * b - 1)  # monotone transforms keep ranks
    np.testing.assert_allclose(auc_t, auc, atol=1e-15)
    np.testing.assert_allclose(cov_t, cov, atol=1e-15)
    z_ab, p_ab = delong_test(y, a, b)
    z_ba, p_ba = delong_test(y, b, a)
    assert z_ab == pytest.approx(-z_ba) and p_ab == pytest.approx(p_ba)
    assert delong_test(y, a, 2 * a + 1) == (0.0, 1.0)  # same ranking: no difference, no variance


def test_perfect_and_reversed_raters():
    y = np.array([0, 0, 0, 1, 1, 1])
    assert auc_ci(y, [1, 2, 3, 4, 5, 6]) == (1.0, 1.0, 1.0)
    assert auc_ci(y, [6, 5, 4, 3, 2, 1]) == (0.0, 0.0, 0.0)


def test_unpaired_matches_definition():
    rng = np.random.default_rng(11)
    y1, y2 = rng.random(80) < 0.5, rng.random(120) < 0.4
    s1, s2 = rng.integers(0, 4, 80) + y1, rng.integers(0, 6, 120) + 2 * y2
    (t1,), v1 = brute_delong(y1, s1)
    (t2,), v2 = brute_delong(y2, s2)
    z, p = delong_test_unpaired(y1, s1, y2, s2)
    assert z == pytest.approx((t1 - t2) / np.sqrt(v1[0, 0] + v2[0, 0]), rel=1e-12)
    assert p == pytest.approx(2 * norm.sf(abs(z)), rel=1e-12)


@pytest.mark.parametrize(("y", "s", "message"), [
    ([0, 1, 0, 1], [0.1, 0.2, 0.3], "lengths differ: y_true has 4 entries, y_score has 3"),
    ([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], r"only one class present in y_true \(all 4 cases are malignant"),
    ([0, 0, 0], [0.1, 0.2, 0.3], "only one class present.*benign"),
    ([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.4], "y_score has nan at index 1"),
    ([0, 1, 0, 1], [0.1, 0.2, np.inf, 0.4], "y_score has inf at index 2"),
    ([0, 1, 2, 1], [0.1, 0.2, 0.3, 0.4], "binary 0/1.*found 2 at index 2"),
    ([0, 1, np.nan, 1], [0.1, 0.2, 0.3, 0.4], "binary 0/1.*found nan at index 2"),
    (["a", "b", "a", "b"], [0.1, 0.2, 0.3, 0.4], "binary 0/1"),
    ([0, 1, 0, 1], ["x", "y", "z", "w"], "y_score must be numeric"),
    ([[0, 1], [0, 1]], [0.1, 0.2], "one-dimensional"),
    ([0, 1, 0, 0], [0.1, 0.2, 0.3, 0.4], "at least 2 positive and 2 negative cases; y_true has 1 positive"),
])
def test_validation_errors(y, s, message):
    with pytest.raises(StatsInputError, match=message):
        auc_ci(y, s)


def test_validation_of_paired_and_confidence():
    y = [0, 1, 0, 1]
    with pytest.raises(StatsInputError, match=r"lengths differ: y_true has 4 entries, y_score\[1\] has 3"):
        delong_test(y, [1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(StatsInputError, match="confidence"):
        auc_ci(y, [1, 2, 3, 4], confidence=95)
    assert isinstance(StatsInputError("x"), ValueError)  # callers may catch ValueError, as with sklearn
    assert roc_auc([True, False], [0.2, 0.1]) == 1.0  # one case per class suffices for the AUC itself
