"""The reader study's analysis of a case table: per-rater metrics, paired comparisons, and all of it again
in every subgroup. Whatever a group's cases cannot support (one class, too few cases, nobody called
positive) is reported as null with a ``note`` saying why, never as a crash or a made-up number.

A comparison's entry (:func:`compare`) is built from what the federated path has too: the DeLong test,
the pair's 2×2 tables of calls on the malignant and on the benign cases (McNemar, kappa), and each
rater's own scores (matched operating points), so the center's tables are this module's output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from common.stats.binary import (
    McNemar,
    binary_metrics,
    kappa_table,
    linear_weights,
    mcnemar_tables,
    pair_table,
    wilson,
)
from common.stats.delong import delong_cov, normal_ci, paired_z, roc_auc
from common.stats.scores import RaterScores, ScoreKind, format_score

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


NO_DELONG = "not estimable: DeLong's test needs at least 2 positive and 2 negative cases"
INFINITE_Z = ("DeLong's Z is infinite (p = 0): the AUCs differ and their difference has no variance (e.g. "
              "one rater ranks every pair of cases right, the other every pair wrong)")
_SUPPRESSED = "not estimable: a site's counts of the pair's calls on {} exams were suppressed (min_count)"


def _mcnemar_entry(test: McNemar) -> dict[str, Any]:
    return {"statistic": test.statistic, "p": test.p, "b": test.b, "c": test.c, "method": test.method}


def agreement(malignant: np.ndarray | None, benign: np.ndarray | None, confidence: float
              ) -> tuple[dict[str, Any], list[str]]:
    """McNemar's tests and Cohen's kappa of a pair of raters from their :func:`pair_table` on the
    malignant and on the benign cases, and notes on what is not estimable. A table is None where a site
    suppressed it: what needs it is then null, never computed from the rest."""
    zero = np.zeros((2, 2), dtype=int)
    tests = mcnemar_tables(zero if malignant is None else malignant, zero if benign is None else benign)
    needs = {"sensitivity": (malignant,), "specificity": (benign,), "accuracy": (malignant, benign)}
    mcnemar = {name: None if any(t is None for t in tables) or sum(t.sum() for t in tables) == 0
               else _mcnemar_entry(tests[name]) for name, tables in needs.items()}
    notes = [_SUPPRESSED.format(what) for what, t in (("malignant", malignant), ("benign", benign))
             if t is None]
    empty = not notes and (malignant + benign).sum() == 0  # a site whose test exams lack a pathology
    kappa = None if notes or empty else kappa_table(malignant + benign, confidence=confidence)
    if empty or (kappa is not None and np.isnan(kappa.value)):
        notes.append("kappa not estimable: " + ("no cases" if empty else
                                                "both raters made the same call on every case"))
    entry = {"mcnemar": mcnemar, "kappa": None if kappa is None else _number(kappa.value),
             "kappa_ci": None if kappa is None or np.isnan(kappa.value) else [kappa.lo, kappa.hi]}
    return entry, notes


def _operating_point(count: int, total: int, threshold: float, kind: ScoreKind, target: float,
                     achieved: float, confidence: float) -> dict[str, Any]:
    """``count / total`` at ``threshold``, chosen so that the other measure reaches ``target``."""
    prop = wilson(count, total, confidence)
    finite = bool(np.isfinite(threshold))  # +inf: no threshold reaches the target, nobody is called positive
    return {"value": prop.value, "ci": [prop.lo, prop.hi], "threshold": float(threshold) if finite else None,
            "threshold_label": format_score(threshold, kind) if finite else "none",
            "target": target, "achieved": float(achieved)}


def matched_points(truth: np.ndarray, a: RaterScores, b: RaterScores, confidence: float
                   ) -> dict[str, Any] | None:
    """Rater a's sensitivity at rater b's specificity (a's lowest threshold whose specificity is at least
    b's) and a's specificity at b's sensitivity (its highest threshold whose sensitivity is at least b's),
    with Wilson CIs on the counts at that threshold: conditional on it, as it is chosen on the same cases.
    Needs only each rater's own scores, so per-class histograms give it exactly. None for a single class."""
    n_pos = int(np.count_nonzero(truth))
    n_neg = len(truth) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    b_calls = b.decisions()
    b_tp, b_tn = int(np.count_nonzero(b_calls & truth)), int(np.count_nonzero(~b_calls & ~truth))
    # Candidate thresholds: a's distinct scores and +inf (nobody called positive).
    values = np.r_[np.unique(a.scores), np.inf]
    tp = n_pos - np.searchsorted(np.sort(a.scores[truth]), values)  # positives scored >= each threshold
    tn = np.searchsorted(np.sort(a.scores[~truth]), values)  # negatives scored below it
    at_spec = int(np.argmax(tn >= b_tn))  # the lowest threshold as specific as b
    at_sens = int(np.flatnonzero(tp >= b_tp)[-1])  # the highest threshold as sensitive as b
    sens = _operating_point(int(tp[at_spec]), n_pos, values[at_spec], a.kind, b_tn / n_neg,
                            tn[at_spec] / n_neg, confidence)
    spec = _operating_point(int(tn[at_sens]), n_neg, values[at_sens], a.kind, b_tp / n_pos,
                            tp[at_sens] / n_pos, confidence)
    return {"sensitivity_at_specificity": sens, "specificity_at_sensitivity": spec}


