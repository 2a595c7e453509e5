"""Score kinds, BI-RADS ordinal scale, thresholds and the fixed grids."""

import numpy as np
import pytest

from common.stats import GRIDS, ScoreKind, StatsInputError
from common.stats.scores import default_threshold, format_score, infer_kind, parse_scores, parse_threshold


def parse(*texts):
    return parse_scores(list(texts), "r", list(range(2, 2 + len(texts))))


def test_kinds_and_default_thresholds():
    assert parse("0", "1", "1")[1] is ScoreKind.BINARY
    assert parse("2", "3", "5", "4")[1] is ScoreKind.BIRADS  # a plain 2–5 column
    assert parse("0.1", "0.93")[1] is ScoreKind.PROBABILITY
    assert parse("12.5", "87")[1] is ScoreKind.PERCENT
    assert parse("-3", "250")[1] is ScoreKind.CONTINUOUS
    assert [default_threshold(k) for k in ScoreKind] == [0.5, 4.0, 0.5, 50.0, None]
    assert infer_kind(np.array([0.0, 0.0])) is ScoreKind.BINARY


def test_birads_scale_orders_subcategories_and_threshold_four_means_4a_and_above():
    values, kind = parse("2", "3", "4a", "4B", "4C", "5", "4")
    assert kind is ScoreKind.BIRADS
    assert list(values) == [2, 3, 4, 4.25, 4.5, 5, 4]
    threshold = parse_threshold("4", kind, "r")
    assert list(values >= threshold) == [False, False, True, True, True, True, True]
    assert parse_threshold("4C", kind, "r") == 4.5
    assert [format_score(v, kind) for v in (4.0, 4.25, 5.0)] == ["4", "4B", "5"]
    assert format_score(37.5, ScoreKind.PERCENT) == "37.5"


@pytest.mark.parametrize(("texts", "message"), [
    (("2", "4A", "0"), "line 4: '0' is not a BI-RADS category"),
    (("12", "high"), "line 3: non-numeric score 'high'"),
    (("12", " "), "line 3: missing score"),
    (("inf", "3"), "line 2: score 'inf' is not a finite number"),
])
def test_parse_errors_name_column_and_line(texts, message):
    with pytest.raises(StatsInputError, match=f"column 'r', {message}"):
        parse(*texts)


def test_grids_round_and_reject_off_grid_scores():
    percent = GRIDS[ScoreKind.PERCENT]
    cells = percent.cells(np.array([0.0, 37.24, 37.26, 99.96, 100.0]), "m")
    assert list(percent.values[cells]) == [0.0, 37.2, 37.3, 100.0, 100.0]
    assert list(GRIDS[ScoreKind.BIRADS].cells(np.array([2.0, 4.25, 6.0]), "s")) == [1, 4, 7]
    with pytest.raises(StatsInputError, match=r"score -1\.0 at index 0 is not on the percent grid"):
        percent.cells(np.array([-1.0]), "m")
    with pytest.raises(StatsInputError, match="score nan at index 1"):
        GRIDS[ScoreKind.BINARY].cells(np.array([0.0, np.nan]), "j")
