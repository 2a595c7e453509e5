"""Federated AUC / DeLong, kappa / McNemar, the BI-RADS head and matched operating points from site
summaries equal the pooled computation on the concatenated cases."""

import dataclasses
import json
from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import cohen_kappa_score

from client.site_stats import cases_csv, histograms, placement_sums, read_cases
from common.labels import BIRADS_TARGETS, ExamLabel
from common.protocol import MODEL, MODEL_BIRADS, to_json
from common.stats import (
    GRIDS,
    RaterScores,
    ScoreKind,
    StatsInputError,
    analyze,
    auc_ci,
    delong_cov,
    delong_test,
    pool_histograms,
    pooled_analysis,
    site_histograms,
    site_placement_sums,
    subgroup_labels,
)
from common.stats.analysis import matched_points
from common.stats.binary import confusion, weighted_kappa, wilson
from common.stats.federated import _site_cells, _suppression_map, pool_pair_tables
from common.stats.scores import BIRADS_SCALE
from server.evaluation import common_raters, estimable, federated_analysis, pool_groups

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


# --- Agreement, McNemar, the BI-RADS head and matched operating points, through the sites' real code ---

READS = ("2", "3", "4A", "4B", "4C", "5")


def reader_study(n: int, rng: np.random.Generator, benign_symptomatic: bool = False) -> list:
    """Exam labels with four readers' BI-RADS reads, and the model's scores and BI-RADS calls."""
    y = rng.random(n) < 0.3
    y[:2], y[2:4] = True, False
    symptomatic = rng.random(n) < 0.3
    if benign_symptomatic:  # a single-class subgroup: every symptomatic exam is benign
        symptomatic &= ~y
    case = rng.normal(0, 1, n)
    latent = {name: 1.5 + shift * y + 0.8 * case + rng.normal(0, noise, n) for name, shift, noise in (
        ("senior1", 2.5, 0.8), ("senior2", 2.2, 1.0), ("junior1", 1.0, 1.5), ("junior2", 0.9, 1.5))}
    reads = {f"reader_{name}": np.array(READS)[np.clip(np.round(z), 0, 5).astype(int)]
             for name, z in latent.items()}
    clinical = np.clip(np.round(2.5 + 2 * y + 0.6 * case + rng.normal(0, 0.8, n)), 2, 5).astype(int)
    labels = [ExamLabel(f"P{i}", f"S{i}", "L", bool(y[i]), int(clinical[i]) if i % 7 else None,
                        "abcd"[rng.integers(4)], bool(symptomatic[i]), "test",
                        {r: v[i] for r, v in reads.items()}) for i in range(n)]
    model = np.clip(50 + 30 * (y - 0.5) + 15 * case + rng.normal(0, 15, n), 0, 100)
    birads = np.clip(np.round(3 + 1.5 * (y - 0.3) + 0.5 * case + rng.normal(0, 0.7, n)), 2, 5).astype(int)
    return labels, model, birads


def federated_reader_study(tmp_path, labels, model, birads, site_of, min_count=1):
    """Each site's prediction file written and read back by `client.site_stats`, its summaries through
    JSON, and the center's `federated_analysis`; with the pooled prediction file's `Cases`."""
    summaries, cases = [], {}
    for s in np.unique(site_of):
        rows = np.flatnonzero(site_of == s)
        path = tmp_path / f"site{s}.csv"
        path.write_text(cases_csv([labels[i] for i in rows], birads[rows], {MODEL: model[rows]}))
        cases[f"site{s}"] = read_cases(path, 50.0)
        raters = {r: {"kind": v.kind, "threshold": v.threshold} for r, v in cases[f"site{s}"].raters.items()}
        summaries.append(json.loads(to_json({"site": f"site{s}", "skipped": {}, "raters": raters,
                                             "groups": histograms(cases[f"site{s}"], min_count)})))
    raters, _ = common_raters(summaries)
    pooled = {g: h for g, h in pool_groups(summaries, list(raters)).items() if estimable(h)}
    pooled = json.loads(to_json(pooled))
    sums = {name: json.loads(to_json(placement_sums(c, pooled, min_count))) for name, c in cases.items()}
    result = federated_analysis(summaries, sums)
    everything = tmp_path / "pooled.csv"
    everything.write_text(cases_csv(labels, birads, {MODEL: model}))
    return result, cases, read_cases(everything, 50.0)


