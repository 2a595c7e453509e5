"""What a site contributes to the federated statistics: its prediction file, and the aggregates computed
from it that it sends (histograms, 2×2 tables of paired calls and the BI-RADS head's confusion matrix,
then placement sums; see `common.stats.federated`).

The prediction file is the single source of both exchanges and of any audit: one row per test exam with
its labels (the clinical BI-RADS read among them), the models' scores on the statistics' 0–100 grid (one
decimal), the model's BI-RADS call and the readers' reads from labels.csv. It stays at the site.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.redact import redact
from common.labels import BIRADS_TARGETS, ExamLabel
from common.protocol import ALL, LOCAL_ONLY, MODEL, MODEL_BIRADS
from common.stats import GRIDS, StatsInputError, pool_histograms, site_histograms, site_placement_sums
from common.stats.analysis import subgroup_labels, subgroup_masks
from common.stats.federated import site_confusion, site_pair_tables
from common.stats.scores import ScoreKind, default_threshold, parse_scores

CASE_COLUMNS = ("exam_id", "malignant", "density", "symptomatic", "birads")
"""Prediction-file columns that are not raters (`birads`: the clinical read); the others are raters'."""
_COUNTED = ("exams", "pathology", "malignant", "birads", "dense", "symptomatic")
"""What `site_counts` counts: exams, those with a pathology (of which malignant), with a 2–5 BI-RADS read
(the BI-RADS head's target), dense and symptomatic."""
_log = logging.getLogger(__name__)
"""The site's own log: details that must not reach the center."""


@dataclass(frozen=True)
class Rater:
    scores: np.ndarray
    kind: str
    """Its federated grid (`common.stats.scores.GRIDS`): percent for the models, birads for BI-RADS reads."""
    threshold: float
    """Positive call at score >= threshold."""


@dataclass(frozen=True)
class Cases:
    """A prediction file read back."""

    truth: np.ndarray
    raters: dict[str, Rater]
    groups: dict[str, np.ndarray]
    skipped: dict[str, str]
    """Reader columns that cannot be analysed, with the reason."""
    clinical_birads: np.ndarray
    """The clinical BI-RADS read where it is a BI-RADS head target (2–5), else NaN."""

    def scores(self, mask: np.ndarray, raters: Sequence[str]) -> dict[str, np.ndarray]:
        return {r: self.raters[r].scores[mask] for r in raters}

    def kinds(self, raters: Sequence[str]) -> dict[str, str]:
        return {r: self.raters[r].kind for r in raters}


def cases_csv(labels: Sequence[ExamLabel], birads: np.ndarray, scores: Mapping[str, np.ndarray]) -> str:
    """The prediction file's text; `birads` is the model's BI-RADS call, `scores` the models' 0–100 scores."""
    readers = sorted({name for label in labels for name in label.readers})
    if clash := set(readers) & {*CASE_COLUMNS, *scores, MODEL_BIRADS}:
        raise ValueError(f"labels.csv: reader column(s) {', '.join(sorted(clash))} clash with the "
                         "prediction file's columns; rename them")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CASE_COLUMNS, *scores, MODEL_BIRADS, *readers])
    for i, label in enumerate(labels):
        writer.writerow([label.exam_id, _flag(label.malignant), label.density, _flag(label.symptomatic),
                         label.birads_target or "", *(f"{s[i]:.1f}" for s in scores.values()), int(birads[i]),
                         *(label.readers.get(r, "") for r in readers)])
    return out.getvalue()


def _flag(value: bool | None) -> str:
    return "" if value is None else str(int(value))


