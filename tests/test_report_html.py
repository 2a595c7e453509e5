"""report.html: report.md and the figures as one self-contained page, checked in a real browser.

The report here is written by the center's code (`federated_analysis`, `write_report`) from three sites'
prediction files read by the sites' code (`read_cases`, `histograms`), with site and reader names that are
markup; test_federation_app checks the report of a whole run the same way.
"""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from browser_support import CHROMIUM, NO_CHROMIUM, check_report_page, load

from client.site_stats import CASE_COLUMNS, histograms, read_cases
from common.protocol import ALL, MODEL, to_json
from server.evaluation import federated_analysis
from server.report import write_report

SITES = ("site1_helion", "site2_<script>alert(1)</script>", "site3 & <b>kestrel</b>")
READERS = ("reader_<img src=x onerror=alert(1)>", "reader_![t](https://example.org/t.png)")


def _site(folder: Path, site: str, rng: np.random.Generator) -> dict:
    """One site's evaluation summary (exchange 1) from a prediction file of 16 test exams."""
    malignant = rng.random(16) < 0.4
    malignant[:2], malignant[2:4] = True, False
    path = folder / f"{len(list(folder.iterdir()))}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CASE_COLUMNS, MODEL, *READERS])
        for k, m in enumerate(malignant):
            writer.writerow([f"exam{k}", int(m), "abcd"[k % 4], int(k % 3 == 0), 3,
                             f"{np.clip(50 + 40 * (m - 0.5) + rng.normal(0, 20), 0, 100):.1f}",
                             *(int(rng.integers(2, 5)) + int(m) for _ in READERS)])
    cases = read_cases(path, 50.0)
    counts = {"test": {"exams": 16, "malignant": int(malignant.sum()), "dense": 8, "symptomatic": 6}}
    return json.loads(to_json({  # as it reaches the center
        "site": site, "loss": 0.5, "birads_accuracy": 0.5, "skipped": cases.skipped, "counts": counts,
        "raters": {name: {"kind": r.kind, "threshold": r.threshold} for name, r in cases.raters.items()},
        "groups": histograms(cases)}))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report-html")
    (folder / "sites").mkdir()
    rng = np.random.default_rng(0)
    summaries = [_site(folder / "sites", site, rng) for site in SITES]
    rounds = [{"round": r, "phase": phase, "site": ALL, "loss": 1 / r, "auc": 0.5 + r / 10,
               "auc_low": 0.4 + r / 10, "auc_high": 0.6 + r / 10}
              for r in (1, 2) for phase in ("train", "evaluate")]
    run = {"token": "20261203-000000-abcdef", "rounds": 2, "strategy": "fedavg", "batchnorm": "average",
           "run-config": {"num-server-rounds": 2, "data-root": "/data/<sites>"},
           "config": {"train": {"batch_size": 4, "lr": 1e-4, "precision": None}}}
    return write_report(folder / "report", {
        "run": run, "sites": summaries, "evaluation": federated_analysis(summaries, None), "rounds": rounds,
        "privacy": {"central": {"mode": "none"}, "local": {"dp_sgd": False}}})


def test_report_html_is_report_md_with_its_figures_and_the_runs_settings(report):
    text = (report / "report.html").read_text()
    assert re.search(r"<(script|iframe|object|embed|link|base|form|img(?! src=\"data:))\b", text) is None
    assert re.search(r'(src|href)="(?!data:image/png;base64,|#)', text) is None  # nothing to fetch
    assert html.escape(SITES[1]) in text and html.escape(READERS[1]) in text
    headings = [line.lstrip("# ") for line in (report / "report.md").read_text().splitlines()
                if line.startswith("#")]
    assert len(headings) > 10 and all(f">{html.escape(heading)}</h" in text for heading in headings)
    assert text.count('<img src="data:image/png;base64,') == len(list(report.glob("*.png")))
    assert "<dd>/data/&lt;sites&gt;</dd>" in text and "<dt>precision</dt><dd>—</dd>" in text  # the settings
    assert text.count('class="ne"') > 1 and "not estimable" in text  # n/e explained


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_in_a_browser_the_names_show_as_text_and_nothing_runs_or_loads(report):
    page = check_report_page(report)
    for name in (*SITES, *READERS):
        assert name in page.value["text"]


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_the_browser_check_sees_scripts_errors_and_requests(tmp_path):
    """What check_report_page refuses, `load` reports: a blocked script, an uncaught error, a fetch."""
    (tmp_path / "bad.html").write_text(
        "<!DOCTYPE html><meta http-equiv='Content-Security-Policy' content=\"script-src 'none'\">"
        "<img src='http://127.0.0.1:9/x.png'><script>undefined_function()</script>")
    (tmp_path / "error.html").write_text("<!DOCTYPE html><script>undefined_function()</script>")
    blocked, error = (load(tmp_path / name, "document.images.length") for name in ("bad.html", "error.html"))
    assert any("Content Security Policy" in e for e in blocked.errors)
    assert "http://127.0.0.1:9/x.png" in blocked.requests and blocked.value == 1
    assert any("undefined_function is not defined" in e for e in error.errors)
