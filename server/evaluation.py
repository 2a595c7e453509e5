"""The study's analysis made federated, at the coordinating center: from the sites' histograms and sums
(never their cases) to per-site and pooled tables in the layout of `common.stats.analyze`.

Exchange 1 gives each site's per-class histograms per group (all cases, density, symptoms) and rater
(the global model, its BI-RADS head, the site's local-only model when asked, the readers in its labels).
Added up they are exact sufficient statistics of every rater's ROC, AUC, DeLong CI, and sensitivity /
specificity / accuracy / PPV / NPV at its threshold, and of matched operating points, so each table's
per-rater rows come from `analyze` run on the cases the histograms stand for (each count expanded into
that many cases at its cell's score): the same numbers as on the concatenated prediction files.
Exchange 1 also holds every pair of raters' 2×2 tables of calls on malignant and benign cases: added up,
they give McNemar's tests and Cohen's kappa (`common.stats.analysis.compare`, the pooled path's own
code), and the BI-RADS head's confusion matrices against the clinical read its weighted kappa. Paired
DeLong tests need exchange 2's placement sums (`common.stats.federated.pooled_analysis`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from common.protocol import ALL, to_json
from common.stats import (
    GRIDS,
    RaterScores,
    ScoreKind,
    StatsInputError,
    analyze,
    pool_histograms,
    pooled_analysis,
)
from common.stats.analysis import NO_DELONG, compare, ordinal_agreement
from common.stats.federated import pool_counts, pool_pair_tables

SITE_GROUP = "site={}"
NOT_QUERIED = "DeLong's test not computed: no placement sums (the sites send them in the final evaluation)"


def common_raters(summaries: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Raters every site has on the same grid and threshold (in the first site's order), and why the
    others are left out of the pooled analysis."""
    first, left_out = summaries[0]["raters"], {}
    common = {}
    for name, meta in first.items():
        lacking = [s["site"] for s in summaries if s["raters"].get(name) != meta]
        if lacking:
            left_out[name] = f"not read on the same scale by every site (differs at {', '.join(lacking)})"
        else:
            common[name] = meta
    for summary in summaries:
        for name, reason in summary.get("skipped", {}).items():
            left_out.setdefault(name, f"{summary['site']}: {reason}")
        for name in summary["raters"]:
            if name not in common:
                left_out.setdefault(name, f"only some sites have it ({summary['site']} does)")
    return common, left_out


def _subset(histograms: Mapping[str, Any], raters: Sequence[str]) -> dict[str, Any]:
    index = [histograms["raters"].index(r) for r in raters]
    return {"raters": list(raters), "grids": [histograms["grids"][i] for i in index],
            "n_pos": histograms["n_pos"], "n_neg": histograms["n_neg"],
            "hist_pos": {r: histograms["hist_pos"][r] for r in raters},
            "hist_neg": {r: histograms["hist_neg"][r] for r in raters}}


