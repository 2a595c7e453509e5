"""Federated AUC / DeLong from site summaries equals the pooled computation on the concatenated cases."""

from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.stats import (
    GRIDS,
    ScoreKind,
    StatsInputError,
    auc_ci,
    delong_cov,
    delong_test,
    pool_histograms,
    pooled_analysis,
    site_histograms,
    site_placement_sums,
)
from common.stats.federated import _site_cells, _suppression_map
from common.stats.scores import BIRADS_SCALE

GRID_OF = {"model": "percent", "senior": "birads", "junior": "binary", "prob": "probability"}


def study(n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A reader study: model 0–100 score (two decimals, so the grid rounds), BI-RADS, binary, probability."""
    y = rng.random(n) < 0.35
    y[:2], y[2:4] = True, False
    birads = np.array(sorted(set(BIRADS_SCALE.values())))
    scores = {
        "model": np.clip(np.round(50 + 30 * (y - 0.5) + rng.normal(0, 25, n), 2), 0, 100),
        "senior": birads[np.clip(np.round(2 + 2.5 * y + rng.normal(0, 1.5, n)), 0, 7).astype(int)],
        "junior": (rng.random(n) < np.where(y, 0.8, 0.3)).astype(float),
        "prob": np.round(rng.beta(2 + 2 * y, 3), 4),
    }
    return y, scores


def on_grid(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The scores as the grid represents them: what the pooled computation must be run on."""
    return {r: GRIDS[ScoreKind(GRID_OF[r])].values[GRIDS[ScoreKind(GRID_OF[r])].cells(s, r)]
            for r, s in scores.items()}


def federate(y, scores, site_of, **options):
    sites = [site_of == k for k in np.unique(site_of)]
    local = [(y[m], {r: s[m] for r, s in scores.items()}) for m in sites]
    pooled = pool_histograms([site_histograms(t, s, GRID_OF, **options) for t, s in local])
    sums = [site_placement_sums(t, s, pooled, **options) for t, s in local]
    return pooled, pooled_analysis(pooled, sums)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 400), n_sites=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_federated_equals_pooled_for_random_splits(n, n_sites, seed):
    rng = np.random.default_rng(seed)
    y, scores = study(n, rng)
    site_of = rng.integers(0, n_sites, n)  # random split; a site may lack a class
    _, result = federate(y, scores, site_of)
    grid_scores = on_grid(scores)
    raters = list(GRID_OF)
    auc, cov = delong_cov(y, *(grid_scores[r] for r in raters))
    for i, r in enumerate(raters):
        got = result["raters"][r]
        assert got["auc"] == pytest.approx(auc[i], abs=1e-9)
        assert got["auc_var"] == pytest.approx(cov[i, i], abs=1e-9)
        assert got["auc_ci"] == pytest.approx(list(auc_ci(y, grid_scores[r])[1:]), abs=1e-9)
    pairs = {(c["a"], c["b"]): c for c in result["comparisons"]}
    assert list(pairs) == list(combinations(raters, 2))
    for a, b in pairs:
        z, p = delong_test(y, grid_scores[a], grid_scores[b])
        assert pairs[a, b]["z"] == pytest.approx(z, abs=1e-9)
        assert pairs[a, b]["p"] == pytest.approx(p, abs=1e-9)


def test_what_leaves_a_site_does_not_grow_with_its_cases():
    rng = np.random.default_rng(1)
    shapes = []
    for n in (10, 1000):
        y, scores = study(n, rng)
        summary = site_histograms(y, scores, GRID_OF)
        pooled = pool_histograms([summary])
        sums = site_placement_sums(y, scores, pooled)
        shapes.append(({k: v.shape for k, v in summary["hist_pos"].items()},
                       {k: v.shape for k, v in summary["hist_neg"].items()},
                       sums["sum10"].shape, sums["sum01"].shape, sorted(summary), sorted(sums)))
    assert shapes[0] == shapes[1]
    assert shapes[0][0] == {"model": (1001,), "senior": (8,), "junior": (2,), "prob": (1001,)}
    assert shapes[0][2] == (4, 4)


