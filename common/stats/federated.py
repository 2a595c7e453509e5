"""Federated AUC, DeLong CI and paired DeLong tests: sites send histograms and sums, never case rows.

Scores are first put on a fixed grid agreed by everyone (``scores.GRIDS``: the model's 0–100 score to one
decimal, BI-RADS as ordinal categories, 0/1 decisions). On a grid, a rater's per-class histograms are
exact sufficient statistics for its AUC and DeLong variance (``delong.py`` computes those from histograms
in the pooled path too). Paired tests also need how each case's placement values under two raters go
together, which marginal histograms lose; a second exchange recovers it as sums.

Exchange 1, site → center (:func:`site_histograms`), per rater: the count of positive and of negative
cases in each grid cell, plus the site's total positives and negatives. The center adds them
(:func:`pool_histograms`); that alone gives every rater's pooled AUC and DeLong CI (:func:`pooled_analysis`).

Exchange 2, center → site: the pooled histograms. Site → center (:func:`site_placement_sums`): two
matrices (raters × raters), Σ (V_r − AUC_r)(V_s − AUC_s) over the site's positives and over its negatives,
V being a case's placement value looked up in the pooled histograms. Adding the sites' matrices gives
DeLong's S10 and S01 exactly as if all cases sat in one table, hence the paired tests.

Exchange 1 also carries, per pair of raters, the 2×2 table of their binary calls (at each rater's
threshold) on the site's malignant and on its benign cases (:func:`site_pair_tables`): McNemar's tests
and Cohen's kappa are functions of those tables alone, so the center adds them (:func:`pool_pair_tables`)
and computes exactly what the pooled cases give (``analysis.agreement``). The table on all cases is their
sum and is not sent. Likewise an ordinal rater's confusion matrix against a reference read
(:func:`site_confusion`: the model's BI-RADS against the clinical read), for the weighted kappa.

Without suppression or noise the results equal the pooled computation on the concatenated grid scores
(to rounding, ~1e-15). Privacy options, applied by the site to what it sends:

* ``min_count`` (k): per rater, runs of adjacent grid cells are merged into blocks until each block holds
  0 or at least k positives and 0 or at least k negatives, and all of a block's cases are reported at the
  block's median cell. No reported cell then holds 1..k−1 cases of a class (unless the site has fewer
  than k of that class in all, in which case that class sits in one block). Case counts are kept;
  the order of cases in different blocks is kept; cases within a block become ties. The result is exact
  for the coarsened scores, and differs from the uncoarsened AUC only through pairs involving a
  coarsened case whose partner's score lies within that block's range. k = 1 changes nothing.
  The 2×2 tables are of the calls at the reported (coarsened) cells, so they agree with the histograms;
  a class's table, and a confusion matrix, is sent only if each of its cells holds 0 or at least k
  cases, else null. Not just the small cell: the histograms give the tables' margins, from which one
  withheld cell could be recovered. A null table makes what needs it not estimable at the center.
* ``noise_sd`` (σ): independent Gaussian noise N(0, σ²) added to every count (and to the class totals)
  and, symmetrically, to every entry of the sums. One case changes one count per rater by 1 and each
  centered product by at most 1, so σ is the scale of a Gaussian mechanism; this module does no formal
  differential-privacy accounting. Noisy counts are neither rounded nor clipped at 0, so the pooled
  histograms stay unbiased, but the results become approximate: a cell's noise moves the AUC by
  (V10 − AUC)·noise / m in a positive cell and (V01 − AUC)·noise / n in a negative one, so its error
  has standard deviation at most σ·√(sites · cells · (1/m² + 1/n²)); on the 1001-cell 0–100 grid with
  500 cases per class and 3 sites that bound is about 0.15·σ, on the 8-cell BI-RADS grid 0.014·σ. Noise
  on the sums moves the paired variance by about σ·√sites / m² (and / n²). Prefer ``min_count`` on fine
  grids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from common.stats._validation import StatsInputError, check_scores, check_truth
from common.stats.binary import confusion, pair_table
from common.stats.delong import (
    auc_covariance,
    cell_placements,
    centered_cross_products,
    normal_ci,
    paired_z,
)
from common.stats.scores import GRIDS, Grid, ScoreKind


def _grid(name: str, rater: str) -> Grid:
    try:
        return GRIDS[ScoreKind(name)]
    except (KeyError, ValueError):
        raise StatsInputError(f"rater {rater!r}: no federated grid {name!r}; "
                              f"choose one of {', '.join(GRIDS)}") from None


def _block_ok(pos: float, neg: float, min_count: int) -> bool:
    return (pos == 0 or pos >= min_count) and (neg == 0 or neg >= min_count)


def _suppression_map(hist_pos: np.ndarray, hist_neg: np.ndarray, min_count: int) -> np.ndarray:
    """The cell each grid cell's cases are reported at after merging small cells (see module docstring)."""
    target = np.arange(len(hist_pos))
    if min_count <= 1:
        return target
    blocks: list[tuple[int, float, float]] = []  # (first cell, positives, negatives), in grid order
    start, pos, neg = 0, 0, 0
    for cell in range(len(hist_pos)):
        pos, neg = pos + hist_pos[cell], neg + hist_neg[cell]
        if pos + neg > 0 and _block_ok(pos, neg, min_count):
            blocks.append((start, pos, neg))
            start, pos, neg = cell + 1, 0, 0
    # Cases left over at the top of the grid join earlier blocks until the merged block is acceptable.
    while pos + neg > 0 and not _block_ok(pos, neg, min_count) and blocks:
        start, block_pos, block_neg = blocks.pop()
        pos, neg = pos + block_pos, neg + block_neg
    if pos + neg > 0:
        blocks.append((start, pos, neg))
    stops = [b[0] for b in blocks[1:]] + [len(hist_pos)]
    for (first, _, _), stop in zip(blocks, stops, strict=True):
        counts = np.cumsum(hist_pos[first:stop] + hist_neg[first:stop])
        target[first:stop] = first + int(np.searchsorted(counts, counts[-1] / 2))
    return target