def read_cases(path: Path, threshold: float) -> Cases:
    """Parse a prediction file; `threshold` is the models' positive call (the BI-RADS head's is BI-RADS 4,
    as the readers'). Only exams with a pathology are cases (the statistics need the truth); a reader
    column that is not a complete set of BI-RADS, 0/1, probability or 0–100 reads on them is skipped with
    its reason."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        numbered = [(line, row) for line, row in enumerate(reader, start=2) if row["malignant"] in ("0", "1")]
        rows = [row for _, row in numbered]
        columns = [c for c in reader.fieldnames or [] if c not in CASE_COLUMNS]
    raters, skipped = {}, {}
    for column in columns:
        texts = [row[column] for row in rows]
        if column in (MODEL, LOCAL_ONLY):
            raters[column] = Rater(np.array(texts, dtype=float), str(ScoreKind.PERCENT), threshold)
            continue
        if column == MODEL_BIRADS:
            raters[column] = Rater(np.array(texts, dtype=float), str(ScoreKind.BIRADS),
                                   float(default_threshold(ScoreKind.BIRADS)))
            continue
        try:
            values, kind = parse_scores(texts, column, [line for line, _ in numbered])
        except StatsInputError as exc:  # its text quotes a cell, which goes no further than this site's log
            _log.warning("%s: reader column %r skipped: %s", path, column, exc)
            skipped[column] = redact(str(exc))
            continue
        if kind not in GRIDS:
            skipped[column] = f"{kind} scores have no federated grid"
            continue
        raters[column] = Rater(values, str(kind), float(default_threshold(kind)))
    calls = {"1": "symptomatic", "0": "asymptomatic"}
    symptoms = np.array([calls.get(row["symptomatic"], "") for row in rows], dtype=object)
    density = subgroup_labels("density", [row["density"] for row in rows])
    groups = {ALL: np.ones(len(rows), dtype=bool),
              **subgroup_masks({"density": density, "symptoms": symptoms})}
    clinical = np.array([float(row["birads"]) if row["birads"] else np.nan for row in rows])
    return Cases(np.array([row["malignant"] == "1" for row in rows]), raters, groups, skipped, clinical)


def site_counts(labels: Sequence[ExamLabel]) -> dict[str, dict[str, int]]:
    """Per split, the counts of `_COUNTED` (the report's Table 1, `fedmammo check`)."""
    counts: dict[str, dict[str, int]] = {}
    for label in labels:
        entry = counts.setdefault(label.split, dict.fromkeys(_COUNTED, 0))
        values = (1, label.malignant is not None, bool(label.malignant), label.birads_target is not None,
                  label.dense, bool(label.symptomatic))
        for key, value in zip(_COUNTED, values, strict=True):
            entry[key] += int(value)
    return counts


def histograms(cases: Cases, min_count: int = 1) -> dict[str, dict[str, Any]]:
    """Exchange 1: per group, every rater's per-class histograms on its grid, every pair of raters' 2×2
    tables of calls (`pairs`), and the BI-RADS head's confusion matrix against the clinical read on the
    cases that have one (`birads_head`: categories and counts, the counts null when suppressed)."""
    raters = list(cases.raters)
    thresholds = {r: cases.raters[r].threshold for r in raters}
    summary = {}
    for group, mask in cases.groups.items():
        truth, scores, kinds = cases.truth[mask], cases.scores(mask, raters), cases.kinds(raters)
        summary[group] = {**site_histograms(truth, scores, kinds, min_count=min_count),
                          "pairs": site_pair_tables(truth, scores, kinds, thresholds, min_count=min_count)}
        if MODEL_BIRADS in cases.raters:
            read = mask & ~np.isnan(cases.clinical_birads)
            counts = site_confusion(cases.clinical_birads[read], cases.raters[MODEL_BIRADS].scores[read],
                                    BIRADS_TARGETS, min_count=min_count)
            summary[group]["birads_head"] = {"categories": list(BIRADS_TARGETS), "counts": counts}
    return summary


def placement_sums(cases: Cases, pooled: Mapping[str, Mapping[str, Any]], min_count: int = 1
                   ) -> dict[str, Any]:
    """Exchange 2: per group the center pooled, the sums against the pooled histograms; and, for the
    site's own paired tests, the sums of all its cases against its own histograms (None when it has fewer
    than 2 cases of a class)."""
    sums = {}
    for group, pooled_group in pooled.items():
        if group in cases.groups:
            mask = cases.groups[group]
            sums[group] = site_placement_sums(cases.truth[mask], cases.scores(mask, pooled_group["raters"]),
                                              pooled_group, min_count=min_count)
    raters = pooled[ALL]["raters"]
    scores, kinds = cases.scores(cases.groups[ALL], raters), cases.kinds(raters)
    try:
        own = pool_histograms([site_histograms(cases.truth, scores, kinds, min_count=min_count)])
        own_sums = site_placement_sums(cases.truth, scores, own, min_count=min_count)
    except StatsInputError:
        own_sums = None
    return {"pooled": sums, "own": own_sums}
