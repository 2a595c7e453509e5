"""`fedmammo check`: a site folder with planted bad files; every one reported with its reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import (
    blob,
    label_row,
    mg_dataset,
    save,
    to_stored,
    view_file,
    write_exam,
    write_labels,
    write_site,
)
from pydicom.uid import RLELossless

from common.cli import main


def _config(tmp_path: Path) -> str:
    path = tmp_path / "check.toml"
    path.write_text("[data]\nimage_size = [64, 48]\nworkers = 2\n")
    return str(path)


def _plant(root: Path) -> dict[str, str]:
    """Bad files and rows next to 4 good exams; returns source (relative to root) → expected kind."""
    rows = write_site(root, 4)
    expected = {}

    (root / "junk").mkdir()
    (root / "junk" / "scan.bin").write_bytes(np.random.default_rng(1).bytes(5000))
    expected["junk/scan.bin"] = "not DICOM"
    (root / "notes.dcm").write_text("list of patients to recall\n")
    expected["notes.dcm"] = "not DICOM"
    view_file(root, "9.1", "L", "CC", patient="CT", modality="CT", name="ct.dcm")
    expected["CT/ct.dcm"] = "not MG"
    view_file(root, "9.2", "L", "CC", patient="NOVIEW", view_tag=None, orientation=None, name="a.dcm")
    expected["NOVIEW/a.dcm"] = "no view"
    save(mg_dataset(to_stored(blob()), study="9.3", laterality_tag=None), root / "NOLAT" / "a.dcm")
    expected["NOLAT/a.dcm"] = "no laterality"
    shutil.copy(next((root / "P000").glob("*.dcm")), root / "copies.dcm")
    expected["copies.dcm"] = "duplicate SOPInstanceUID"

    truncated, _ = write_exam(root, "9.4", "L", patient="TRUNC")
    truncated.write_bytes(truncated.read_bytes()[:-1500])
    expected[str(truncated.relative_to(root))] = "pixel data unreadable"
    expected["9.4_L"] = "incomplete exam"
    _, mpeg = write_exam(root, "9.5", "R", patient="MPEG")
    ds = mg_dataset(to_stored(np.zeros((64, 48))), study="9.5", laterality="R", view="MLO")
    ds.compress(RLELossless)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder
    ds.save_as(mpeg, enforce_file_format=True)
    expected[str(mpeg.relative_to(root))] = "codec missing"
    expected["9.5_R"] = "incomplete exam"

    for path in write_exam(root, "9.6", "L", patient="NOLABEL"):
        expected[str(path.relative_to(root))] = "image without label"
    rows += [label_row("9.4", "L", patient="TRUNC"), label_row("9.5", "R", patient="MPEG"),
             label_row("9.7", "L", patient="GONE"), label_row("9.8", "L", birads="7")]
    expected["9.7_L"] = "label row without images"
    expected["labels.csv:9"] = "invalid label row"  # header, 4 good rows, 3 more rows, then this one
    write_labels(root, rows)
    return expected


def test_check_reports_every_planted_problem_and_keeps_the_good_exams(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = tmp_path / "site", tmp_path / "report.json"
    expected = _plant(root)
    assert main(["check", str(root), "--json", str(out), "--config", _config(tmp_path)]) == 0
    data = json.loads(out.read_text())
    assert data["counts"]["exams_usable"] == 4
    assert data["counts"]["exams_labelled"] == 7
    sources = [Path(r["source"]) for r in data["rejections"]]
    found = {str(s.relative_to(root) if s.is_absolute() else s): r["kind"]
             for s, r in zip(sources, data["rejections"], strict=True)}
    assert found == expected
    assert data["splits"]["train"] == {"exams": 2, "benign": 0, "malignant": 2, "no_pathology": 0,
                                       "birads_target": 2, "symptomatic": 1,
                                       "density": {"a": 1, "b": 0, "c": 0, "d": 1, "unknown": 0}}
    stdout = capsys.readouterr().out
    assert "| train | 2 | 0 | 2 | 0 | 2 | 1/0/0/1/0 | 1 |" in stdout
    assert "Exams: 7 labelled, 6 complete (CC + MLO), 4 usable" in stdout
    for kind in set(expected.values()):
        assert f"  {kind}: " in stdout
    assert "warning: split train has 0 benign and 2 malignant exams" in stdout


def test_nothing_usable_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "site"
    (root / "x").mkdir(parents=True)
    (root / "x" / "a.dcm").write_text("not an image")
    write_labels(root, [label_row("1.2.3", "L")])
    assert main(["check", str(root), "--json", str(tmp_path / "r.json"), "--config", _config(tmp_path)]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["exams_usable"] == 0
    assert "no usable exam" in capsys.readouterr().err


def test_unusable_folder_or_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    view_file(tmp_path, "1.2.3", "L", "CC")
    assert main(["check", str(tmp_path)]) == 1  # no labels.csv: studies to score, here none complete
    assert "no labels.csv: exams are scored, not trained on or evaluated" in capsys.readouterr().out
    (tmp_path / "labels.csv").write_bytes(b"\xff\xfe\x00 not text")
    assert main(["check", str(tmp_path)]) == 2
    assert "labels.csv: cannot read the labels file" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[data]\nimage_sise = [64, 48]\n")
    assert main(["check", str(tmp_path), "--config", str(bad)]) == 2
    assert "unknown key(s) image_sise" in capsys.readouterr().err
