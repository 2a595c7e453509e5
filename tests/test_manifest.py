"""images.csv: images whose headers say nothing usable (stripped, Secondary Capture, digitized film) take
the manifest's study, laterality and view; bad rows and unreadable listed files are reported, not fatal."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import mg_dataset, phantom, save, to_stored, views_array, write_labels
from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage

from client.prepare import prepare_site
from common.cli import main
from common.config import Config
from common.dicom import read_view
from common.manifest import Listed, ManifestError, read_manifest
from common.preprocess import preprocess_view

SIZE = (64, 48)


def _stripped(path: Path, laterality: str, view: str, *, seed: int, syntax: str | None = None,
              photometric: str = "MONOCHROME2") -> Path:
    """A digitized-film-like export: Secondary Capture, Modality OT, no laterality, view, orientation or
    meaningful study UID (as RSNA's and CBIS-DDSM's files come)."""
    stored = to_stored(phantom(64, 48, laterality, view, seed), 12, photometric)
    ds = mg_dataset(stored, study="1.2.3.999", laterality=laterality, view=view, laterality_tag=None,
                    view_tag=None, orientation=None, modality="OT", photometric=photometric,
                    sop=f"1.2.3.{seed}")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    del ds.PresentationIntentType
    return save(ds, path, syntax)


def _manifest(root: Path, rows: list[dict[str, str]]) -> None:
    with (root / "images.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "study_uid", "laterality", "view", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)


def _label(study: str, laterality: str, pathology: str = "malignant", birads: str = "") -> dict[str, str]:
    return {"patient_id": "case7", "study_uid": study, "laterality": laterality, "pathology": pathology,
            "birads": birads, "density": "", "symptomatic": "", "split": "train"}


def _config() -> Config:
    config = Config()
    config.data.image_size, config.data.workers = SIZE, 1
    return config


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """Two breasts of case 7: the left in the site folder (one view JPEG 2000, one MONOCHROME1), the right
    outside it (an absolute path, as an importer writes), keyed by a dataset's own exam id."""
    root, elsewhere = tmp_path / "site", tmp_path / "dataset"
    files = {
        ("L", "CC"): _stripped(root / "imgs" / "a.dcm", "L", "CC", seed=1, syntax=JPEG2000Lossless),
        ("L", "MLO"): _stripped(root / "imgs" / "b.dcm", "L", "MLO", seed=2, photometric="MONOCHROME1"),
        ("R", "CC"): _stripped(elsewhere / "c.dcm", "R", "CC", seed=3),
        ("R", "MLO"): _stripped(elsewhere / "d.dcm", "R", "MLO", seed=4),
    }
    _manifest(root, [{"path": str(p.relative_to(root)) if p.is_relative_to(root) else str(p),
                      "study_uid": "CASE 7", "laterality": lat, "view": view, "patient_id": "case7"}
                     for (lat, view), p in files.items()])
    write_labels(root, [_label("CASE 7", "L"), _label("CASE 7", "R", "", "0")],
                 columns=list(_label("", "")))
    return root


def test_listed_images_are_read_whatever_their_headers_say(site: Path) -> None:
    prepared = prepare_site(site, _config(), progress=False)
    assert prepared.rejections == [] and prepared.warnings == []
    assert prepared.exam_ids == ["CASE 7_L", "CASE 7_R"]
    assert [label.malignant for label in prepared.labels] == [True, None]
    listed, _ = read_manifest(site)
    for i, (path, entry) in enumerate(sorted(listed.items(), key=lambda kv: (kv[1].laterality, kv[1].view))):
        view = read_view(path, entry)
        assert (view.laterality, view.view) == (entry.laterality, entry.view)
        assert view.study_instance_uid == "CASE 7"
        assert view.pixels[:, 0].mean() > view.pixels[:, -1].mean()  # chest wall at column 0, both breasts
        expected = preprocess_view(view.pixels, SIZE).astype(np.float16)
        np.testing.assert_array_equal(views_array(prepared)[i // 2, i % 2], expected)


def test_the_same_files_without_the_manifest_are_refused(site: Path) -> None:
    (site / "images.csv").unlink()
    prepared = prepare_site(site, _config(), progress=False)
    assert prepared.exam_ids == []
    assert {r.kind for r in prepared.rejections if r.source.endswith(".dcm")} == {"not MG"}


def test_bad_rows_and_unreadable_listed_files_are_reported_by_check(site: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    broken = site / "imgs" / "broken.dcm"
    broken.write_bytes(b"\0" * 200)
    colour = mg_dataset(np.zeros((32, 32), np.uint16), sop="1.2.3.77")
    colour.SamplesPerPixel, colour.PhotometricInterpretation = 3, "RGB"
    save(colour, site / "imgs" / "colour.dcm")
    with (site / "images.csv").open("a", newline="") as f:
        f.write("imgs/missing.dcm,CASE 8,L,CC,\n"
                "imgs/a.dcm,CASE 9,B,CC,\n"
                "imgs/broken.dcm,CASE 8,L,MLO,\n"
                "imgs/colour.dcm,CASE 8,R,MLO,\n")
    report = tmp_path / "check.json"
    assert main(["check", str(site), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "images.csv:6: invalid manifest row: file imgs/missing.dcm does not exist" in out
    assert "images.csv:7: invalid manifest row: column laterality: 'B' is not one of L, R" in out
    assert f"{broken}: not DICOM" in out
    assert f"{site / 'imgs' / 'colour.dcm'}: unsupported image: 3 samples per pixel" in out
    assert "Exams: 2 labelled, 2 complete (CC + MLO), 2 usable" in out


def test_a_manifest_without_its_columns_is_one_clear_error(site: Path, capsys) -> None:
    (site / "images.csv").write_text("file,study\nimgs/a.dcm,1\n")
    with pytest.raises(ManifestError, match=r"images\.csv: missing column\(s\) path, study_uid, laterality"):
        read_manifest(site)
    assert main(["check", str(site)]) == 2
    assert "missing column(s) path, study_uid, laterality, view" in capsys.readouterr().err


def test_a_dicom_patient_id_that_contradicts_the_labels_is_a_warning(site: Path, capsys) -> None:
    rows = list(csv.DictReader((site / "images.csv").open()))
    for row in rows:
        row["patient_id"] = "someone-else" if row["laterality"] == "R" else row["patient_id"]
    _manifest(site, rows)
    prepared = prepare_site(site, _config(), progress=False)
    assert len(prepared.warnings) == 1
    assert "1 exam(s) whose DICOM PatientID differs" in prepared.warnings[0]
    assert "CASE 7_R: labels.csv 'case7', DICOM 'someone-else'" in prepared.warnings[0]
    assert Listed("CASE 7", "R", "CC", "someone-else") in read_manifest(site)[0].values()


def test_the_site_cache_notices_a_listed_file_outside_the_folder_changing(site: Path, tmp_path: Path) -> None:
    config = _config()
    config.data.cache_dir = str(tmp_path / "cache")
    before = prepare_site(site, config, progress=False)
    outside = tmp_path / "dataset" / "c.dcm"
    _stripped(outside, "R", "CC", seed=30)  # the dataset's file replaced in place
    after = prepare_site(site, config, progress=False)
    assert not np.array_equal(views_array(before)[1, 0], views_array(after)[1, 0])
    np.testing.assert_array_equal(views_array(before)[0], views_array(after)[0])
