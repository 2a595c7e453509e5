"""common.exams: scanning a site folder and pairing views into exams."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dicom_factory import view_file

from common.dicom import Header
from common.exams import pair_exams, scan_files, site_files
from common.labels import ExamLabel


def _header(study: str, laterality: str, view: str, name: str = "", projection: str | None = None,
            for_processing: bool = False) -> Header:
    return Header(path=Path(f"/site/{name or f'{study}_{laterality}_{view}'}.dcm"), sop_instance_uid=name,
                  study_instance_uid=study, patient_id="P", laterality=laterality, view=view,
                  projection=projection or view, for_processing=for_processing, pixel_spacing=None)


def _label(study: str, laterality: str) -> ExamLabel:
    return ExamLabel("P", study, laterality, False, 3, "c", False, "train")


def _labels(*keys: tuple[str, str]) -> dict[str, ExamLabel]:
    return {label.exam_id: label for label in (_label(*key) for key in keys)}


def _exam_views(study: str, laterality: str) -> list[Header]:
    return [_header(study, laterality, "CC"), _header(study, laterality, "MLO")]


def test_pairs_views_of_labelled_breasts_in_label_order() -> None:
    headers = _exam_views("1", "L") + _exam_views("2", "R") + _exam_views("2", "L")
    exams, rejections = pair_exams(headers, _labels(("2", "R"), ("1", "L")))
    assert [e.exam_id for e in exams] == ["2_R", "1_L"]
    assert (exams[0].cc.name, exams[0].mlo.name, exams[0].contra_cc) == ("2_R_CC.dcm", "2_R_MLO.dcm", None)
    assert rejections == []  # 2_L is the contralateral breast of a labelled one, not an unlabelled image


def test_bilateral_brings_the_other_breast_or_rejects_the_exam() -> None:
    headers = [*_exam_views("1", "L"), *_exam_views("1", "R"), *_exam_views("2", "L"),
               _header("2", "R", "CC")]
    exams, rejections = pair_exams(headers, _labels(("1", "L"), ("2", "L")), bilateral=True)
    assert [e.exam_id for e in exams] == ["1_L"]
    assert [p.name for p in exams[0].paths] == ["1_L_CC.dcm", "1_L_MLO.dcm", "1_R_CC.dcm", "1_R_MLO.dcm"]
    assert [(r.source, r.kind) for r in rejections] == [("2_L", "contralateral views missing")]
    assert "no R MLO" in rejections[0].reason


def test_rejections_of_pairing() -> None:
    headers = [
        *_exam_views("1", "L"),
        _header("2", "L", "CC"),  # no MLO
        *_exam_views("4", "R"),  # nobody labelled study 4
    ]
    exams, rejections = pair_exams(headers, _labels(("1", "L"), ("2", "L"), ("3", "R")))
    assert [e.exam_id for e in exams] == ["1_L"]
    found = sorted((r.source, r.kind) for r in rejections)
    assert found == [("/site/4_R_CC.dcm", "image without label"),
                     ("/site/4_R_MLO.dcm", "image without label"),
                     ("2_L", "incomplete exam"), ("3_R", "label row without images")]


def test_several_images_for_a_view_keep_one_deterministically() -> None:
    headers = [
        _header("1", "L", "CC", "b_cc"),
        _header("1", "L", "CC", "a_cc"),
        _header("1", "L", "CC", "a_xccl", projection="XCCL"),
        _header("1", "L", "MLO", "a_raw", for_processing=True),
        _header("1", "L", "MLO", "b_presentation"),
    ]
    for order in (headers, headers[::-1]):
        exams, rejections = pair_exams(order, _labels(("1", "L")))
        assert (exams[0].cc.name, exams[0].mlo.name) == ("a_cc.dcm", "b_presentation.dcm")
        assert sorted(Path(r.source).name for r in rejections) == ["a_raw.dcm", "a_xccl.dcm", "b_cc.dcm"]
        assert all(r.reason.startswith("several images: ") and "kept /site/" in r.reason for r in rejections)


def test_scan_reads_headers_and_rejects_other_files(tmp_path: Path) -> None:
    good = view_file(tmp_path, "1.2.3", "L", "CC")
    shutil.copy(good, tmp_path / "zz_copy.dcm")  # same SOPInstanceUID, later in path order
    (tmp_path / "labels.csv").write_text("not scanned\n")
    (tmp_path / ".DS_Store").write_text("hidden\n")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "entry.npz").write_bytes(b"skipped folder")
    (tmp_path / "readme.txt").write_text("hello\n")
    os.mkfifo(tmp_path / "pipe")  # would block a reader forever
    headers, rejections = scan_files(site_files(tmp_path, skip=[tmp_path / "cache"]))
    assert [h.path for h in headers] == [good]
    assert sorted((Path(r.source).name, r.kind) for r in rejections) == [
        ("pipe", "unreadable file"), ("readme.txt", "not DICOM"), ("zz_copy.dcm", "duplicate SOPInstanceUID")]
