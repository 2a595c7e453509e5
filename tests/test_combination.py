"""Combination exams as hospitals store them: acquired and generated 2D views (Image Type value 4
GENERATED_2D, e.g. C-View) of the same breast and projection, the tomosynthesis, CAD results and
presentation states in the same folders. The acquired view is kept by default, `[data] generated_2d`
prefers or uses only the generated one; the other objects are skipped with their kind; check counts what
was chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import (
    BASIC_TEXT_SR,
    BREAST_PROJECTION,
    GSPS,
    MAMMOGRAPHY_CAD_SR,
    TOMOSYNTHESIS,
    combination_study,
    label_row,
    save,
    study_object,
    uid,
    view_file,
    views_array,
    write_labels,
)

from client.prepare import prepare_site
from common.cli import main
from common.config import config_from_dict
from common.dicom import DicomError, read_header, read_view
from common.exams import pair_exams, scan_files, site_files
from common.labels import ExamLabel, read_labels
from common.manifest import Listed
from common.preprocess import preprocess_view

SIZE = (64, 48)


def _config(generated_2d: str = "avoid") -> dict[str, dict[str, object]]:
    return {"data": {"image_size": list(SIZE), "workers": 1, "generated_2d": generated_2d}}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """Two labelled breasts, each a whole combination study; a third whose study has no acquired 2D."""
    root = tmp_path / "site"
    studies = {}
    rows = []
    for i, laterality in enumerate("LR"):
        study, patient = uid("combo", i), f"P{i}"
        studies[f"{study}_{laterality}"] = combination_study(root, study, laterality, patient=patient, seed=i)
        rows.append(label_row(study, laterality, patient=patient, malignant=i == 0))
    study = uid("combo", "cview only")
    studies[f"{study}_L"] = combination_study(root, study, "L", patient="P9", acquired=False)
    rows.append(label_row(study, "L", patient="P9"))
    write_labels(root, rows)
    return root, studies


Site = tuple[Path, dict[str, dict[str, list[Path]]]]


def test_headers_say_generated_and_name_the_other_objects(tmp_path: Path, site: Site) -> None:
    _, studies = site
    paths = next(iter(studies.values()))
    generated = [read_header(p).generated for p in paths["acquired"] + paths["generated"]]
    assert generated == [False, False, True, True]
    listed = Listed("CASE 1", "L", "CC")
    assert read_header(paths["generated"][0], listed).generated  # a manifest's image keeps its Image Type
    assert not read_header(paths["acquired"][0], listed).generated

    expected = {TOMOSYNTHESIS: "tomosynthesis", BREAST_PROJECTION: "tomosynthesis", MAMMOGRAPHY_CAD_SR:
                "CAD result", BASIC_TEXT_SR: "structured report", GSPS: "presentation state"}
    for sop_class, kind in expected.items():
        path = save(study_object(sop_class, study="1.2.3.4"), tmp_path / f"{sop_class}.dcm")
        with pytest.raises(DicomError) as caught:
            read_header(path)
        assert caught.value.reason.partition(":")[0] == kind, caught.value.reason
    ct = view_file(tmp_path, "1.2.3.5", "L", "CC", modality="CT", name="ct.dcm")
    with pytest.raises(DicomError, match="not MG"):
        read_header(ct)


@pytest.mark.parametrize("generated_2d", ["avoid", "prefer", "only"])
def test_generated_2d_setting_chooses_the_view(site: Site,
                                               generated_2d: str) -> None:
    root, studies = site
    headers, rejections = scan_files(site_files(root))
    kinds = {r.source: r.kind for r in rejections}
    for paths in studies.values():
        assert kinds[str(paths["tomosynthesis"][0])] == "tomosynthesis"
        assert kinds[str(paths["cad"][0])] == "CAD result"
        assert kinds[str(paths["presentation state"][0])] == "presentation state"
    exams, rejected = pair_exams(headers, _labels(root), generated_2d=generated_2d)
    by_exam = {exam.exam_id: [exam.cc, exam.mlo] for exam in exams}
    reasons = {r.source: r.reason for r in rejected}
    combined, cview_only = list(studies)[:2], list(studies)[2]
    keep = "acquired" if generated_2d == "avoid" else "generated"
    other = "generated" if keep == "acquired" else "acquired"
    for key in combined:
        assert by_exam[key] == studies[key][keep]
        for path in studies[key][other]:
            if generated_2d == "only":
                assert reasons[str(path)].startswith("acquired 2D view: generated_2d = only")
            else:
                assert reasons[str(path)].startswith("several images: ")
                assert f"({keep} 2D) over this {other} 2D image" in reasons[str(path)]
    assert by_exam[cview_only] == studies[cview_only]["generated"]  # C-View alone: used whatever the setting


def _labels(root: Path) -> dict[str, ExamLabel]:
    labels, problems = read_labels(root / "labels.csv")
    assert problems == []
    return labels


def test_only_generated_leaves_an_acquired_only_exam_incomplete(tmp_path: Path) -> None:
    root = tmp_path / "site"
    study = uid("acquired only")
    combination_study(root, study, "L", generated=False)
    write_labels(root, [label_row(study, "L")])
    headers, _ = scan_files(site_files(root))
    exams, rejected = pair_exams(headers, _labels(root), generated_2d="only")
    assert exams == []
    reason = {r.source: r.reason for r in rejected}[f"{study}_L"]
    assert reason.startswith("incomplete exam: no CC or MLO view (has none)")
    assert reason.endswith("its acquired CC and MLO rejected: generated_2d = only")
    with pytest.raises(ValueError, match="expected one of avoid, prefer, only"):
        config_from_dict({"data": {"generated_2d": "yes"}})


@pytest.mark.parametrize("generated_2d", ["avoid", "prefer"])
def test_prepare_and_check_count_what_was_chosen(site: Site,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 generated_2d: str) -> None:
    root, studies = site
    prepared = prepare_site(root, config_from_dict(_config(generated_2d)), progress=False)
    assert prepared.counts["exams_usable"] == 3
    acquired = 4 if generated_2d == "avoid" else 0
    assert (prepared.counts["views_acquired"], prepared.counts["views_generated"]) == (acquired, 6 - acquired)
    first = next(iter(studies))
    kept = studies[first]["acquired" if generated_2d == "avoid" else "generated"][0]
    expected = preprocess_view(read_view(kept).pixels, SIZE).astype(np.float16)
    np.testing.assert_array_equal(views_array(prepared)[prepared.exam_ids.index(first), 0], expected)

    config = tmp_path / "check.toml"
    config.write_text(f'[data]\nimage_size = [64, 48]\nworkers = 1\ngenerated_2d = "{generated_2d}"\n')
    assert main(["check", str(root), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"Views of usable exams: {acquired} acquired 2D, {6 - acquired} generated 2D" in out
    for kind in ("tomosynthesis: 3", "CAD result: 3", "presentation state: 3", "several images: 4"):
        assert f"  {kind}\n" in out
