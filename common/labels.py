"""A site's labels CSV: one row per exam (one breast of one study).

Required columns: patient_id, study_uid (the exam key: a StudyInstanceUID, or any text that images.csv
uses), laterality (L/R), pathology, birads, density, symptomatic, split (train/val/test).
Labels as datasets have them: `pathology` benign/malignant or empty (no reference standard); `birads`
0–6 as read clinically (4A/4B/4C count as 4) or empty; `density` a–d or empty; `symptomatic` 0/1 or empty.
What each target trains and is evaluated on (`ExamLabel.malignant`, `ExamLabel.birads_target`):
- the malignancy head only on exams with a pathology;
- the BI-RADS head only on reads 2–5, its four classes. 0 (incomplete: more imaging needed) is no
  assessment; 1 (negative) has no class (taking it as 2, "benign finding", would teach the head a finding
  where there is none); 6 (known biopsy-proven cancer) restates the pathology. All three are kept as read
  (counted, reported) but train and score nothing.
An exam with neither target is still a complete exam: counted, scored, and evaluated where truth exists.
Any further column is a reader's read of the exam (BI-RADS 2–5 with 4A/4B/4C, 0/1 or a 0–100 score),
kept as text and analysed by `common.stats`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from common.rejection import Rejection

REQUIRED_COLUMNS = (
    "patient_id", "study_uid", "laterality", "pathology", "birads", "density", "symptomatic", "split",
)
SPLITS = ("train", "val", "test")
DENSE = ("c", "d")
"""BI-RADS densities the study counts as dense breasts."""


def exam_id(study_uid: str, laterality: str) -> str:
    """The key of one breast of one study, the unit that is labelled, trained on and scored."""
    return f"{study_uid}_{laterality}"


BIRADS_TARGETS = (2, 3, 4, 5)
"""BI-RADS reads that train and score the model's BI-RADS head (its classes; see the module docstring)."""


@dataclass(frozen=True)
class ExamLabel:
    patient_id: str
    study_uid: str
    laterality: str
    malignant: bool | None
    """The reference standard; None where the exam has no pathology."""
    birads: int | None
    """The clinical read, 0–6; None where there is none."""
    density: str
    """a–d, or "" where unknown."""
    symptomatic: bool | None
    split: str
    readers: dict[str, str] = field(default_factory=dict)

    @property
    def exam_id(self) -> str:
        return exam_id(self.study_uid, self.laterality)

    @property
    def birads_target(self) -> int | None:
        """The BI-RADS head's target: the read when it is 2–5, else None."""
        return self.birads if self.birads in BIRADS_TARGETS else None

    @property
    def dense(self) -> bool:
        """BI-RADS density c/d, as the study splits its subgroups."""
        return self.density in DENSE


class LabelsError(ValueError):
    """labels.csv as a whole cannot be used (missing, unreadable, required columns absent)."""


_CHOICES = {
    "laterality": ("L", "R"),
    "pathology": ("benign", "malignant", ""),
    "density": ("a", "b", "c", "d", ""),
    "symptomatic": ("0", "1", ""),
    "split": SPLITS,
}
"""Allowed values; "" is an empty cell (unknown)."""
_BIRADS = {"0": 0, "1": 1, "2": 2, "3": 3, "4": 4, "4A": 4, "4B": 4, "4C": 4, "5": 5, "6": 6}


def _parse_row(row: dict[str, str], readers: list[str]) -> ExamLabel:
    """One row as an ExamLabel; ValueError names the first bad column."""
    values = {column: (row.get(column) or "").strip() for column in REQUIRED_COLUMNS}
    for column in ("patient_id", "study_uid"):
        if not values[column]:
            raise ValueError(f"column {column}: empty")
    for column, choices in _CHOICES.items():
        value = values[column].upper() if column == "laterality" else values[column].lower()
        if value not in choices:
            allowed = ", ".join(c for c in choices if c) + (" or empty" if "" in choices else "")
            raise ValueError(f"column {column}: {values[column]!r} is not one of {allowed}")
        values[column] = value
    birads = _BIRADS.get(values["birads"].upper()) if values["birads"] else None
    if values["birads"] and birads is None:
        raise ValueError(f"column birads: {values['birads']!r} is not a BI-RADS category 0–6 (4A/4B/4C) "
                         "or empty")
    pathology, symptomatic = values["pathology"], values["symptomatic"]
    return ExamLabel(
        patient_id=values["patient_id"],
        study_uid=values["study_uid"],
        laterality=values["laterality"],
        malignant=None if not pathology else pathology == "malignant",
        birads=birads,
        density=values["density"],
        symptomatic=None if not symptomatic else symptomatic == "1",
        split=values["split"],
        readers={name: (row.get(name) or "").strip() for name in readers},
    )


def read_labels(path: str | Path) -> tuple[dict[str, ExamLabel], list[Rejection]]:
    """Read a site's labels CSV, row by row: every bad row becomes a rejection naming `labels.csv:LINE` and
    the column, and the rest are kept. Comma-, semicolon- or tab-separated (spreadsheet exports), UTF-8
    with or without a byte-order mark. Raises LabelsError when the file as a whole is unusable."""

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{path}: cannot read the labels file: {exc}") from exc
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise LabelsError(f"{path}: empty; its first line must name the columns "
                          f"{', '.join(REQUIRED_COLUMNS)}")
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(lines[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise LabelsError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(columns)})")
    readers = [c for c in columns if c and c not in REQUIRED_COLUMNS]

    labels: dict[str, ExamLabel] = {}
    lines_of: dict[str, int] = {}
    rejections = []
    for row in reader:
        where = f"{path.name}:{reader.line_num}"
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        try:
            label = _parse_row(row, readers)
        except ValueError as exc:
            rejections.append(Rejection(where, f"invalid label row: {exc}"))
            continue
        if label.exam_id in labels:
            rejections.append(Rejection(where, f"invalid label row: exam {label.exam_id} is already labelled "
                                               f"at {path.name}:{lines_of[label.exam_id]}"))
            continue
        labels[label.exam_id] = label
        lines_of[label.exam_id] = reader.line_num
    return labels, rejections
