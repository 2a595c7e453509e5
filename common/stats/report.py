"""The analysis as the study lays it out: JSON, Markdown and CSV tables and ROC figures, written atomically.

Tables in the study's layout: 1, DeLong's Z and p of each comparison in every group; 2, each rater's
sensitivity / specificity / accuracy / PPV / NPV / AUC with 95% CIs and McNemar's tests, all cases;
3, Cohen's kappa of every pair in every group; 4, Table 2 and the comparisons in each subgroup; then the
matched operating points and, where there is one, the model's BI-RADS head against the clinical read.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from common.stats.analysis import subgroup_masks
from common.stats.scores import RaterScores

ALL = "all"  # the group label of the whole case set in CSV rows and figure names


STUDY_ROWS = ("density=non-dense", "density=dense", "symptoms=asymptomatic", "symptoms=symptomatic")
"""The study's subgroup rows, in its order; other groups (sites, other columns) follow in theirs."""


def _groups(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """All cases, then the subgroups in the study's row order."""
    def rank(group: str) -> int:
        return STUDY_ROWS.index(group) if group in STUDY_ROWS else len(STUDY_ROWS)

    return [(ALL, result), *sorted(result["subgroups"].items(), key=lambda item: rank(item[0]))]


def section_title(group: str) -> str:
    """The heading of a group's section in report.md, before its counts (report.html puts the group's ROC
    figure in the section so titled)."""
    return "Table 2. Diagnostic performance, all cases" if group == ALL else group


def roc_name(group: str) -> str:
    """The file name of a group's ROC figure: roc.png for all cases, roc_<group>.png for a subgroup."""
    return "roc.png" if group == ALL else "roc_" + re.sub(r"[^A-Za-z0-9._-]+", "_", group) + ".png"


def to_json(result: Mapping[str, Any]) -> str:
    return json.dumps(result, indent=2, allow_nan=False) + "\n"


def _pct(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "n/e"
    return f"{100 * value:.1f}% ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})"


def _auc(value: float | None, ci: list[float] | None) -> str:
    """An AUC or kappa with its CI, to 3 decimals (a kappa of −0.0004 is 0.000, not −0.000)."""
    if value is None:
        return "n/e"
    lo, hi = (round(x, 3) + 0.0 for x in ci) if ci else (None, None)
    return f"{round(value, 3) + 0.0:.3f}" + (f" ({lo:.3f}–{hi:.3f})" if ci else "")


def _p(p: float | None) -> str:
    return "n/e" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _num(x: float | None, fmt: str) -> str:
    return "n/e" if x is None else format(x, fmt)


_PERFORMANCE = ("| Rater | Threshold | Sensitivity (95% CI) | Specificity (95% CI) | Accuracy (95% CI) "
                "| PPV (95% CI) | NPV (95% CI) | AUC (95% CI) |")
DEFINITIONS = ("Sensitivity is TP / (TP + FN); specificity TN / (TN + FP); accuracy "
               "(TP + TN) / N, which the study's Table 2 gives as accuracy and its abstract calls "
               "\"precision\"; PPV TP / (TP + FP), precision in its usual sense; NPV TN / (TN + FN). "
               "Wilson 95% CIs; AUC with DeLong's 95% CI.")
_MCNEMAR = ("sensitivity", "specificity", "accuracy")
_MATCHED = ("sensitivity_at_specificity", "specificity_at_sensitivity")


def _title(group: str) -> str:
    """A group's row label in the study's layout: Total, Non-dense, Dense, Asymptomatic, Symptomatic."""
    if group == ALL:
        return "Total"
    column, _, value = group.partition("=")
    return value[:1].upper() + value[1:] if column in ("density", "symptoms") else f"{column.title()} {value}"


def _focused(table: Mapping[str, Any], focus: str | None) -> list[Mapping[str, Any]]:
    """The comparisons with the ``focus`` rater (all of them without one)."""
    return [c for c in table["comparisons"] if focus is None or focus in (c["a"], c["b"])]


def _other(c: Mapping[str, Any], focus: str | None) -> str:
    return f"{c['a']} vs {c['b']}" if focus is None else (c["b"] if c["a"] == focus else c["a"])


def _mcnemar(test: Mapping[str, Any] | None) -> str:
    """χ² (continuity corrected) and P, or the exact binomial test's P with its discordant counts."""
    if test is None:
        return "n/e"
    if test["method"] == "chi2":
        return f"χ² {test['statistic']:.2f} (P {_p(test['p'])})"
    return f"exact, b {test['b']} / c {test['c']} (P {_p(test['p'])})"


def _kappa(c: Mapping[str, Any]) -> str:
    return "n/e" if c["kappa"] is None else _auc(c["kappa"], c["kappa_ci"])


def _performance(table: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Each rater's row of Table 2 (and of each subgroup's table), and the notes on what is n/e."""
    lines, notes = [_PERFORMANCE, "|---|---|---|---|---|---|---|---|"], []
    for name, r in table["raters"].items():
        cells = [_pct(r[m], r[f"{m}_ci"]) for m in ("sensitivity", "specificity", "accuracy", "ppv", "npv")]
        cells.append(_auc(r["auc"], r["auc_ci"]))
        lines.append(f"| {name} | ≥ {r['threshold_label']} | {' | '.join(cells)} |")
        notes += [f"{name}: {r['note']}"] if "note" in r else []
    return lines, notes


def _comparisons(table: Mapping[str, Any], focus: str | None) -> tuple[list[str], list[str]]:
    """A group's comparisons: AUCs, DeLong, McNemar's tests and kappa; and the notes on what is n/e."""
    lines = ["| Comparison | AUC | DeLong Z | P | McNemar sensitivity | McNemar specificity "
             "| McNemar accuracy | Kappa (95% CI) |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for c in _focused(table, focus):
        lines.append(f"| {c['a']} vs {c['b']} | {_num(c['auc_a'], '.3f')} vs {_num(c['auc_b'], '.3f')} "
                     f"| {_num(c['z'], '.3f')} | {_p(c['p'])} | "
                     + " | ".join(_mcnemar(c["mcnemar"][m]) for m in _MCNEMAR) + f" | {_kappa(c)} |")
        notes += [f"{c['a']} vs {c['b']}: {c['note']}"] if "note" in c else []
    return lines, notes


def _notes(notes: list[str]) -> list[str]:
    return ["", *(f"- {n}" for n in notes)] if notes else []


def _delong_grid(result: Mapping[str, Any], focus: str | None) -> list[str]:
    """Table 1: DeLong's Z and P of each comparison (a column pair), in every group (a row)."""
    columns = [_other(c, focus) for c in _focused(result, focus)]
    lines = [f"## Table 1. DeLong's test of the AUCs{'' if focus is None else f' against {focus}'}", "",
             f"Z > 0 where {'the first rater' if focus is None else focus}'s AUC is the larger.", "",
             "| Group | " + " | ".join(f"{c} Z | P" for c in columns) + " |",
             "|---|" + "---|---|" * len(columns)]
    for group, table in _groups(result):
        cells = []
        for c in _focused(table, focus):
            sign = -1 if focus is not None and c["b"] == focus else 1  # the focus rater first
            if c["z"] is not None:
                z = f"{sign * c['z']:.3f}"
            else:  # null: not estimable, or infinite (p = 0; `analysis.INFINITE_Z`)
                z = "n/e" if c["p"] is None else ("+∞" if sign * (c["auc_a"] - c["auc_b"]) > 0 else "−∞")
            cells += [z, _p(c["p"])]
        lines.append(f"| {_title(group)} (n = {table['n_cases']}) | {' | '.join(cells)} |")
    return lines


def _agreement(result: Mapping[str, Any]) -> list[str]:
    """Table 3: Cohen's kappa of every pair of raters' calls, in every group."""
    groups = _groups(result)
    lines = ["## Table 3. Agreement of the binary calls: Cohen's kappa (95% CI)", "",
             "| Pair | " + " | ".join(_title(g) for g, _ in groups) + " |", "|---|" + "---|" * len(groups)]
    for i, c in enumerate(result["comparisons"]):
        lines.append(f"| {c['a']} vs {c['b']} | " + " | ".join(_kappa(t["comparisons"][i]) for _, t in groups)
                     + " |")
    return lines


def _point(point: Mapping[str, Any]) -> str:
    where = "no positive call" if point["threshold"] is None else f"≥ {point['threshold_label']}"
    return f"{_pct(point['value'], point['ci'])} at {where} (reaching {100 * point['achieved']:.1f}%)"


def _matched(result: Mapping[str, Any], focus: str | None) -> list[str]:
    """Matched operating points, all cases: the first rater at the other's specificity and sensitivity."""
    lines = ["## Matched operating points (all cases)", "",
             "The first rater's sensitivity at the second's specificity (its lowest threshold that is at "
             "least as specific) and its specificity at the second's sensitivity (its highest threshold that "
             "is at least as sensitive), from each rater's own score distribution (the pooled histograms). "
             "95% Wilson CIs on the counts at that threshold, conditional on it: the threshold is chosen on "
             "the same cases, which the interval does not account for.", "",
             "| Comparison | Specificity of the second | Sensitivity of the first there (95% CI) "
             "| Sensitivity of the second | Specificity of the first there (95% CI) |",
             "|---|---|---|---|---|"]
    for c in _focused(result, focus):
        m = c["matched"]
        if m is None:
            lines.append(f"| {c['a']} vs {c['b']} | n/e | n/e | n/e | n/e |")
            continue
        sens, spec = m["sensitivity_at_specificity"], m["specificity_at_sensitivity"]
        lines.append(f"| {c['a']} vs {c['b']} | {100 * sens['target']:.1f}% | {_point(sens)} "
                     f"| {100 * spec['target']:.1f}% | {_point(spec)} |")
    return lines


def _birads_head(result: Mapping[str, Any]) -> list[str]:
    """An ordinal rater against a reference read: weighted kappa per group, confusion matrices."""
    groups = [(g, t["birads_head"]) for g, t in _groups(result) if t.get("birads_head")]
    if not groups:
        return []
    categories = [f"{c:g}" for c in groups[0][1]["categories"]]
    lines = ["## The model's BI-RADS head against the clinical BI-RADS", "",
             "Its most probable category against the clinical read (BI-RADS 2–5) on the cases that have one: "
             "linearly weighted kappa (95% CI), and the confusion matrices (rows: clinical read; columns: "
             "the head's call).", "", "| Group | n | Weighted kappa (95% CI) |", "|---|---|---|"]
    notes = []
    for group, head in groups:
        kappa = _auc(head["kappa"], head["kappa_ci"])
        lines.append(f"| {_title(group)} | {_num(head['n'], 'd')} | {kappa} |")
        notes += [f"{_title(group)}: {head['note']}"] if "note" in head else []
    header = "| Group | Clinical | " + " | ".join(f"Head {c}" for c in categories) + " |"
    lines += [*_notes(notes), "", header, "|---|---|" + "---|" * len(categories)]
    for group, head in groups:  # pooled and per site
        if head["confusion"] is not None and not group.startswith(("density=", "symptoms=")):
            lines += [f"| {_title(group)} | {c} | " + " | ".join(map(str, row)) + " |"
                      for c, row in zip(categories, head["confusion"], strict=True)]
    return lines


def to_markdown(result: Mapping[str, Any], focus: str | None = None) -> str:
    """The study's tables; ``focus`` (the model) limits Tables 1, 2 and 4's comparisons and the matched
    operating points to those with that rater. "n/e" marks what the cases cannot estimate (see the notes)."""
    performance, notes = _performance(result)
    comparisons, comparison_notes = _comparisons(result, focus)
    lines = ["# Reader-study statistics", "", *_delong_grid(result, focus), "",
             f"## {section_title(ALL)} (n = {result['n_cases']}: {result['n_pos']} "
             f"malignant, {result['n_neg']} benign)", "", *performance, "", DEFINITIONS, "",
             "McNemar's tests of the paired calls: χ² with continuity correction, or the exact binomial test "
             "where fewer than 25 cases are discordant (b: only the first rater right; c: only the second).",
             "", *comparisons, *_notes(notes + comparison_notes), "", *_agreement(result), "",
             "## Table 4. By subgroup", ""]
    for group, table in _groups(result)[1:]:
        performance, notes = _performance(table)
        comparisons, comparison_notes = _comparisons(table, focus)
        counts = f"n = {table['n_cases']}: {table['n_pos']} malignant, {table['n_neg']} benign"
        lines += [f"### {section_title(group)} ({counts})", "", *performance, "", *comparisons,
                  *_notes(notes + comparison_notes), ""]
    lines += [*_matched(result, focus), ""]
    if head := _birads_head(result):
        lines += [*head, ""]
    return "\n".join(lines)


def _csv(header: list[str], rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return out.getvalue()


def _ci(ci: list[float] | None) -> list[float | None]:
    return ci if ci else [None, None]


def raters_csv(result: Mapping[str, Any]) -> str:
    """One row per group and rater; blank cells are not estimable."""
    header = ["group", "rater", "kind", "threshold", "n_pos", "n_neg", "auc", "auc_lo", "auc_hi"]
    for name in ("sensitivity", "specificity", "accuracy", "ppv", "npv"):
        header += [name, f"{name}_lo", f"{name}_hi"]
    rows = []
    for group, table in _groups(result):
        for rater, r in table["raters"].items():
            row = [group, rater, r["kind"], r["threshold_label"], r["n_pos"], r["n_neg"], r["auc"],
                   *_ci(r["auc_ci"])]
            for name in ("sensitivity", "specificity", "accuracy", "ppv", "npv"):
                row += [r[name], *_ci(r[f"{name}_ci"])]
            rows.append([*row, r.get("note")])
    return _csv([*header, "note"], rows)


def comparisons_csv(result: Mapping[str, Any]) -> str:
    """One row per group and compared pair: DeLong; McNemar (sensitivity, specificity, accuracy: statistic,
    p, method); kappa; a's sensitivity at b's specificity and specificity at b's sensitivity."""
    header = ["group", "a", "b", "auc_a", "auc_b", "z", "p"]
    header += [f"mcnemar_{m}_{k}" for m in _MCNEMAR for k in ("statistic", "p", "method")]
    header += ["kappa", "kappa_lo", "kappa_hi"]
    header += [f"{m}_{k}" for m in _MATCHED for k in ("value", "lo", "hi", "threshold")]
    rows = []
    for group, table in _groups(result):
        for c in table["comparisons"]:
            mcnemar = [None if c["mcnemar"][m] is None else c["mcnemar"][m][k]
                       for m in _MCNEMAR for k in ("statistic", "p", "method")]
            matched = [x for m in _MATCHED for x in ([None] * 4 if c["matched"] is None else
                                                      [c["matched"][m]["value"], *c["matched"][m]["ci"],
                                                       c["matched"][m]["threshold"]])]
            rows.append([group, c["a"], c["b"], c["auc_a"], c["auc_b"], c["z"], c["p"], *mcnemar,
                         c["kappa"], *_ci(c["kappa_ci"]), *matched, c.get("note")])
    return _csv([*header, "note"], rows)


def roc_png(truth: np.ndarray, raters: Mapping[str, RaterScores], table: Mapping[str, Any], title: str
            ) -> bytes:
    """ROC curves, one per rater with its AUC (95% CI) in the legend and its operating point marked,
    in the square layout of the study's Fig. 2. Raters whose AUC is not estimable are left out."""
    fig = Figure(figsize=(5.5, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
    for name, rater in raters.items():
        entry = table["raters"][name]
        if entry["auc"] is None:
            continue
        fpr, tpr, _ = roc_curve(truth, rater.scores)
        (line,) = ax.plot(fpr, tpr, linewidth=1.8, label=f"{name}: AUC {_auc(entry['auc'], entry['auc_ci'])}")
        ax.plot(1 - entry["specificity"], entry["sensitivity"], "o", color=line.get_color(), markersize=5)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 − Specificity", ylabel="Sensitivity", title=title,
           aspect="equal")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.grid(color="0.92")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    return buffer.getvalue()


def report_files(result: Mapping[str, Any], truth: np.ndarray, raters: Mapping[str, RaterScores],
                 subgroups: Mapping[str, np.ndarray] | None) -> dict[str, bytes]:
    """The report folder's contents by file name: report.md, raters.csv, comparisons.csv, roc.png and
    roc_<subgroup>.png for each subgroup where some rater's AUC is estimable."""
    files = {"report.md": to_markdown(result).encode(), "raters.csv": raters_csv(result).encode(),
             "comparisons.csv": comparisons_csv(result).encode(),
             "roc.png": roc_png(truth, raters, result, f"All cases (n = {result['n_cases']})")}
    for key, mask in subgroup_masks(subgroups or {}).items():
        table = result["subgroups"][key]
        if any(r["auc"] is not None for r in table["raters"].values()):
            files[roc_name(key)] = roc_png(truth[mask], {r: s.subset(mask) for r, s in raters.items()},
                                           table, f"{key} (n = {table['n_cases']})")
    return files


