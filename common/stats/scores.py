"""Rater scores: which kind a column holds, its default threshold, and the fixed grid federated sums use.

A rater's scores may be binary decisions (0/1), BI-RADS assessment categories, or continuous scores
(the model's 0–100 score, or a probability). BI-RADS categories are placed on an ordinal scale on which
the subdivisions of 4 sit between 4 and 5 (4A = 4, 4B = 4.25, 4C = 4.5), so a plain 2–5 column and a
subdivided one share thresholds: "4" means 4A and above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from common.stats._validation import StatsInputError


class ScoreKind(StrEnum):
    BINARY = "binary"  # decisions 0/1
    BIRADS = "birads"  # BI-RADS categories, ordinal
    PROBABILITY = "probability"  # continuous within [0, 1]
    PERCENT = "percent"  # continuous within [0, 100], the model's score
    CONTINUOUS = "continuous"  # any other range: no default threshold and no federated grid


BIRADS_SCALE = {"1": 1.0, "2": 2.0, "3": 3.0, "4": 4.0, "4A": 4.0, "4B": 4.25, "4C": 4.5, "5": 5.0, "6": 6.0}
_BIRADS_LABEL = {value: label for label, value in BIRADS_SCALE.items() if label != "4A"}
_DEFAULT_THRESHOLD = {ScoreKind.BINARY: 0.5, ScoreKind.BIRADS: 4.0, ScoreKind.PROBABILITY: 0.5,
                      ScoreKind.PERCENT: 50.0}


def infer_kind(values: np.ndarray) -> ScoreKind:
    """Kind of a numeric column: {0,1} binary; whole numbers 1–6 BI-RADS; else by range."""
    if np.isin(values, (0.0, 1.0)).all():
        return ScoreKind.BINARY
    if np.isin(values, (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)).all():
        return ScoreKind.BIRADS
    if values.min() >= 0 and values.max() <= 1:
        return ScoreKind.PROBABILITY
    if values.min() >= 0 and values.max() <= 100:
        return ScoreKind.PERCENT
    return ScoreKind.CONTINUOUS


def _birads_value(text: str) -> float | None:
    value = BIRADS_SCALE.get(text.strip().upper())
    if value is None:
        try:
            number = float(text)
        except ValueError:
            return None
        value = number if number in _BIRADS_LABEL else None
    return value


def looks_like_score(text: str) -> bool:
    """Whether a CSV entry could be a score: a number (NaN included, it is reported later) or a BI-RADS
    category."""
    try:
        float(text)
    except ValueError:
        return _birads_value(text) is not None
    return True


def parse_scores(texts: Sequence[str], column: str, lines: Sequence[int]) -> tuple[np.ndarray, ScoreKind]:
    """Parse a CSV column of scores; ``lines`` are the file lines of the entries, for the error message.

    Numbers give a kind by :func:`infer_kind`; a column holding BI-RADS subcategories (4A, 4B, 4C) is
    BI-RADS and every entry must then be a BI-RADS category.
    """
    values = np.empty(len(texts))
    words = []
    for i, (text, line) in enumerate(zip(texts, lines, strict=True)):
        if not text.strip():
            raise StatsInputError(f"column {column!r}, line {line}: missing score")
        try:
            values[i] = float(text)
        except ValueError:
            words.append(i)
            continue
        if not np.isfinite(values[i]):
            raise StatsInputError(f"column {column!r}, line {line}: score {text!r} is not a finite number")
    if not words:
        return values, infer_kind(values)
    if _birads_value(texts[words[0]]) is None:
        raise StatsInputError(f"column {column!r}, line {lines[words[0]]}: non-numeric score "
                              f"{texts[words[0]]!r}")
    for i, (text, line) in enumerate(zip(texts, lines, strict=True)):
        value = _birads_value(text)
        if value is None:
            raise StatsInputError(f"column {column!r}, line {line}: {text!r} is not a BI-RADS category "
                                  f"({', '.join(BIRADS_SCALE)}) although the column holds BI-RADS categories")
        values[i] = value
    return values, ScoreKind.BIRADS


def default_threshold(kind: ScoreKind) -> float | None:
    """0.5 for 0/1 and probabilities, BI-RADS 4 (4A and above), 50 for 0–100; none for other ranges."""
    return _DEFAULT_THRESHOLD.get(kind)


def parse_threshold(text: str, kind: ScoreKind, column: str) -> float:
    """A threshold as typed by a user: a number, or for BI-RADS columns also a category such as 4B."""
    value = _birads_value(text) if kind is ScoreKind.BIRADS else None
    if value is None:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
    if not np.isfinite(value):
        raise StatsInputError(f"threshold for column {column!r}: {text!r} is not a number"
                              + (" or BI-RADS category" if kind is ScoreKind.BIRADS else ""))
    return value


def format_score(value: float, kind: ScoreKind) -> str:
    """A score or threshold as a reader would write it: BI-RADS 4.25 is "4B"."""
    if kind is ScoreKind.BIRADS and value in _BIRADS_LABEL:
        return _BIRADS_LABEL[value]
    return f"{value:g}"


@dataclass(frozen=True, eq=False)
class Grid:
    """A fixed, agreed set of score values. On it per-class histograms are exact sufficient statistics
    for the AUC and its DeLong variance, because ties and order are all a histogram has to keep.

    Uniform grids (``decimals`` set) round scores to that many decimals; categorical ones require each
    score to be one of ``values``.
    """

    name: str
    values: np.ndarray
    decimals: int | None = None

    def cells(self, scores: np.ndarray, rater: str) -> np.ndarray:
        """Index of each score's grid cell; raises naming the rater and index of a score off the grid."""
        if self.decimals is not None:
            cells = np.rint(scores * 10.0**self.decimals)
            bad = ~((cells >= 0) & (cells < len(self.values)))
        else:
            cells = np.minimum(np.searchsorted(self.values, scores), len(self.values) - 1)
            bad = self.values[cells] != scores
        if bad.any():
            i = int(np.argmax(bad))
            raise StatsInputError(f"rater {rater!r}: score {scores[i]} at index {i} is not on the "
                                  f"{self.name} grid ({self.values[0]:g}–{self.values[-1]:g})")
        return cells.astype(np.intp)


GRIDS = {
    ScoreKind.BINARY: Grid("binary", np.array([0.0, 1.0])),
    ScoreKind.BIRADS: Grid("birads", np.array(sorted(set(BIRADS_SCALE.values())))),
    ScoreKind.PROBABILITY: Grid("probability", np.arange(1001) / 1000, decimals=3),
    ScoreKind.PERCENT: Grid("percent", np.arange(1001) / 10, decimals=1),
}


@dataclass(frozen=True, eq=False)
class RaterScores:
    """One rater's scores on the cases, their kind, and the threshold at or above which a case is
    called positive (malignant)."""

    scores: np.ndarray
    kind: ScoreKind
    threshold: float

    def decisions(self) -> np.ndarray:
        return self.scores >= self.threshold

    def subset(self, mask: np.ndarray) -> RaterScores:
        return RaterScores(self.scores[mask], self.kind, self.threshold)