def pooled_reference(labels, cases, names=None):
    """`analyze` on the pooled cases (raters `names`, default all), subgroups as the sites form them."""
    raters = {r: RaterScores(v.scores, ScoreKind(v.kind), v.threshold) for r, v in cases.raters.items()
              if names is None or r in names}
    symptoms = np.array(["symptomatic" if x.symptomatic else "asymptomatic" for x in labels], dtype=object)
    subgroups = {"density": subgroup_labels("density", [x.density for x in labels]), "symptoms": symptoms}
    return analyze(cases.truth, raters, subgroups=subgroups)


def assert_tables_equal(got, want):
    assert list(got["raters"]) == list(want["raters"])
    for r, entry in want["raters"].items():
        for key in ("auc", "sensitivity", "specificity", "accuracy", "ppv", "npv"):
            assert got["raters"][r][key] == pytest.approx(entry[key], abs=1e-12, nan_ok=True), (r, key)
    assert [(c["a"], c["b"]) for c in got["comparisons"]] == [(c["a"], c["b"]) for c in want["comparisons"]]
    for c, w in zip(got["comparisons"], want["comparisons"], strict=True):
        assert c["kappa"] == pytest.approx(w["kappa"], abs=1e-12)
        assert c["kappa_ci"] == pytest.approx(w["kappa_ci"], abs=1e-12)
        assert c["mcnemar"].keys() == w["mcnemar"].keys()
        for name, test in w["mcnemar"].items():
            if test is None:
                assert c["mcnemar"][name] is None
                continue
            assert (c["mcnemar"][name]["b"], c["mcnemar"][name]["c"], c["mcnemar"][name]["method"]) == (
                test["b"], test["c"], test["method"])
            assert c["mcnemar"][name]["statistic"] == pytest.approx(test["statistic"], abs=1e-12)
            assert c["mcnemar"][name]["p"] == pytest.approx(test["p"], abs=1e-12)
        assert (c["z"] is None) == (w["z"] is None)
        if w["z"] is not None:
            assert (c["z"], c["p"]) == pytest.approx((w["z"], w["p"]), abs=1e-9)
        assert c["matched"] == w["matched"]
        assert c.get("note") == w.get("note")


