"""A labels CSV with random bad rows (hypothesis): every row ends as a label or as one rejection naming
its line, and nothing raises. Each rule on its own is tested in test_prepare_labels.py."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from common.labels import REQUIRED_COLUMNS, read_labels

GOOD = {"patient_id": "P", "study_uid": "1.2.3", "laterality": "L", "pathology": "benign", "birads": "3",
        "density": "b", "symptomatic": "0", "split": "train"}
ODD = st.one_of(st.sampled_from(["", " ", "4D", "0", "6", "X", "nan", "benign;malignant", '"', "\x00", "é"]),
                st.text(max_size=12))


@st.composite
def rows(draw: st.DrawFn) -> list[dict[str, str]]:
    out = []
    for i in range(draw(st.integers(1, 12))):
        row = {**GOOD, "study_uid": f"1.2.{i}", "reader_1": draw(st.sampled_from(["", "3", "4A", "x"]))}
        for column in draw(st.sets(st.sampled_from(REQUIRED_COLUMNS), max_size=3)):
            row[column] = draw(ODD)
        out.append(row)
    return out


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(rows())
def test_every_row_is_a_label_or_a_rejection_naming_its_line(table: list[dict[str, str]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, [*REQUIRED_COLUMNS, "reader_1"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "labels.csv"
        path.write_text(text.getvalue(), encoding="utf-8")
        labels, rejections = read_labels(path)
        reread = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    blank = sum(not any(v.strip() for v in row.values() if isinstance(v, str)) for row in reread)
    assert len(labels) + len(rejections) + blank == len(reread)
    for rejection in rejections:
        assert rejection.source.startswith("labels.csv:") and rejection.kind == "invalid label row"
        assert int(rejection.source.partition(":")[2]) >= 2  # a data line, after the header