def test_min_count_suppresses_small_cells_and_stays_exact_for_what_was_sent():
    rng = np.random.default_rng(5)
    y, scores = study(600, rng)
    site_of = rng.integers(0, 3, 600)
    k = 5
    _, result = federate(y, scores, site_of, min_count=k)
    for m in (site_of == s for s in range(3)):
        summary = site_histograms(y[m], {r: v[m] for r, v in scores.items()}, GRID_OF, min_count=k)
        for key, total in (("hist_pos", summary["n_pos"]), ("hist_neg", summary["n_neg"])):
            for counts in summary[key].values():
                assert counts.sum() == total  # no case is dropped
                small = (counts > 0) & (counts < k)
                assert not small.any() or (total < k and np.count_nonzero(counts) == 1)
    # Exact for the coarsened scores: rebuild them site by site and pool them in one table.
    reported = {r: np.empty(600) for r in GRID_OF}
    for s in range(3):
        m = site_of == s
        _, cells = _site_cells(y[m], {r: v[m] for r, v in scores.items()}, GRID_OF, k)
        for r in GRID_OF:
            reported[r][m] = GRIDS[ScoreKind(GRID_OF[r])].values[cells[r]]
    auc, _ = delong_cov(y, *(reported[r] for r in GRID_OF))
    assert [result["raters"][r]["auc"] for r in GRID_OF] == pytest.approx(auc, abs=1e-9)
    z, _ = delong_test(y, reported["model"], reported["senior"])
    assert result["comparisons"][0]["z"] == pytest.approx(z, abs=1e-9)
    # ... and close to the uncoarsened AUC: only pairs within a merged block change.
    exact = delong_cov(y, *on_grid(scores).values())[0]
    assert np.abs(auc - exact).max() < 0.02
    assert federate(y, scores, site_of, min_count=1)[1] == federate(y, scores, site_of)[1]


def test_suppression_merges_adjacent_cells_at_the_block_median():
    # k = 3: cells 0–2 hold 4 positives and 5 negatives, cells 3–5 hold 8 and 6; each block's cases go to
    # the cell holding its median case.
    target = _suppression_map(np.array([1, 0, 3, 2, 0, 6]), np.array([0, 5, 0, 1, 5, 0]), 3)
    assert list(target) == [1, 1, 1, 4, 4, 4]
    # A small remainder at the top joins the block below it.
    assert list(_suppression_map(np.array([3, 0, 1]), np.array([3, 0, 0]), 3)) == [0, 0, 0]
    assert list(_suppression_map(np.array([1, 0, 1]), np.array([0, 1, 0]), 1)) == [0, 1, 2]


def test_gaussian_noise_is_seeded_and_within_its_documented_bound():
    rng = np.random.default_rng(9)
    y, scores = study(900, rng)
    scores = {"senior": scores["senior"], "junior": scores["junior"]}
    site_of = rng.integers(0, 3, 900)
    grids = {"senior": "birads", "junior": "binary"}

    def run(seed):
        noise = np.random.default_rng(seed)
        local = [(y[site_of == s], {r: v[site_of == s] for r, v in scores.items()}) for s in range(3)]
        pooled = pool_histograms([site_histograms(t, v, grids, noise_sd=1.0, rng=noise) for t, v in local])
        return pooled_analysis(pooled, [site_placement_sums(t, v, pooled, noise_sd=1.0, rng=noise)
                                        for t, v in local])

    noisy, again = run(0), run(0)
    assert noisy == again
    exact = auc_ci(y, scores["senior"])[0]
    m, n = y.sum(), (~y).sum()
    bound = np.sqrt(3 * 8 * (1 / m**2 + 1 / n**2))  # σ·√(sites·cells·(1/m² + 1/n²)), σ = 1
    assert noisy["raters"]["senior"]["auc"] != exact
    assert abs(noisy["raters"]["senior"]["auc"] - exact) < 4 * bound


def test_errors_name_the_problem():
    y, scores = study(40, np.random.default_rng(2))
    bad = dict(scores, model=np.where(np.arange(40) == 3, 101.0, scores["model"]))
    with pytest.raises(StatsInputError, match=r"'model': score 101.0 at index 3 is not on the percent grid"):
        site_histograms(y, bad, GRID_OF)
    bad = dict(scores, senior=np.where(np.arange(40) == 7, 4.1, scores["senior"]))
    with pytest.raises(StatsInputError, match=r"'senior': score 4.1 at index 7 is not on the birads grid"):
        site_histograms(y, bad, GRID_OF)
    with pytest.raises(StatsInputError, match="no federated grid 'decile'"):
        site_histograms(y, scores, dict(GRID_OF, model="decile"))
    with pytest.raises(StatsInputError, match=r"raters .* and grids .* differ"):
        site_histograms(y, {"model": scores["model"]}, GRID_OF)
    one = site_histograms(y, scores, GRID_OF)
    other = site_histograms(y, {"model": scores["model"]}, {"model": "percent"})
    with pytest.raises(StatsInputError, match="site 1 sent raters"):
        pool_histograms([one, other])
    few = np.zeros(40, dtype=bool)
    few[0] = True
    with pytest.raises(StatsInputError, match="needs 2 of each"):
        pooled_analysis(pool_histograms([site_histograms(few, scores, GRID_OF)]))
    with pytest.raises(StatsInputError, match="min_count"):
        site_histograms(y, scores, GRID_OF, min_count=0)