def _site_cells(y_true: object, scores_by_rater: Mapping[str, object], grids: Mapping[str, str],
                min_count: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The site's truth and, per rater, each case's reported grid cell (after suppression).

    Deterministic, so exchange 2 looks cases up in exactly the cells exchange 1 reported.
    """
    if min_count < 1:
        raise StatsInputError(f"min_count must be at least 1, got {min_count}")
    pos = check_truth(y_true)
    if not grids:
        raise StatsInputError("at least one rater is needed")
    if set(scores_by_rater) != set(grids):
        raise StatsInputError(f"raters {sorted(scores_by_rater)} and grids {sorted(grids)} differ")
    cells = {}
    for rater, name in grids.items():
        grid = _grid(name, rater)
        raw = grid.cells(check_scores(scores_by_rater[rater], len(pos), f"scores of rater {rater!r}"), rater)
        n_cells = len(grid.values)
        target = _suppression_map(np.bincount(raw[pos], minlength=n_cells),
                                  np.bincount(raw[~pos], minlength=n_cells), min_count)
        cells[rater] = target[raw]
    return pos, cells


def _noisy_counts(counts: np.ndarray | int, noise_sd: float, rng: np.random.Generator | None
                  ) -> np.ndarray | int | float:
    if noise_sd == 0:
        return counts
    return counts + _rng(rng).normal(0.0, noise_sd, np.shape(counts))


def _noisy_sums(sums: np.ndarray, noise_sd: float, rng: np.random.Generator | None) -> np.ndarray:
    if noise_sd == 0:
        return sums
    noise = np.triu(_rng(rng).normal(0.0, noise_sd, sums.shape))
    return sums + noise + np.triu(noise, 1).T  # symmetric, as the sums are


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


def _check_noise(noise_sd: float) -> None:
    if not noise_sd >= 0:
        raise StatsInputError(f"noise_sd must be >= 0, got {noise_sd}")


def site_histograms(y_true: object, scores_by_rater: Mapping[str, object], grids: Mapping[str, str], *,
                    min_count: int = 1, noise_sd: float = 0.0, rng: np.random.Generator | None = None
                    ) -> dict[str, Any]:
    """Exchange 1, at a site: per rater, per-class histograms of the site's scores on the fixed grid.

    ``grids`` names each rater's grid ("percent", "birads", "binary" or "probability"). What leaves the
    site is exactly the returned dict: ``raters`` and ``grids`` (names), ``n_pos`` and ``n_neg`` (the
    site's class totals), and ``hist_pos[rater]``, ``hist_neg[rater]`` (count per grid cell),
    after the optional ``min_count`` suppression and ``noise_sd`` noise described in the module docstring.
    """
    _check_noise(noise_sd)
    pos, cells = _site_cells(y_true, scores_by_rater, grids, min_count)
    raters = list(grids)
    summary: dict[str, Any] = {
        "raters": raters,
        "grids": [grids[r] for r in raters],
        "n_pos": _noisy_counts(int(np.count_nonzero(pos)), noise_sd, rng),
        "n_neg": _noisy_counts(int(np.count_nonzero(~pos)), noise_sd, rng),
        "hist_pos": {},
        "hist_neg": {},
    }
    for rater in raters:
        n_cells = len(_grid(grids[rater], rater).values)
        for key, members in (("hist_pos", pos), ("hist_neg", ~pos)):
            counts = np.bincount(cells[rater][members], minlength=n_cells)
            summary[key][rater] = _noisy_counts(counts, noise_sd, rng)
    return summary


def pool_histograms(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """At the center: add the sites' exchange-1 summaries (same raters and grids) into one."""
    if not summaries:
        raise StatsInputError("pool_histograms needs at least one site summary")
    first = summaries[0]
    pooled: dict[str, Any] = {"raters": list(first["raters"]), "grids": list(first["grids"]),
                              "n_pos": 0, "n_neg": 0, "hist_pos": {}, "hist_neg": {}}
    for site, summary in enumerate(summaries):
        if list(summary["raters"]) != pooled["raters"] or list(summary["grids"]) != pooled["grids"]:
            raise StatsInputError(f"site {site} sent raters {summary['raters']} on grids {summary['grids']}; "
                                  f"expected {pooled['raters']} on {pooled['grids']}")
        pooled["n_pos"] += summary["n_pos"]
        pooled["n_neg"] += summary["n_neg"]
        for key in ("hist_pos", "hist_neg"):
            for rater, name in zip(pooled["raters"], pooled["grids"], strict=True):
                counts = np.asarray(summary[key][rater])
                if counts.shape != (len(_grid(name, rater).values),):
                    raise StatsInputError(f"site {site}: {key} of rater {rater!r} has shape {counts.shape}, "
                                          f"not that of the {name} grid")
                pooled[key][rater] = pooled[key].get(rater, 0) + counts
    return pooled


def _pooled_placements(pooled: Mapping[str, Any]) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Per rater: pooled AUC and the placement value of each grid cell, from the pooled histograms."""
    placements = []
    for rater in pooled["raters"]:
        hist_pos, hist_neg = np.asarray(pooled["hist_pos"][rater]), np.asarray(pooled["hist_neg"][rater])
        if min(hist_pos.sum(), hist_neg.sum()) < 2:
            raise StatsInputError(f"rater {rater!r}: the pooled histograms hold {hist_pos.sum()} positive "
                                  f"and {hist_neg.sum()} negative cases; the DeLong variance needs 2 of each")
        placements.append(cell_placements(hist_pos, hist_neg))
    return placements


def site_placement_sums(y_true: object, scores_by_rater: Mapping[str, object], pooled: Mapping[str, Any], *,
                        min_count: int = 1, noise_sd: float = 0.0, rng: np.random.Generator | None = None
                        ) -> dict[str, Any]:
    """Exchange 2, at a site, given the pooled histograms from the center: placement cross-product sums.

    Uses the same grids and ``min_count`` as exchange 1. What leaves the site is exactly the returned
    dict: ``raters`` (names, in ``pooled`` order), and ``sum10``, ``sum01``: raters × raters matrices of
    Σ (V_r − AUC_r)(V_s − AUC_s) over the site's positive and negative cases respectively, where V is the
    case's placement value under rater r in the pooled histograms (plus ``noise_sd`` noise if asked).
    """
    _check_noise(noise_sd)
    raters = list(pooled["raters"])
    pos, cells = _site_cells(y_true, scores_by_rater, dict(zip(raters, pooled["grids"], strict=True)),
                             min_count)
    placements = _pooled_placements(pooled)
    auc = np.array([p[0] for p in placements])
    rows10 = np.array([v10[cells[r][pos]] for r, (_, v10, _) in zip(raters, placements, strict=True)])
    rows01 = np.array([v01[cells[r][~pos]] for r, (_, _, v01) in zip(raters, placements, strict=True)])
    return {"raters": raters,
            "sum10": _noisy_sums(centered_cross_products(rows10, auc), noise_sd, rng),
            "sum01": _noisy_sums(centered_cross_products(rows01, auc), noise_sd, rng)}


def pooled_analysis(pooled: Mapping[str, Any], placement_sums: Sequence[Mapping[str, Any]] | None = None,
                    confidence: float = 0.95) -> dict[str, Any]:
    """At the center: pooled AUC and DeLong CI per rater (exchange 1 alone), and with the sites'
    exchange-2 sums, DeLong's paired test for every pair of raters.

    Returns ``{"n_pos", "n_neg", "raters": {name: {"auc", "auc_var", "auc_ci": [lo, hi]}},
    "comparisons": [{"a", "b", "auc_a", "auc_b", "z", "p"}, ...]}`` (no comparisons without sums).
    A rater's AUC and variance use its own histograms' totals, the paired covariances the summed site
    totals ``n_pos``, ``n_neg``; the two agree unless noise was added.
    """
    raters = list(pooled["raters"])
    placements = _pooled_placements(pooled)
    result: dict[str, Any] = {"n_pos": pooled["n_pos"], "n_neg": pooled["n_neg"], "raters": {},
                              "comparisons": []}
    for rater, (auc, v10, v01) in zip(raters, placements, strict=True):
        hist_pos, hist_neg = np.asarray(pooled["hist_pos"][rater]), np.asarray(pooled["hist_neg"][rater])
        theta = np.array([auc])
        var = auc_covariance(centered_cross_products(v10[None], theta, hist_pos),
                             centered_cross_products(v01[None], theta, hist_neg),
                             hist_pos.sum(), hist_neg.sum())[0, 0]
        result["raters"][rater] = {"auc": auc, "auc_var": float(var),
                                   "auc_ci": list(normal_ci(auc, var, confidence))}
    if not placement_sums:
        return result
    for site, sums in enumerate(placement_sums):
        if list(sums["raters"]) != raters:
            raise StatsInputError(f"site {site} sent sums for raters {sums['raters']}; expected {raters}")
    sum10 = sum(np.asarray(s["sum10"]) for s in placement_sums)
    sum01 = sum(np.asarray(s["sum01"]) for s in placement_sums)
    cov = auc_covariance(sum10, sum01, pooled["n_pos"], pooled["n_neg"])
    auc = np.array([p[0] for p in placements])
    for a, b in combinations(range(len(raters)), 2):
        z, p = paired_z(auc, cov, a, b)
        result["comparisons"].append({"a": raters[a], "b": raters[b], "auc_a": float(auc[a]),
                                      "auc_b": float(auc[b]), "z": z, "p": p})
    return result


def _released(counts: np.ndarray, min_count: int) -> np.ndarray | None:
    """``counts`` if every cell holds 0 or at least ``min_count`` cases, else None (see the docstring)."""
    return counts if np.all((counts == 0) | (counts >= min_count)) else None


def site_pair_tables(y_true: object, scores_by_rater: Mapping[str, object], grids: Mapping[str, str],
                     thresholds: Mapping[str, float], *, min_count: int = 1) -> list[dict[str, Any]]:
    """Exchange 1, at a site: for every pair of raters (in ``grids`` order), the :func:`pair_table` of
    their calls (score at or above the rater's threshold, on its reported grid cell) on the malignant and
    on the benign cases. What leaves the site is exactly the returned list of
    ``{"a", "b", "malignant": 2×2 counts or None, "benign": ...}``."""
    pos, cells = _site_cells(y_true, scores_by_rater, grids, min_count)
    calls = {r: _grid(name, r).values[cells[r]] >= thresholds[r] for r, name in grids.items()}
    return [{"a": a, "b": b, **{what: _released(pair_table(calls[a][members], calls[b][members]), min_count)
                                for what, members in (("malignant", pos), ("benign", ~pos))}}
            for a, b in combinations(grids, 2)]


def pool_counts(tables: Sequence[object | None], shape: tuple[int, ...], what: str) -> np.ndarray | None:
    """At the center: the sites' count tables added up; None where any site withheld its table."""
    total = np.zeros(shape, dtype=int)
    for site, table in enumerate(tables):
        if table is None:
            return None
        counts = np.asarray(table)
        if counts.shape != shape or not np.array_equal(counts, np.round(counts)):
            raise StatsInputError(f"site {site}: {what} is not a {'×'.join(map(str, shape))} table of counts")
        total += counts.astype(int)
    return total


def pool_pair_tables(sites: Sequence[Sequence[Mapping[str, Any]]], a: str, b: str
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """At the center: the sites' tables of the pair (a, b) added up, on malignant and on benign cases;
    None where any site withheld its table. A site that sent the pair as (b, a) has them transposed."""
    entries = []
    for site, tables in enumerate(sites):
        entry = next((t for t in tables if {t["a"], t["b"]} == {a, b}), None)
        if entry is None:
            raise StatsInputError(f"site {site} sent no 2×2 tables for raters {a!r} and {b!r}")
        entries.append(entry)

    def oriented(entry: Mapping[str, Any], what: str) -> object | None:
        table = entry[what]
        return table if table is None or entry["a"] == a else np.asarray(table).T

    malignant, benign = (pool_counts([oriented(e, what) for e in entries], (2, 2), f"{what} table of {a}/{b}")
                         for what in ("malignant", "benign"))
    return malignant, benign


def site_confusion(reference: object, calls: object, categories: Sequence[float], *, min_count: int = 1
                   ) -> np.ndarray | None:
    """Exchange 1, at a site: the k×k counts of ``calls`` against a ``reference`` read on ordinal
    ``categories`` (rows the reference), or None unless every cell holds 0 or at least ``min_count``."""
    counts = confusion(np.asarray(reference, dtype=float), np.asarray(calls, dtype=float),
                       np.asarray(categories, dtype=float))
    return _released(counts, min_count)