@settings(max_examples=12, deadline=None)
@given(n=st.integers(30, 300), n_sites=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_federated_agreement_mcnemar_and_birads_head_equal_the_pooled_analysis(tmp_path_factory, n, n_sites,
                                                                               seed):
    rng = np.random.default_rng(seed)
    labels, model, birads = reader_study(n, rng)
    site_of = rng.integers(0, n_sites, n)
    result, cases, everything = federated_reader_study(tmp_path_factory.mktemp("s"), labels, model, birads,
                                                       site_of)
    want = pooled_reference(labels, everything)
    assert MODEL_BIRADS in result["raters"] and result["raters"][MODEL_BIRADS]["kind"] == "birads"
    assert_tables_equal(result, want)
    for group, table in want["subgroups"].items():
        assert_tables_equal(result["subgroups"][group], table)
    for s, site_cases in cases.items():  # each site's own tables: its cases alone
        assert_tables_equal(result["subgroups"][f"site={s}"], pooled_reference(
            [labels[i] for i in np.flatnonzero(site_of == int(s.removeprefix("site")))], site_cases))
    read = ~np.isnan(everything.clinical_birads)
    reference, calls = everything.clinical_birads[read], everything.raters[MODEL_BIRADS].scores[read]
    kappa = weighted_kappa(reference, calls, BIRADS_TARGETS)
    head = result["birads_head"]
    assert head["confusion"] == confusion(reference, calls, np.array(BIRADS_TARGETS, dtype=float)).tolist()
    assert head["kappa"] == pytest.approx(kappa.value, abs=1e-12)
    assert head["kappa_ci"] == pytest.approx([kappa.lo, kappa.hi], abs=1e-12)
    if not np.isnan(kappa.value):
        assert kappa.value == pytest.approx(cohen_kappa_score(reference, calls, weights="linear"), abs=1e-12)


def test_a_single_class_subgroup_is_still_not_estimable(tmp_path):
    rng = np.random.default_rng(3)
    labels, model, birads = reader_study(200, rng, benign_symptomatic=True)
    result, _, everything = federated_reader_study(tmp_path, labels, model, birads, rng.integers(0, 3, 200))
    table = result["subgroups"]["symptoms=symptomatic"]
    assert table["n_pos"] == 0
    assert all(r["auc"] is None and r["note"].startswith("not estimable") for r in table["raters"].values())
    for c in table["comparisons"]:
        assert c["z"] is None and c["mcnemar"]["sensitivity"] is None and c["matched"] is None
        assert c["note"].startswith("not estimable: DeLong's test needs")
    assert_tables_equal(table, pooled_reference(labels, everything)["subgroups"]["symptoms=symptomatic"])


def test_min_count_withholds_whole_tables_and_the_center_says_not_estimable(tmp_path):
    rng = np.random.default_rng(4)
    labels, model, birads = reader_study(150, rng)
    k = 4
    site_of = rng.integers(0, 3, 150)
    result, cases, _ = federated_reader_study(tmp_path, labels, model, birads, site_of, min_count=k)
    withheld = []
    for name, site_cases in cases.items():
        for group, summary in histograms(site_cases, k).items():
            for pair in summary["pairs"]:
                for what in ("malignant", "benign"):
                    if pair[what] is None:
                        withheld.append((name, group, pair["a"], pair["b"], what))
                    else:
                        assert np.all((pair[what] == 0) | (pair[what] >= k))  # no small cell leaves the site
            counts = summary["birads_head"]["counts"]
            assert counts is None or np.all((counts == 0) | (counts >= k))
    assert withheld  # this split leaves small cells somewhere
    for name, group, a, b, what in withheld:
        tables = [result if group == "all" else result["subgroups"][group]]
        tables += [result["subgroups"][f"site={name}"]] if group == "all" else []
        for table in tables:  # the pooled group's table, and the site's own
            c = next(c for c in table["comparisons"] if (c["a"], c["b"]) == (a, b))
            assert c["kappa"] is None and c["mcnemar"]["accuracy"] is None
            assert c["mcnemar"]["sensitivity" if what == "malignant" else "specificity"] is None
            assert f"calls on {what} exams were suppressed" in c["note"]


def test_matched_operating_points_by_brute_force():
    rng = np.random.default_rng(8)
    y, scores = study(150, rng)
    model = RaterScores(np.round(scores["model"], 1), ScoreKind.PERCENT, 50.0)
    senior = RaterScores(scores["senior"], ScoreKind.BIRADS, 4.0)
    got = matched_points(y, model, senior, 0.95)
    spec_b, sens_b = np.mean(~senior.decisions()[~y]), np.mean(senior.decisions()[y])
    best = min(t for t in np.r_[np.unique(model.scores), np.inf] if np.mean(model.scores[~y] < t) >= spec_b)
    point = got["sensitivity_at_specificity"]
    assert point["threshold"] == best and point["target"] == pytest.approx(spec_b)
    assert point["value"] == pytest.approx(np.mean(model.scores[y] >= best))
    k = int(np.sum(model.scores[y] >= best))
    assert point["ci"] == pytest.approx([wilson(k, int(y.sum())).lo, wilson(k, int(y.sum())).hi])
    best = max(t for t in np.unique(model.scores) if np.mean(model.scores[y] >= t) >= sens_b)
    point = got["specificity_at_sensitivity"]
    assert point["threshold"] == best and point["achieved"] >= sens_b
    assert point["value"] == pytest.approx(np.mean(model.scores[~y] < best))
    assert matched_points(np.ones(5, dtype=bool), model.subset(np.arange(5)), senior.subset(np.arange(5)),
                          0.95) is None  # a single class


def test_a_pair_sent_in_the_other_order_is_transposed():
    a_first = {"a": "x", "b": "y", "malignant": [[1, 2], [3, 4]], "benign": [[5, 6], [7, 8]]}
    b_first = {"a": "y", "b": "x", "malignant": [[1, 3], [2, 4]], "benign": None}
    malignant, benign = pool_pair_tables([[a_first], [b_first]], "x", "y")
    assert malignant.tolist() == [[2, 4], [6, 8]] and benign is None
    with pytest.raises(StatsInputError, match="site 1 sent no 2×2 tables for raters 'x' and 'z'"):
        pool_pair_tables([[{**a_first, "b": "z"}], [a_first]], "x", "z")


def test_a_site_without_cases_is_not_estimable_and_the_pooled_tables_stand(tmp_path):
    rng = np.random.default_rng(6)
    labels, model, birads = reader_study(90, rng)
    site_of = np.repeat([0, 1, 2], 30)
    labels = [dataclasses.replace(x, malignant=None) if site_of[i] == 2 else x for i, x in enumerate(labels)]
    result, _, everything = federated_reader_study(tmp_path, labels, model, birads, site_of)
    empty = result["subgroups"]["site=site2"]
    assert empty["n_cases"] == 0 and empty["birads_head"]["kappa"] is None
    assert all(c["kappa"] is None and "kappa not estimable: no cases" in c["note"]
               for c in empty["comparisons"])
    # (Its reader columns, empty, do not read as BI-RADS: the readers are left out, the models stay.)
    assert set(result["left_out"]) == {r for r in everything.raters if r.startswith("reader_")}
    assert_tables_equal(result, pooled_reference([x for x in labels if x.malignant is not None], everything,
                                                 result["raters"]))
