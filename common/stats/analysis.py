"""The reader study's analysis of a case table: per-rater metrics, paired comparisons, and all of it again
in every subgroup. Whatever a group's cases cannot support (one class, too few cases, nobody called
positive) is reported as null with a ``note`` saying why, never as a crash or a made-up number."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from common.stats.binary import McNemar, binary_metrics, cohen_kappa, mcnemar_tests
from common.stats.delong import delong_cov, normal_ci, paired_z, roc_auc
from common.stats.scores import RaterScores, format_score

DENSITY = {"a": "non-dense", "b": "non-dense", "c": "dense", "d": "dense"}
_PROPORTIONS = ("sensitivity", "specificity", "accuracy", "ppv", "npv")


def subgroup_labels(column: str, values: Sequence[str]) -> np.ndarray:
    """A subgroup column's labels; BI-RADS density (a column named *density* holding a–d) becomes
    "dense" (c, d) or "non-dense" (a, b). Blank entries stay blank and belong to no subgroup."""
    labels = np.array([v.strip() for v in values], dtype=object)
    present = {v.lower() for v in labels if v}
    if "density" in column.lower() and present and present <= DENSITY.keys():
        labels = np.array([DENSITY[v.lower()] if v else v for v in labels], dtype=object)
    return labels


def subgroup_masks(subgroups: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{"COLUMN=VALUE": case mask}`` for every non-blank value of every subgroup column, values sorted."""
    return {f"{column}={value}": labels == value
            for column, labels in subgroups.items()
            for value in sorted({v for v in labels if v})}


def _number(x: float) -> float | None:
    """JSON-ready: NaN (not estimable) becomes None."""
    return None if np.isnan(x) else float(x)


def _rater_entry(truth: np.ndarray, rater: RaterScores, auc: float, var: float, confidence: float
                 ) -> dict[str, Any]:
    n_pos = int(np.count_nonzero(truth))
    entry: dict[str, Any] = {"kind": str(rater.kind), "threshold": rater.threshold,
                             "threshold_label": format_score(rater.threshold, rater.kind),
                             "n_pos": n_pos, "n_neg": len(truth) - n_pos,
                             "auc": _number(auc), "auc_ci": None}
    if not np.isnan(var):
        entry["auc_ci"] = list(normal_ci(auc, var, confidence))
    missing = []
    for name, prop in binary_metrics(truth, rater.decisions(), confidence).items():
        entry[name] = _number(prop.value)
        entry[f"{name}_ci"] = None if np.isnan(prop.value) else [prop.lo, prop.hi]
        if np.isnan(prop.value):
            missing.append(name)
    if entry["auc"] is None:
        entry["note"] = f"not estimable: no {'positive' if n_pos == 0 else 'negative'} cases"
    else:
        notes = [] if entry["auc_ci"] else ["AUC 95% CI not estimable: fewer than 2 cases of a class"]
        notes += [f"{', '.join(missing)} not estimable: zero denominator"] if missing else []
        if notes:
            entry["note"] = "; ".join(notes)
    return entry


def _mcnemar_entry(test: McNemar, n: int) -> dict[str, Any] | None:
    if n == 0:
        return None
    return {"statistic": test.statistic, "p": test.p, "b": test.b, "c": test.c, "method": test.method}


def _agreement(truth: np.ndarray, a: RaterScores, b: RaterScores, confidence: float) -> dict[str, Any]:
    """McNemar's tests and Cohen's kappa of two raters' decisions."""
    da, db = a.decisions(), b.decisions()
    n_pos = int(np.count_nonzero(truth))
    tests = mcnemar_tests(truth, da, db)
    kappa = cohen_kappa(da, db, confidence)
    return {
        "mcnemar": {"sensitivity": _mcnemar_entry(tests["sensitivity"], n_pos),
                    "specificity": _mcnemar_entry(tests["specificity"], len(truth) - n_pos),
                    "accuracy": _mcnemar_entry(tests["accuracy"], len(truth))},
        "kappa": _number(kappa.value),
        "kappa_ci": None if np.isnan(kappa.value) else [kappa.lo, kappa.hi],
    }


def _table(truth: np.ndarray, raters: Mapping[str, RaterScores], pairs: Sequence[tuple[str, str]],
           confidence: float) -> dict[str, Any]:
    names = list(raters)
    n_pos = int(np.count_nonzero(truth))
    n_neg = len(truth) - n_pos
    nan = float("nan")
    if min(n_pos, n_neg) >= 2:
        auc, cov = delong_cov(truth, *(raters[r].scores for r in names))
    else:
        both = min(n_pos, n_neg) >= 1
        auc = np.array([roc_auc(truth, raters[r].scores) if both else nan for r in names])
        cov = np.full((len(names), len(names)), nan)
    table: dict[str, Any] = {
        "n_cases": len(truth), "n_pos": n_pos, "n_neg": n_neg,
        "raters": {r: _rater_entry(truth, raters[r], auc[i], cov[i, i], confidence)
                   for i, r in enumerate(names)},
        "comparisons": [],
    }
    for a, b in pairs:
        i, j = names.index(a), names.index(b)
        z, p = (None, None) if np.isnan(cov[i, j]) else paired_z(auc, cov, i, j)
        entry = {"a": a, "b": b, "auc_a": _number(auc[i]), "auc_b": _number(auc[j]), "z": z, "p": p,
                 **_agreement(truth, raters[a], raters[b], confidence)}
        notes = []
        if z is None:
            notes.append("not estimable: DeLong's test needs at least 2 positive and 2 negative cases")
        if entry["kappa"] is None:
            notes.append("kappa not estimable: both raters made the same call on every case")
        if notes:
            entry["note"] = "; ".join(notes)
        table["comparisons"].append(entry)
    return table


def analyze(truth: np.ndarray, raters: Mapping[str, RaterScores],
            comparisons: Sequence[tuple[str, str]] | None = None,
            subgroups: Mapping[str, np.ndarray] | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """Per-rater AUC (DeLong CI), sensitivity, specificity, accuracy, PPV, NPV (Wilson CIs); per pair
    DeLong's Z and p, McNemar's tests and Cohen's kappa; the same for each subgroup value.

    ``truth`` is boolean (True = malignant); ``comparisons`` default to every pair of raters;
    ``subgroups`` maps a column name to one label per case (see :func:`subgroup_labels`). The result is
    JSON-ready: ``{"n_cases", "n_pos", "n_neg", "confidence", "raters", "comparisons", "subgroups"}``.
    """
    pairs = list(comparisons) if comparisons is not None else list(combinations(raters, 2))
    result = {"confidence": confidence, **_table(truth, raters, pairs, confidence), "subgroups": {}}
    for key, mask in subgroup_masks(subgroups or {}).items():
        result["subgroups"][key] = _table(truth[mask], {r: s.subset(mask) for r, s in raters.items()},
                                          pairs, confidence)
    return result
