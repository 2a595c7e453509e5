"""The analysis as the study lays it out: JSON, Markdown and CSV tables and ROC figures, written atomically.

Tables: per rater sensitivity / specificity / accuracy / AUC with 95% CIs; per comparison DeLong's Z and
p (and kappa, McNemar in the CSV); first for all cases, then for each subgroup.
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


def _groups(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [(ALL, result), *result["subgroups"].items()]


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
    if value is None:
        return "n/e"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


def _p(p: float | None) -> str:
    return "n/e" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _num(x: float | None, fmt: str) -> str:
    return "n/e" if x is None else format(x, fmt)


def to_markdown(result: Mapping[str, Any]) -> str:
    """Study-style tables; "n/e" marks a value that the group's cases cannot estimate (see the notes)."""
    lines = ["# Reader-study statistics", ""]
    for group, table in _groups(result):
        title = "All cases" if group == ALL else group
        lines += [f"## {title} (n = {table['n_cases']}: {table['n_pos']} malignant, {table['n_neg']} benign)",
                  "", "| Rater | Threshold | Sensitivity (95% CI) | Specificity (95% CI) | Accuracy (95% CI) "
                  "| AUC (95% CI) |", "|---|---|---|---|---|---|"]
        notes = []
        for name, r in table["raters"].items():
            lines.append(f"| {name} | ≥ {r['threshold_label']} "
                         f"| {_pct(r['sensitivity'], r['sensitivity_ci'])} "
                         f"| {_pct(r['specificity'], r['specificity_ci'])} "
                         f"| {_pct(r['accuracy'], r['accuracy_ci'])} | {_auc(r['auc'], r['auc_ci'])} |")
            notes += [f"{name}: {r['note']}"] if "note" in r else []
        if table["comparisons"]:
            lines += ["", "| Comparison | AUC | DeLong Z | P | Kappa (95% CI) |", "|---|---|---|---|---|"]
            for c in table["comparisons"]:
                kappa = "n/e" if c["kappa"] is None else _auc(c["kappa"], c["kappa_ci"])
                lines.append(f"| {c['a']} vs {c['b']} "
                             f"| {_num(c['auc_a'], '.3f')} vs {_num(c['auc_b'], '.3f')} "
                             f"| {_num(c['z'], '.3f')} | {_p(c['p'])} | {kappa} |")
                notes += [f"{c['a']} vs {c['b']}: {c['note']}"] if "note" in c else []
        lines += ["", *(f"- {n}" for n in notes), *([""] if notes else [])]
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
    """One row per group and compared pair: DeLong, McNemar (sensitivity, specificity, accuracy), kappa."""
    header = ["group", "a", "b", "auc_a", "auc_b", "z", "p"]
    header += [f"mcnemar_{m}_p" for m in ("sensitivity", "specificity", "accuracy")]
    header += ["kappa", "kappa_lo", "kappa_hi", "note"]
    rows = []
    for group, table in _groups(result):
        for c in table["comparisons"]:
            mcnemar = [None if c["mcnemar"][m] is None else c["mcnemar"][m]["p"]
                       for m in ("sensitivity", "specificity", "accuracy")]
            rows.append([group, c["a"], c["b"], c["auc_a"], c["auc_b"], c["z"], c["p"], *mcnemar,
                         c["kappa"], *_ci(c["kappa_ci"]), c.get("note")])
    return _csv(header, rows)


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


