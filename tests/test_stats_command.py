"""`fedmammo stats`: a reader-study CSV in, the study's tables out; bad input stops cleanly."""

import argparse
import csv
import json
import re

import numpy as np
import pytest

from common.cli import main
from common.stats import RaterScores, ScoreKind, analyze, auc_ci, binary_metrics, delong_test
from common.stats.command import run
from common.stats.report import to_markdown

HEADER = ["case", "pathology", "model", "senior", "junior", "density", "symptoms"]


def write_cases(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_study(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    y[:2], y[2:4] = True, False
    model = np.clip(np.round(50 + 40 * (y - 0.5) + rng.normal(0, 20, n), 1), 0, 100)
    birads = np.array(["2", "3", "4A", "4B", "4C", "5"])
    senior = birads[np.clip(np.round(1.5 + 2 * y + rng.normal(0, 1.2, n)), 0, 5).astype(int)]
    junior = (rng.random(n) < np.where(y, 0.75, 0.3)).astype(int)
    density = rng.choice(list("abcd"), n)
    symptoms = np.where(y, "symptomatic", rng.choice(["symptomatic", "asymptomatic"], n))
    symptoms[5] = ""  # unknown: in no symptoms subgroup
    truth = np.where(y, "malignant", "benign")
    ids = [f"c{i}" for i in range(n)]
    rows = [list(r) for r in zip(ids, truth, model, senior, junior, density, symptoms, strict=True)]
    return y, {"model": model, "senior": senior, "junior": junior}, rows


def args(cases, out, **kw):
    base = dict(cases=str(cases), truth="pathology", rater=None, subgroup=None, threshold=None, compare=None,
                json=str(out), report=None)
    return argparse.Namespace(**(base | kw))


ORDINAL = {"2": 2.0, "3": 3.0, "4A": 4.0, "4B": 4.25, "4C": 4.5, "5": 5.0}


def test_full_study_json_matches_the_api(tmp_path):
    y, scores, rows = make_study()
    cases = write_cases(tmp_path / "cases.csv", rows)
    out = tmp_path / "out.json"
    rc = run(args(cases, out, subgroup=["density", "symptoms"], report=str(tmp_path / "report")))
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["n_cases"] == 120
    assert list(result["raters"]) == ["model", "senior", "junior"]  # every score column, none of the others
    senior = np.array([ORDINAL[s] for s in scores["senior"]])
    numeric = {"model": scores["model"], "senior": senior, "junior": scores["junior"]}
    thresholds = {"model": 50, "senior": 4.0, "junior": 0.5}
    for name, values in numeric.items():
        r = result["raters"][name]
        assert (r["n_pos"], r["n_neg"]) == (int(y.sum()), int((~y).sum()))
        assert [r["auc"], *r["auc_ci"]] == pytest.approx(list(auc_ci(y, values)), abs=1e-12)
        metrics = binary_metrics(y, values >= thresholds[name])
        for key in ("sensitivity", "specificity", "accuracy"):
            assert r[key] == pytest.approx(metrics[key].value)
            assert r[f"{key}_ci"] == pytest.approx([metrics[key].lo, metrics[key].hi])
    assert result["raters"]["senior"]["threshold_label"] == "4"
    pairs = [(c["a"], c["b"]) for c in result["comparisons"]]
    assert pairs == [("model", "senior"), ("model", "junior"), ("senior", "junior")]
    for c in result["comparisons"]:
        z, p = delong_test(y, numeric[c["a"]], numeric[c["b"]])
        assert (c["z"], c["p"]) == pytest.approx((z, p))
        assert c["auc_a"] == result["raters"][c["a"]]["auc"]
    assert sorted(result["subgroups"]) == ["density=dense", "density=non-dense",
                                          "symptoms=asymptomatic", "symptoms=symptomatic"]
    dense = np.isin(np.array([r[5] for r in rows]), ["c", "d"])
    sub = result["subgroups"]["density=dense"]
    assert sub["n_cases"] == dense.sum()
    assert sub["raters"]["model"]["auc"] == pytest.approx(auc_ci(y[dense], scores["model"][dense])[0])
    assert {"raters", "comparisons"} <= sub.keys()
    assert result["subgroups"]["symptoms=symptomatic"]["n_cases"] + \
        result["subgroups"]["symptoms=asymptomatic"]["n_cases"] == 119

    report = tmp_path / "report"
    names = {p.name for p in report.iterdir()}
    assert {"report.md", "raters.csv", "comparisons.csv", "roc.png", "roc_density_dense.png"} <= names
    assert (report / "roc.png").read_bytes().startswith(b"\x89PNG")
    markdown = (report / "report.md").read_text()
    header = ("| Rater | Threshold | Sensitivity (95% CI) | Specificity (95% CI) | Accuracy (95% CI) "
              "| PPV (95% CI) | NPV (95% CI) | AUC (95% CI) |")
    assert header in markdown
    assert "## density=dense" in markdown and "| model vs senior |" in markdown
    table1 = markdown.split("## Table 1.")[1].split("\n## ")[0]
    groups = [line.split(" (n = ")[0].lstrip("| ") for line in table1.splitlines() if " (n = " in line]
    assert groups == ["Total", "Non-dense", "Dense", "Asymptomatic", "Symptomatic"]  # the study's order
    with open(report / "raters.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 * 5  # all cases + 4 subgroups
    assert float(table[0]["auc"]) == pytest.approx(result["raters"]["model"]["auc"])
    with open(report / "comparisons.csv") as f:
        assert len(list(csv.DictReader(f))) == 3 * 5


def test_requested_raters_thresholds_and_comparisons(tmp_path):
    y, scores, rows = make_study()
    cases = write_cases(tmp_path / "cases.csv", rows)
    out = tmp_path / "out.json"
    rc = run(args(cases, out, rater=["model", "senior"], threshold=["senior=4B", "model=30"],
                  compare=["senior:model"]))
    assert rc == 0
    result = json.loads(out.read_text())
    assert list(result["raters"]) == ["model", "senior"]
    assert result["raters"]["senior"]["threshold"] == 4.25
    assert result["raters"]["senior"]["sensitivity"] == pytest.approx(
        np.mean(np.isin(scores["senior"][y], ["4B", "4C", "5"])))
    assert result["raters"]["model"]["sensitivity"] == pytest.approx(np.mean(scores["model"][y] >= 30))
    assert [(c["a"], c["b"]) for c in result["comparisons"]] == [("senior", "model")]


def test_one_class_subgroup_is_not_estimable(tmp_path):
    _, _, rows = make_study()
    cases = write_cases(tmp_path / "cases.csv", rows)
    out = tmp_path / "out.json"
    assert run(args(cases, out, subgroup=["symptoms"], report=str(tmp_path / "r"))) == 0
    result = json.loads(out.read_text())
    benign_only = result["subgroups"]["symptoms=asymptomatic"]  # every malignant case is symptomatic
    assert benign_only["n_pos"] == 0
    model = benign_only["raters"]["model"]
    assert model["auc"] is None and model["auc_ci"] is None and model["sensitivity"] is None
    assert model["note"].startswith("not estimable: no positive cases")
    assert model["specificity"] is not None
    comparison = benign_only["comparisons"][0]
    assert comparison["z"] is None and comparison["p"] is None
    assert comparison["note"].startswith("not estimable")
    assert "n/e" in (tmp_path / "r" / "report.md").read_text()
    assert not (tmp_path / "r" / "roc_symptoms_asymptomatic.png").exists()


def test_truth_as_zero_one_gives_the_same_result(tmp_path):
    _, _, rows = make_study()
    words = write_cases(tmp_path / "words.csv", rows)
    digits = write_cases(tmp_path / "digits.csv", [[r[0], int(r[1] == "malignant"), *r[2:]] for r in rows])
    assert run(args(words, tmp_path / "a.json")) == 0
    assert run(args(digits, tmp_path / "b.json")) == 0
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()


def test_through_the_fedmammo_command_line(tmp_path, capsys):
    _, _, rows = make_study()
    cases = write_cases(tmp_path / "cases.csv", rows)
    rc = main(["stats", str(cases), "--truth", "pathology", "--rater", "model", "--rater", "junior",
               "--subgroup", "density", "--json", str(tmp_path / "out.json")])
    assert rc == 0
    assert set(json.loads((tmp_path / "out.json").read_text())["subgroups"]) == {"density=dense",
                                                                                 "density=non-dense"}


def corrupt(rows, row, column, value):
    rows = [list(r) for r in rows]
    rows[row][HEADER.index(column)] = value
    return rows


@pytest.mark.parametrize(("change", "options", "message"), [
    (None, {"truth": "outcome"}, "truth column 'outcome' not found in .*cases.csv; columns are: case, patho"),
    (None, {"rater": ["model", "reader9"]}, "rater column 'reader9' not found"),
    ((4, "model", "high"), {}, None),  # auto-detection: a column with a word is not a rater ...
    ((4, "model", "high"), {"rater": ["model"]}, "column 'model', line 6: non-numeric score 'high'"),
    ((7, "model", "NaN"), {}, "column 'model', line 9: score 'NaN' is not a finite number"),
    ((7, "model", ""), {}, "column 'model', line 9: missing score"),
    ((9, "senior", "7"), {}, r"column 'senior', line 11: '7' is not a BI-RADS category"),
    ((3, "pathology", "unsure"), {}, "column 'pathology', line 5: truth 'unsure' is not 0/1 or benign/malig"),
    (None, {"subgroup": ["site"]}, "subgroup column 'site' not found"),
    (None, {"threshold": ["model"]}, "--threshold 'model': expected COLUMN=VALUE"),
    (None, {"threshold": ["model=high"]}, "threshold for column 'model': 'high' is not a number"),
    (None, {"threshold": ["case=3"]}, "'case' is not a rater column"),
    (None, {"compare": ["model-senior"]}, "--compare 'model-senior': expected A:B"),
    (None, {"compare": ["model:reader9"]}, "'reader9' is not a rater column"),
])
def test_bad_input_exits_2_with_one_clear_message_and_writes_nothing(tmp_path, capsys, change, options,
                                                                    message):
    _, _, rows = make_study()
    if change:
        rows = corrupt(rows, *change)
    cases = write_cases(tmp_path / "cases.csv", rows)
    out = tmp_path / "out.json"
    out.write_text("previous")
    rc = run(args(cases, out, report=str(tmp_path / "report"), **options))
    if message is None:
        assert rc == 0 and "model" not in json.loads(out.read_text())["raters"]
        return
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmammo stats: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert out.read_text() == "previous"  # untouched
    assert not (tmp_path / "report").exists()


def test_single_class_and_unusable_files(tmp_path, capsys):
    _, _, rows = make_study()
    all_malignant = write_cases(tmp_path / "cases.csv", [[r[0], "malignant", *r[2:]] for r in rows])
    assert run(args(all_malignant, tmp_path / "o.json")) == 2
    err = capsys.readouterr().err
    assert "only one class present in truth column 'pathology' (all 120 cases are malignant" in err
    assert run(args(tmp_path / "missing.csv", tmp_path / "o.json")) == 2
    assert "cannot read" in capsys.readouterr().err
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("pathology,model\n1,30\n0,20,5\n")
    assert run(args(ragged, tmp_path / "o.json")) == 2
    assert "line 3: 3 fields, the header has 2" in capsys.readouterr().err
    wide = write_cases(tmp_path / "wide.csv", [[r[1], float(r[2]) * 10] for r in rows],
                       ["pathology", "score"])
    assert run(args(wide, tmp_path / "o.json")) == 2
    assert "'score': scores outside 0–100 have no default threshold" in capsys.readouterr().err
    assert run(args(wide, tmp_path / "o.json", threshold=["score=500"])) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_analysis_degrades_gracefully_with_one_positive_and_unanimous_readers():
    truth = np.array([True, False, False, False, False])
    raters = {"model": RaterScores(np.array([90.0, 10, 20, 60, 30]), ScoreKind.PERCENT, 50.0),
              "reader": RaterScores(np.array([1.0, 1, 1, 1, 1]), ScoreKind.BINARY, 0.5),
              "other": RaterScores(np.array([1.0, 1, 1, 1, 1]), ScoreKind.BINARY, 0.5)}
    result = analyze(truth, raters)
    model = result["raters"]["model"]
    assert model["auc"] == 1.0 and model["auc_ci"] is None
    assert model["note"] == "AUC 95% CI not estimable: fewer than 2 cases of a class"
    assert result["raters"]["reader"]["note"].endswith("npv not estimable: zero denominator")
    unanimous = result["comparisons"][2]
    assert (unanimous["a"], unanimous["kappa"], unanimous["z"]) == ("reader", None, None)
    assert "kappa not estimable" in unanimous["note"]
    json.dumps(result, allow_nan=False)  # JSON-ready: no NaN anywhere


def test_an_infinite_delong_z_is_null_with_its_note_and_p_zero(tmp_path):
    """A rater ranking every pair right against one ranking every pair wrong: the difference of the AUCs
    (1 and 0) has zero variance, Z is infinite — null in JSON, ±∞ in report.md, p = 0."""
    truth = np.array([True, True, False, False, False])
    raters = {"model": RaterScores(np.array([90.0, 80, 10, 20, 30]), ScoreKind.PERCENT, 50.0),
              "inverse": RaterScores(np.array([10.0, 20, 90, 80, 70]), ScoreKind.PERCENT, 50.0)}
    result = analyze(truth, raters)
    (comparison,) = result["comparisons"]
    assert [comparison[key] for key in ("auc_a", "auc_b", "z", "p")] == [1.0, 0.0, None, 0.0]
    assert "infinite" in comparison["note"]
    json.dumps(result, allow_nan=False)
    assert "| Total (n = 5) | −∞ | <0.001 |" in to_markdown(result, focus="inverse")
