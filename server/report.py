"""The federated evaluation's report folder: report.json, report.md in the study's table layout, the
tables as CSV, ROC curves and learning curves as PNG, and report.html (`server.report_html`: report.md and
the figures as one page), written together and atomically.

The tables and ROC figures are `common.stats.report`'s, fed with the federated analysis (which has the
layout of `common.stats.analyze`) and with the cases the pooled histograms stand for.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic import write_files_atomic
from common.protocol import ALL, MODEL
from common.stats.report import comparisons_csv, raters_csv, roc_name, roc_png, to_json, to_markdown
from server.evaluation import SITE_GROUP, expand
from server.privacy import markdown as privacy_markdown
from server.report_html import page

_SPLITS = ("train", "val", "test")


def _exams_per_site(sites: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each site's exams per split (malignant), and the test set's dense and symptomatic."""
    total: dict[str, dict[str, int]] = {}
    for site in sites:
        for split, values in site["counts"].items():
            for key, value in values.items():
                total.setdefault(split, {}).setdefault(key, 0)
                total[split][key] += value

    def row(name: str, counts: Mapping[str, Mapping[str, int]]) -> str:
        zero = dict.fromkeys(("exams", "malignant", "dense", "symptomatic"), 0)
        count = {split: {**zero, **counts.get(split, {})} for split in _SPLITS}
        cells = [f"{count[s]['exams']} ({count[s]['malignant']})" for s in _SPLITS]
        cells += [str(count["test"]["dense"]), str(count["test"]["symptomatic"])]
        return f"| {name} | {' | '.join(cells)} |"

    return ["## Exams per site", "",
            "| Site | Train (malignant) | Validation (malignant) | Test (malignant) | Test dense "
            "| Test symptomatic |", "|---|---|---|---|---|---|",
            *(row(s["site"], s["counts"]) for s in sites), row("**All sites**", total)]