def compare(truth: np.ndarray, raters: Mapping[str, RaterScores], a: str, b: str, auc: tuple[float, float],
            delong: tuple[float, float] | None, tables: tuple[np.ndarray | None, np.ndarray | None],
            confidence: float, no_delong: str = NO_DELONG) -> dict[str, Any]:
    """One comparison's entry: DeLong's Z and p (``delong``; None with the note ``no_delong``), McNemar's
    tests and kappa from the pair's ``tables`` (malignant, benign), and a's matched operating points.
    ``truth`` and ``raters`` serve only each rater's own scores, never their pairing."""
    z, p = delong if delong is not None else (None, None)
    found, notes = agreement(*tables, confidence)
    infinite = z is not None and bool(np.isinf(z))  # JSON has no ±inf: Z null, p (0) kept, a note says why
    entry = {"a": a, "b": b, "auc_a": _number(auc[0]), "auc_b": _number(auc[1]), "z": None if infinite else z,
             "p": p, **found, "matched": matched_points(truth, raters[a], raters[b], confidence)}
    notes = ([no_delong] if delong is None else []) + [INFINITE_Z] * infinite + notes
    if notes:
        entry["note"] = "; ".join(notes)
    return entry


def ordinal_agreement(counts: np.ndarray | None, categories: Sequence[float], confidence: float
                      ) -> dict[str, Any]:
    """An ordinal rater's k×k confusion matrix against a reference read (rows: the reference's category)
    and the linearly weighted kappa with its CI; ``counts`` is None where a site withheld its matrix."""
    entry: dict[str, Any] = {"categories": list(categories), "confusion": None, "n": None, "kappa": None,
                             "kappa_ci": None}
    if counts is None:
        entry["note"] = "not estimable: a site's confusion matrix was suppressed (min_count)"
        return entry
    entry.update(confusion=counts.tolist(), n=int(counts.sum()))
    if entry["n"] == 0:
        entry["note"] = "not estimable: no case has a reference read"
        return entry
    kappa = kappa_table(counts, linear_weights(len(categories)), confidence)
    if np.isnan(kappa.value):
        entry["note"] = "not estimable: the reference and the calls are one and the same category throughout"
    else:
        entry.update(kappa=kappa.value, kappa_ci=[kappa.lo, kappa.hi])
    return entry


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
        calls_a, calls_b = raters[a].decisions(), raters[b].decisions()
        tables = (pair_table(calls_a[truth], calls_b[truth]), pair_table(calls_a[~truth], calls_b[~truth]))
        delong = None if np.isnan(cov[i, j]) else paired_z(auc, cov, i, j)
        table["comparisons"].append(compare(truth, raters, a, b, (auc[i], auc[j]), delong, tables,
                                            confidence))
    return table


def analyze(truth: np.ndarray, raters: Mapping[str, RaterScores],
            comparisons: Sequence[tuple[str, str]] | None = None,
            subgroups: Mapping[str, np.ndarray] | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """Per-rater AUC (DeLong CI), sensitivity, specificity, accuracy, PPV, NPV (Wilson CIs); per pair
    DeLong's Z and p, McNemar's tests, Cohen's kappa and the first rater's matched operating points
    (:func:`matched_points`); the same for each subgroup value.

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