def pool_groups(summaries: Sequence[Mapping[str, Any]], raters: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per group, the sites' histograms of `raters` added up (exchange 1 at the center)."""
    groups = sorted({g for s in summaries for g in s["groups"]}, key=lambda g: (g != ALL, g))
    return {group: pool_histograms([_subset(s["groups"][group], raters)
                                    for s in summaries if group in s["groups"]])
            for group in groups}


def estimable(pooled: Mapping[str, Any]) -> bool:
    """DeLong's variance needs at least 2 malignant and 2 benign cases."""
    return min(pooled["n_pos"], pooled["n_neg"]) >= 2


def not_estimable(analysis: Mapping[str, Any]) -> dict[str, str]:
    """Sites whose own evaluation cannot be estimated (a single class, or too few cases of one), and why:
    their tables say n/e, while their cases still count in the pooled statistics, which are exact."""
    notes = {}
    for group, histograms in analysis["histograms"].items():
        site = group.removeprefix(SITE_GROUP.format(""))
        if site != group and not estimable(histograms):
            notes[site] = (f"{histograms['n_pos']} malignant and {histograms['n_neg']} benign test exams: "
                           "its AUC needs both classes, its 95% CI and DeLong's tests at least 2 of each; "
                           "its own evaluation is not estimable (n/e), its cases still count in the pooled "
                           "statistics")
    return notes


def expand(histograms: Mapping[str, Any], raters: Mapping[str, Mapping[str, Any]]
           ) -> tuple[np.ndarray, dict[str, RaterScores]]:
    """The cases a pooled histogram stands for: truth (malignant first) and each rater's scores on its grid.

    The order of cases differs between raters, so these serve per-rater statistics and ROC curves only,
    never paired ones.
    """
    n_pos, n_neg = int(histograms["n_pos"]), int(histograms["n_neg"])
    truth = np.r_[np.ones(n_pos, dtype=bool), np.zeros(n_neg, dtype=bool)]
    scores = {}
    for name, grid_name in zip(histograms["raters"], histograms["grids"], strict=True):
        counts = [np.asarray(histograms[k][name]) for k in ("hist_pos", "hist_neg")]
        if any(not np.array_equal(c, np.round(c)) for c in counts):
            raise StatsInputError(f"rater {name!r}: histograms with noise cannot be expanded into cases")
        values = GRIDS[ScoreKind(grid_name)].values
        expanded = np.r_[np.repeat(values, counts[0].astype(int)), np.repeat(values, counts[1].astype(int))]
        scores[name] = RaterScores(expanded, ScoreKind(grid_name), float(raters[name]["threshold"]))
    return truth, scores


def _birads_head(heads: Sequence[Mapping[str, Any] | None], confidence: float) -> dict[str, Any] | None:
    """The BI-RADS head against the clinical read: the sites' confusion matrices added up, weighted kappa."""
    if not heads or any(h is None for h in heads):
        return None
    categories = heads[0]["categories"]
    if any(h["categories"] != categories for h in heads):
        raise StatsInputError("the sites' BI-RADS head confusion matrices have different categories")
    k = len(categories)
    counts = pool_counts([h["counts"] for h in heads], (k, k), "the BI-RADS head's confusion matrix")
    return ordinal_agreement(counts, categories, confidence)


def group_table(histograms: Mapping[str, Any], raters: Mapping[str, Mapping[str, Any]],
                sums: Sequence[Mapping[str, Any]] | None, exchange1: Sequence[Mapping[str, Any]]
                ) -> dict[str, Any]:
    """One group's table in `analyze`'s layout: every rater's row, and for every pair of raters McNemar's
    tests and kappa from the sites' 2×2 tables (in `exchange1`, their summaries of the group), matched
    operating points, and with exchange-2 `sums` DeLong's paired test (else null, with a note saying
    why); `birads_head` from the sites' confusion matrices."""
    truth, scores = expand(histograms, raters)
    table = analyze(truth, scores, comparisons=[])
    del table["subgroups"]
    confidence = table["confidence"]
    tested = {(c["a"], c["b"]): (c["z"], c["p"])
              for c in (pooled_analysis(histograms, sums, confidence)["comparisons"] if sums else [])}
    aucs = {r: np.nan if e["auc"] is None else e["auc"] for r, e in table["raters"].items()}
    no_delong = NOT_QUERIED if estimable(histograms) else NO_DELONG
    for a, b in combinations(raters, 2):
        tables = pool_pair_tables([s["pairs"] for s in exchange1], a, b)
        table["comparisons"].append(compare(truth, scores, a, b, (aucs[a], aucs[b]), tested.get((a, b)),
                                            tables, confidence, no_delong))
    table["birads_head"] = _birads_head([s.get("birads_head") for s in exchange1], confidence)
    return table


def federated_analysis(summaries: Sequence[Mapping[str, Any]],
                       site_sums: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """The study's analysis over all sites (`summaries` from exchange 1, `site_sums` from exchange 2 by
    site name, None for a per-round evaluation): the pooled table for all cases, and as subgroups each
    density and symptoms group and each site (its own paired tests). Returns `analyze`'s layout plus
    `left_out` (raters not analysed, and why) and `histograms` (each table's pooled histograms)."""
    raters, left_out = common_raters(summaries)
    pooled = pool_groups(summaries, list(raters))
    result: dict[str, Any] = {}
    histograms_used = dict(pooled)
    for group, histograms in pooled.items():
        sums = None if site_sums is None else [s["pooled"][group] for s in site_sums.values()
                                               if group in s["pooled"]]
        exchange1 = [s["groups"][group] for s in summaries if group in s["groups"]]
        table = group_table(histograms, raters, sums if estimable(histograms) else None, exchange1)
        if group == ALL:
            result = {**table, "subgroups": {}}
        else:
            result["subgroups"][group] = table
    for summary in summaries:
        group = SITE_GROUP.format(summary["site"])
        histograms_used[group] = _subset(summary["groups"][ALL], list(raters))
        own = None if site_sums is None else site_sums[summary["site"]]["own"]
        result["subgroups"][group] = group_table(histograms_used[group], raters, own and [own],
                                                 [summary["groups"][ALL]])
    result["left_out"] = left_out
    result["histograms"] = json.loads(to_json(histograms_used))  # numpy → JSON's lists and numbers
    return result
