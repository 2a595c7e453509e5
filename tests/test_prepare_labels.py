"""common.labels.read_labels: row-by-row validation of a site's labels CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.labels import LabelsError, read_labels

HEADER = ("patient_id,study_uid,laterality,pathology,birads,density,symptomatic,split,"
          "reader_senior1,reader_junior1")


def _labels(tmp_path: Path, *rows: str, header: str = HEADER, encoding: str = "utf-8") -> Path:
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding=encoding)
    return path


def test_good_rows(tmp_path: Path) -> None:
    path = _labels(tmp_path, "P1,1.2.3,L,malignant,4B,c,1,train,4A,3", "P2,1.2.4,r,Benign,2,A,0,test,2,")
    labels, rejections = read_labels(path)
    assert rejections == []
    assert list(labels) == ["1.2.3_L", "1.2.4_R"]
    first, second = labels["1.2.3_L"], labels["1.2.4_R"]
    assert (first.malignant, first.birads, first.density) == (True, 4, "c")
    assert (first.symptomatic, first.split) == (True, "train")
    assert first.readers == {"reader_senior1": "4A", "reader_junior1": "3"}
    assert (second.laterality, second.malignant, second.density, second.dense) == ("R", False, "a", False)


def test_semicolons_and_byte_order_mark_from_spreadsheets(tmp_path: Path) -> None:
    path = _labels(tmp_path, "P1;1.2.3;L;benign;3;d;0;val;3;4", header=HEADER.replace(",", ";"),
                   encoding="utf-8-sig")
    labels, rejections = read_labels(path)
    assert rejections == [] and labels["1.2.3_L"].split == "val"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (",1.2.3,L,benign,3,c,0,train,,", "column patient_id: empty"),
        ("P1,,L,benign,3,c,0,train,,", "column study_uid: empty"),
        ("P1,1.2.3,B,benign,3,c,0,train,,", "column laterality: 'B' is not one of L, R"),
        ("P1,1.2.3,L,unknown,3,c,0,train,,",
         "column pathology: 'unknown' is not one of benign, malignant or empty"),
        ("P1,1.2.3,L,benign,7,c,0,train,,", "column birads: '7' is not a BI-RADS category 0–6"),
        ("P1,1.2.3,L,benign,4D,c,0,train,,", "column birads: '4D' is not a BI-RADS category 0–6"),
        ("P1,1.2.3,L,benign,3,e,0,train,,", "column density: 'e' is not one of a, b, c, d or empty"),
        ("P1,1.2.3,L,benign,3,c,yes,train,,", "column symptomatic: 'yes' is not one of 0, 1 or empty"),
        ("P1,1.2.3,L,benign,3,c,0,tune,,", "column split: 'tune' is not one of train, val, test"),
    ],
)
def test_bad_row_is_rejected_naming_line_and_column(tmp_path: Path, row: str, message: str) -> None:
    path = _labels(tmp_path, "P0,1.2.0,R,benign,3,c,0,train,,", row)
    labels, rejections = read_labels(path)
    assert list(labels) == ["1.2.0_R"]  # the good row is kept
    assert len(rejections) == 1
    assert rejections[0].source == "labels.csv:3"
    assert rejections[0].reason.startswith(f"invalid label row: {message}")
    assert rejections[0].kind == "invalid label row"


def test_labels_as_datasets_have_them(tmp_path: Path) -> None:
    """Empty pathology, BI-RADS 0, 1 and 6, unknown density and symptoms: complete exams, with only the
    targets they carry (the BI-RADS head's is a 2–5 read)."""
    path = _labels(tmp_path, "P1,1.2.3,L,,0,,,train,,", "P2,1.2.4,R,malignant,6,b,,test,,",
                   "P3,1.2.5,L,benign,1,,1,val,,", "P4,1.2.6,R,,4B,d,0,train,,", "P5,1.2.7,L,,,,,test,,")
    labels, rejections = read_labels(path)
    assert rejections == []
    got = {k: (x.malignant, x.birads, x.birads_target, x.density, x.symptomatic) for k, x in labels.items()}
    assert got == {"1.2.3_L": (None, 0, None, "", None), "1.2.4_R": (True, 6, None, "b", None),
                   "1.2.5_L": (False, 1, None, "", True), "1.2.6_R": (None, 4, 4, "d", False),
                   "1.2.7_L": (None, None, None, "", None)}


def test_duplicate_exam_and_blank_lines(tmp_path: Path) -> None:
    path = _labels(tmp_path, "P1,1.2.3,L,benign,3,c,0,train,,", "", "P1,1.2.3,L,malignant,5,c,0,train,,")
    labels, rejections = read_labels(path)
    assert labels["1.2.3_L"].malignant is False
    assert [(r.source, r.reason) for r in rejections] == [
        ("labels.csv:4", "invalid label row: exam 1.2.3_L is already labelled at labels.csv:2")]


def test_unusable_files_raise(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="cannot read the labels file"):
        read_labels(tmp_path / "labels.csv")
    with pytest.raises(LabelsError, match="empty"):
        read_labels(_labels(tmp_path, header=""))
    with pytest.raises(LabelsError, match=r"missing column\(s\) birads, split"):
        read_labels(_labels(tmp_path, "P1,1.2.3,L,benign,c,0", header="patient_id,study_uid,laterality,"
                                                                       "pathology,density,symptomatic"))
    with pytest.raises(ValueError):  # LabelsError is a ValueError, which the commands report
        read_labels(tmp_path / "missing.csv")