def synthetic_ceiling(data_root: str | Path) -> dict[str, Any] | None:
    """What the data root's `cohort.json` says of a synthetic cohort's ceiling (`fedmammo synth`: each
    site's and the whole cohort's ideal-observer AUC on the test exams), or None: no data root (a deployed
    center sees no site's data), no cohort.json (real data), or one without the ideal observer."""
    if not data_root or not (path := Path(data_root) / "cohort.json").is_file():
        return None
    try:
        cohort = json.loads(path.read_text())
        return {"seed": cohort["seed"], "conspicuity": cohort["conspicuity"],
                "expected_auc": cohort["ideal_observer_auc"],
                "sites": {site["name"]: site["ideal_observer"]["test"] for site in cohort["sites"]},
                ALL: cohort["total"]["ideal_observer"]["test"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _ceiling(ceiling: Mapping[str, Any], evaluation: Mapping[str, Any], sites: Sequence[str]) -> list[str]:
    """The synthetic cohort's ideal observer next to the model, on the same test exams."""
    def auc(entry: Mapping[str, Any] | None) -> str:
        if not entry or entry.get("auc") is None:
            return "n/a"
        ci = entry.get("auc_ci")
        return f"{entry['auc']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")

    def model(table: Mapping[str, Any] | None) -> str:
        rater = (table or {}).get("raters", {}).get(MODEL) or {}
        return auc({"auc": rater.get("auc"), "auc_ci": rater.get("auc_ci")})

    rows = [f"| {site} | {auc(ceiling['sites'].get(site))} "
            f"| {model(evaluation['subgroups'].get(SITE_GROUP.format(site)))} |" for site in sites]
    rows.append(f"| **All sites** | {auc(ceiling[ALL])} | {model(evaluation)} |")
    return ["## The synthetic cohort's ceiling", "",
            f"The sites hold a synthetic cohort (`fedmammo synth`, seed {ceiling['seed']}, conspicuity "
            f"{ceiling['conspicuity']:g}). Its label is carried by one lesion appearance latent, so the "
            "ideal observer, which scores each exam by that latent, is the most any model can reach on "
            f"these test exams ({ceiling['expected_auc']:.3f} expected; the draw of exams moves it).", "",
            "| Site | Ideal observer AUC (95% CI) | Model AUC (95% CI) |", "|---|---|---|", *rows]


def markdown(report: Mapping[str, Any]) -> str:
    run, evaluation = report["run"], report["evaluation"]
    bn = "kept at each site (FedBN)" if run["batchnorm"] == "local" else "averaged"
    lines = ["# Federated evaluation", "",
             f"Run `{run['token']}`: {run['rounds']} rounds of {run['strategy']} over "
             f"{len(report['sites'])} sites, BatchNorm {bn}. Every figure below was computed at the "
             "coordinating center from the sites' histograms, 2×2 tables of paired calls, confusion matrices "
             "and sums; no case left its site. Tables 1–4 follow the study: DeLong's tests of each reader "
             "against the federated model (`model`) overall and by density and symptoms; diagnostic "
             "performance on all test exams with McNemar's tests; Cohen's kappa between raters; the same by "
             "density, symptoms and site. `model-birads` is the model's BI-RADS head read like a "
             "radiologist's BI-RADS (≥ 4 positive), `local-only` each site's model trained on its data "
             "alone. Then the model's matched operating points and its BI-RADS head against the clinical "
             "read.", "",
             *_exams_per_site(report["sites"]), ""]
    lines += to_markdown(evaluation, MODEL).splitlines()[1:]  # without its own document title
    if report.get("ceiling"):
        lines += ["", *_ceiling(report["ceiling"], evaluation, [s["site"] for s in report["sites"]])]
    if evaluation.get("left_out"):
        lines += ["", "Raters not analysed:", *(f"- {r}: {why}" for r, why in evaluation["left_out"].items())]
    if missing := [r for r in report["rounds"] if r.get("missing")]:
        lines += ["", "Sites missing from a round (failed, or no reply within the round's timeout):",
                  *(f"- round {r['round']} {r['phase']}: {r['site']}" for r in missing)]
    if "privacy" in report:
        lines += ["", *privacy_markdown(report["privacy"])]
    return "\n".join(lines) + "\n"


def learning_curves_png(rounds: Sequence[Mapping[str, Any]], ceiling: float | None = None) -> bytes:
    """Training loss per round, and the pooled test AUC (95% CI) at each evaluated round, sites dotted;
    `ceiling`: the pooled ideal observer's AUC of a synthetic cohort, dashed."""
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, auc_ax = fig.subplots(1, 2)
    for phase, ax, key in (("train", loss_ax, "loss"), ("evaluate", auc_ax, "auc")):
        rows = [r for r in rounds if r["phase"] == phase and r.get(key) is not None]
        for site in sorted({r["site"] for r in rows}, key=lambda s: (s != ALL, s)):
            mine = [r for r in rows if r["site"] == site]
            x, y = [r["round"] for r in mine], [r[key] for r in mine]
            pooled = site == ALL
            ax.plot(x, y, marker="o", linewidth=2.2 if pooled else 1, linestyle="-" if pooled else ":",
                    label="pooled" if pooled else site)
            if key == "auc" and pooled and all(r["auc_low"] is not None for r in mine):
                ax.fill_between(x, [r["auc_low"] for r in mine], [r["auc_high"] for r in mine], alpha=0.2)
        if key == "auc" and ceiling is not None:
            ax.axhline(ceiling, color="0.4", linestyle="--", linewidth=1, label="ideal observer (pooled)")
        ax.set(xlabel="round", ylabel="training loss" if key == "loss" else "test AUC (95% CI)")
        ax.legend(fontsize=8, frameon=False)
        ax.grid(color="0.92")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def write_report(folder: Path, report: Mapping[str, Any]) -> Path:
    """Write the report folder; `report["evaluation"]` is `server.evaluation.federated_analysis`'s result."""
    evaluation = report["evaluation"]
    ceiling = ((report.get("ceiling") or {}).get(ALL) or {}).get("auc")
    files = {"report.json": to_json(report).encode(), "report.md": markdown(report).encode(),
             "raters.csv": raters_csv(evaluation).encode(),
             "comparisons.csv": comparisons_csv(evaluation).encode(),
             "learning_curves.png": learning_curves_png(report["rounds"], ceiling)}
    for group, histograms in evaluation["histograms"].items():
        table = evaluation if group == ALL else evaluation["subgroups"][group]
        if any(r["auc"] is not None for r in table["raters"].values()):
            truth, scores = expand(histograms, table["raters"])
            title = f"{'All sites' if group == ALL else group} (n = {table['n_cases']})"
            files[roc_name(group)] = roc_png(truth, scores, table, title)
    files["report.html"] = page(report, files).encode()
    write_files_atomic({folder / name: data for name, data in files.items()})
    return folder
