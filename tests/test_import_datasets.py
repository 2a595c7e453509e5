"""`fedmammo import`: RSNA, VinDr-Mammo, CBIS-DDSM and CMMD read in their own published layout.

Each fixture is a small dataset in its format, built here: real DICOM from `dicom_factory`, rewritten the way
the dataset stores its files (RSNA: stripped headers, JPEG 2000 and JPEG Lossless, MONOCHROME1; VinDr:
de-identified to VinDr's kept tags, `.dicom`; CBIS-DDSM: Secondary Capture without laterality or view, full,
cropped and ROI-mask folders, quirky CSVs; CMMD: tags, the clinical sheet as xlsx and as CSV).
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import pytest
from dicom_factory import dcmtk_jpeg_lossless, mg_dataset, phantom, save, to_stored, uid
from pydicom import config as pydicom_config
from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage

from common.cli import main
from common.datasets.importer import (
    Breast,
    Image,
    Imported,
    Options,
    Tally,
    build,
    import_dataset,
    read_csv,
    unit_draw,
)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # VinDr's hex ids, as published

LABEL_COLUMNS = ["patient_id", "study_uid", "laterality", "pathology", "birads", "density", "symptomatic",
                 "split"]
IMAGE_COLUMNS = ["path", "study_uid", "laterality", "view", "patient_id"]


# --- helpers -----------------------------------------------------------------------------------------


def tree_digest(root: Path) -> str:
    """Names and contents of every file below `root`: equal before and after = nothing written there."""
    digest = hashlib.sha256()
    for folder, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def site(out: Path, name: str) -> tuple[dict[tuple[str, str], dict[str, str]], list[dict[str, str]]]:
    """A written site: its labels by (study_uid, laterality), its images; with the exact columns."""
    columns, labels = read_rows(out / name / "labels.csv")
    assert columns == LABEL_COLUMNS
    columns, images = read_rows(out / name / "images.csv")
    assert columns == IMAGE_COLUMNS
    for image in images:
        assert Path(image["path"]).is_absolute() and Path(image["path"]).is_file()
        assert image["view"] in ("CC", "MLO") and image["laterality"] in ("L", "R")
    return {(r["study_uid"], r["laterality"]): r for r in labels}, images


def views_of(images: list[dict[str, str]], study: str, laterality: str) -> list[str]:
    return sorted(i["view"] for i in images if (i["study_uid"], i["laterality"]) == (study, laterality))


def run_import(fmt: str, src: Path, out: Path, *extra: str) -> int:
    return main(["import", fmt, str(src), str(out), *extra])


def write_csv(path: Path, columns: list[str], rows: list[list[object]], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def stored(laterality: str, view: str, seed: int, photometric: str = "MONOCHROME2"):
    return to_stored(phantom(64, 48, laterality, view, seed), 12, photometric)


# --- RSNA: train.csv + train_images/<patient>/<image>.dcm, headers stripped ----------------------------

RSNA_COLUMNS = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy",
                "invasive", "BIRADS", "implant", "density", "machine_id", "difficult_negative_case"]


def rsna_image(root: Path, patient: str, image_id: str, laterality: str, view: str, seed: int,
               style: int) -> None:
    """One RSNA file: no laterality, view, orientation or StudyInstanceUID; JPEG 2000, JPEG Lossless or
    plain; MONOCHROME1 every third."""
    photometric = "MONOCHROME1" if style % 3 == 0 else "MONOCHROME2"
    ds = mg_dataset(stored(laterality, view, seed, photometric), patient=patient, laterality=laterality,
                    view=view, photometric=photometric, laterality_tag=None, view_tag=None, orientation=None,
                    sop=str(uid("rsna", image_id)))
    del ds.StudyInstanceUID, ds.PatientName
    path = root / "train_images" / patient / f"{image_id}.dcm"
    if style % 3 == 1:
        save(ds, path, JPEG2000Lossless)
    elif style % 3 == 2:
        plain = save(ds, path.with_suffix(".tmp"))
        dcmtk_jpeg_lossless(plain, path)
        plain.unlink()
    else:
        save(ds, path)


def rsna_dataset(root: Path) -> Path:
    """8 patients at 2 sites. 10001: repeated L CC, an extra ML view; 10002: L cancer, R biopsied benign;
    10003: R has no MLO; 10004: a missing file; 10005: images on two machines; BIRADS/density varied."""
    rows = []
    n = 0
    for p in range(8):
        patient = str(10001 + p)
        site_id = 1 + p % 2
        for laterality in ("L", "R"):
            views = ["CC", "MLO"]
            if patient == "10001" and laterality == "L":
                views += ["CC", "ML"]
            if patient == "10003" and laterality == "R":
                views = ["CC"]
            for view in views:
                n += 1
                image_id = str(500000 + n)
                cancer = int(patient == "10002" and laterality == "L")
                biopsy = int(patient == "10002")
                birads = {0: "0", 1: "1", 2: "2", 3: ""}[p % 4] if not cancer else "0"
                density = "ABCD"[p % 4] if p != 7 else ""
                machine = 49 if not (patient == "10005" and view == "MLO" and laterality == "R") else 21
                rows.append([site_id, patient, image_id, laterality, view, 60.0, cancer, biopsy, cancer,
                             birads, 0, density, machine, "False"])
                if patient == "10004" and laterality == "R" and view == "MLO":
                    continue  # listed, file missing
                rsna_image(root, patient, image_id, laterality, view, seed=n, style=n)
    write_csv(root / "train.csv", RSNA_COLUMNS, rows, bom=True)
    return root


@pytest.fixture(scope="module")
def rsna(tmp_path_factory) -> Path:
    return rsna_dataset(tmp_path_factory.mktemp("rsna") / "rsna-breast-cancer-detection")


def test_rsna_labels_images_and_skips(rsna, tmp_path, capsys):
    before = tree_digest(rsna)
    out = tmp_path / "out"
    assert run_import("rsna", rsna, out) == 0
    printed = capsys.readouterr().out
    assert tree_digest(rsna) == before, "the dataset's folder was written to"
    assert sorted(p.name for p in out.iterdir()) == ["rsna-site-1", "rsna-site-2"]
    labels, images = site(out, "rsna-site-2")
    # 10002 (site 2): L cancer → malignant; R cancer 0 but biopsied → benign.
    assert labels["10002", "L"]["pathology"] == "malignant" and labels["10002", "L"]["birads"] == "0"
    assert labels["10002", "R"]["pathology"] == "benign"
    assert labels["10002", "L"]["patient_id"] == "10002" and labels["10002", "L"]["density"] == "b"
    # 10004 (site 2): R MLO file missing → R is no exam.
    assert ("10004", "R") not in labels and ("10004", "L") in labels
    labels1, images1 = site(out, "rsna-site-1")
    # 10001: the repeated CC stays listed, the ML view is skipped.
    assert views_of(images1, "10001", "L") == ["CC", "CC", "MLO"]
    # cancer 0 and biopsy 0: no pathology, not "benign"; BIRADS and density as written; no symptoms.
    assert labels1["10001", "R"]["pathology"] == "" and labels1["10001", "R"]["birads"] == "0"
    assert labels1["10001", "R"]["density"] == "a" and labels1["10001", "R"]["symptomatic"] == ""
    assert labels1["10003", "L"]["birads"] == "2" and ("10003", "R") not in labels1
    assert labels1["10007", "L"]["birads"] == "2"
    assert labels["10008", "L"]["density"] == "" and labels["10004", "L"]["birads"] == ""
    for labels_, images_ in ((labels, images), (labels1, images1)):
        for key, row in labels_.items():
            assert views_of(images_, *key)[:1] == ["CC"] and "MLO" in views_of(images_, *key)
            assert row["split"] in ("train", "val", "test")
    assert "view ML: not CC or MLO" in printed and "image file missing" in printed
    assert "breast without a MLO image" in printed


def test_rsna_sites_by_machine_keep_a_patient_in_one_site(rsna, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_import("rsna", rsna, out, "--sites-by", "machine_id") == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["rsna-machine-49"]
    labels, _ = site(out, "rsna-machine-49")
    assert ("10005", "R") in labels and ("10005", "L") in labels
    assert "patient with images from several sites" in printed


def test_rsna_jpeg_and_monochrome1_files_are_what_rsna_ships(rsna):
    import pydicom

    syntaxes, photometric = set(), set()
    for path in (rsna / "train_images").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        photometric.add(ds.PhotometricInterpretation)
        assert "ImageLaterality" not in ds and "ViewPosition" not in ds and "StudyInstanceUID" not in ds
    assert {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70"} <= syntaxes
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


# --- the split: seeded by patient, stable, never splitting a patient ----------------------------------


def test_rsna_split_is_stable_for_a_seed_and_per_patient(rsna, tmp_path, capsys):
    for n in (1, 2):
        assert run_import("rsna", rsna, tmp_path / f"out{n}", "--seed", "5", "--val-fraction", "0.3") == 0
    capsys.readouterr()
    for name in ("rsna-site-1", "rsna-site-2"):
        first = (tmp_path / "out1" / name / "labels.csv").read_text()
        assert first == (tmp_path / "out2" / name / "labels.csv").read_text()
        labels, _ = site(tmp_path / "out1", name)
        splits: dict[str, set[str]] = {}
        for row in labels.values():
            splits.setdefault(row["patient_id"], set()).add(row["split"])
        assert all(len(s) == 1 for s in splits.values())



def _many(official: bool) -> Imported:
    imported = Imported("x", {}, [], Tally(), official_split=official)
    for p in range(400):
        patient = f"P{p}"
        for s in range(1 + p % 2):  # some patients have two studies
            for laterality in ("L", "R"):
                study = f"{patient}-{s}"
                split = ("train", "test")[p % 2 if s == 0 else (p // 2) % 2] if official else ""
                imported.breasts[study, laterality] = Breast(patient, study, laterality, split=split,
                                                             site=("a", "b")[s])
                imported.images += [Image(f"/x/{study}{laterality}{v}", patient, study, laterality, v)
                                    for v in ("CC", "MLO")]
    return imported


def _splits(sites) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in sites:
        for b in s.labels:
            out.setdefault(b.patient_id, set()).add(b.split)
    return out


def test_seeded_split_never_splits_a_patient_and_is_stable():
    first = _splits(build(_many(False), Options(seed=3)))
    again = _splits(build(_many(False), Options(seed=3)))
    other = _splits(build(_many(False), Options(seed=4)))
    assert all(len(s) == 1 for s in first.values())
    assert first == again and first != other
    counts = {split: sum(s == {split} for s in first.values()) for split in ("train", "val", "test")}
    assert 60 <= counts["test"] <= 100 and 25 <= counts["val"] <= 60  # 20% and 10% of 400
    assert unit_draw(3, "P1", "split") == unit_draw(3, "P1", "split")


def test_official_split_kept_a_patient_in_two_goes_to_test_and_val_comes_from_train():
    sites = build(_many(True), Options(val_fraction=0.25))
    splits = _splits(sites)
    assert all(len(s) == 1 for s in splits.values())
    for p in range(400):
        first, second = p % 2, (p // 2) % 2
        expected = {"test"} if 1 in ((first,) if p % 2 == 0 else (first, second)) else {"train", "val"}
        assert splits[f"P{p}"] <= expected
    assert any(s == {"val"} for s in splits.values())
    # A patient's studies at two sites: all in one site.
    where: dict[str, set[str]] = {}
    for s in sites:
        for b in s.labels:
            where.setdefault(b.patient_id, set()).add(s.name)
    assert all(len(w) == 1 for w in where.values())


# --- VinDr-Mammo: de-identified .dicom, breast-level/finding/metadata CSVs ------------------------------

VINDR_KEPT = {
    "PatientSex", "PatientAge", "Rows", "Columns", "PixelSpacing", "ImagerPixelSpacing", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "WindowCenter", "WindowWidth", "RescaleIntercept",
    "RescaleSlope", "RescaleType", "PixelData", "PhotometricInterpretation", "SamplesPerPixel",
    "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "BodyPartExamined",
    "PresentationIntentType", "Manufacturer", "ManufacturerModelName", "Laterality", "ImageLaterality",
    "ViewPosition",
}
"""The tags VinDr's de-identification keeps (its tags.csv); everything else is dropped."""


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def vindr_image(root: Path, study: str, series: str, image: str, laterality: str, view: str, seed: int,
                manufacturer: str) -> None:
    photometric = "MONOCHROME1" if seed % 2 else "MONOCHROME2"
    ds = mg_dataset(stored(laterality, view, seed, photometric), laterality=laterality, view=view,
                    photometric=photometric, window=(2048, 4096))
    ds.Manufacturer = manufacturer
    for keyword in [e.keyword for e in ds if e.keyword not in VINDR_KEPT]:
        delattr(ds, keyword)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, image
    ds.file_meta.MediaStorageSOPClassUID = "1.2.3.4"
    ds.file_meta.MediaStorageSOPInstanceUID = image
    validation = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE  # hex ids are no valid UIDs:
    try:                                                                     # VinDr's files have them anyway
        save(ds, root / "images" / study / f"{image}.dicom")
    finally:
        pydicom_config.settings.writing_validation_mode = validation


def vindr_dataset(root: Path) -> Path:
    """5 studies: 3 training, 2 test; 2 manufacturers (one study missing from metadata.csv: its header
    says); a missing file; findings in one breast."""
    breast_rows, metadata_rows, finding_rows = [], [], []
    for s in range(5):
        study, series = md5(f"study{s}"), md5(f"series{s}")
        manufacturer = ("SIEMENS", "Planmed")[s % 2]
        for laterality in ("L", "R"):
            for view in ("CC", "MLO"):
                image = md5(f"{s}{laterality}{view}")
                birads = f"BI-RADS {1 + (s + (laterality == 'R')) % 5}"
                density = f"DENSITY {'ABCD'[s % 4]}"
                split = "training" if s < 3 else "test"
                breast_rows.append([study, series, image, laterality, view, 64, 48, birads, density, split])
                categories = "['Mass']" if (s, laterality) == (0, "L") else "['No Finding']"
                finding_rows.append([study, series, image, laterality, view, 64, 48, birads, density,
                                     categories, birads if "Mass" in categories else "", 1, 2, 3, 4, split])
                if s != 4:
                    metadata_rows.append([series, image, "F", "056Y", manufacturer, "model"])
                if (s, laterality, view) == (2, "R", "MLO"):
                    continue  # missing file
                vindr_image(root, study, series, image, laterality, view, seed=s * 4 + len(breast_rows),
                            manufacturer=manufacturer)
    write_csv(root / "breast-level_annotations.csv",
              ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
               "breast_birads", "breast_density", "split"], breast_rows)
    write_csv(root / "finding_annotations.csv",
              ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
               "breast_birads", "breast_density", "finding_categories", "finding_birads", "xmin", "ymin",
               "xmax", "ymax", "split"], finding_rows)
    write_csv(root / "metadata.csv", ["Series Instance UID", "SOP Instance UID", "Patient's Sex",
                                      "Patient's Age", "Manufacturer", "Manufacturer's Model Name"],
              metadata_rows)
    return root


@pytest.fixture(scope="module")
def vindr(tmp_path_factory) -> Path:
    return vindr_dataset(tmp_path_factory.mktemp("vindr") / "vindr-mammo" / "1.0.0")


def test_vindr_labels_split_and_no_pathology(vindr, tmp_path, capsys):
    before = tree_digest(vindr)
    out = tmp_path / "out"
    assert run_import("vindr", vindr, out) == 0
    printed = capsys.readouterr().out
    assert tree_digest(vindr) == before
    labels, images = site(out, "vindr")
    study0 = md5("study0")
    assert labels[study0, "L"] == {"patient_id": study0, "study_uid": study0, "laterality": "L",
                                   "pathology": "", "birads": "1", "density": "a", "symptomatic": "",
                                   "split": "train"}
    assert labels[study0, "R"]["birads"] == "2"
    assert labels[md5("study3"), "L"]["split"] == "test" and labels[md5("study3"), "L"]["density"] == "d"
    assert (md5("study2"), "R") not in labels and "image file missing" in printed
    assert all(row["pathology"] == "" for row in labels.values())
    assert all(Path(i["path"]).suffix == ".dicom" for i in images)
    assert "1 breast(s) have a finding" in printed


def test_vindr_val_from_training_and_sites_by_manufacturer(vindr, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_import("vindr", vindr, out, "--sites-by", "manufacturer", "--val-fraction", "0.5",
                      "--seed", "1") == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["vindr-Planmed", "vindr-SIEMENS"]
    siemens, _ = site(out, "vindr-SIEMENS")
    planmed, _ = site(out, "vindr-Planmed")
    assert {k[0] for k in siemens} == {md5("study0"), md5("study2"), md5("study4")}
    assert "read from the image's header" in printed  # study 4 is not in metadata.csv
    splits = {row["study_uid"]: row["split"] for row in [*siemens.values(), *planmed.values()]}
    assert splits[md5("study3")] == "test" and splits[md5("study4")] == "test"
    assert {splits[md5(f"study{s}")] for s in range(3)} <= {"train", "val"}


# --- CBIS-DDSM: Secondary Capture, full / cropped / ROI folders, four CSVs -----------------------------

CBIS_MASS = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"]
CBIS_CALC = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
             "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
             "image file path", "cropped image file path", "ROI mask file path"]


def cbis_file(path: Path, laterality: str, view: str, seed: int, description: str, shape=(64, 48)) -> Path:
    """A CBIS-DDSM file: Secondary Capture of a scanned film, no laterality, view or orientation."""
    image = phantom(*shape, laterality, view, seed)
    ds = mg_dataset(to_stored(image, 16), laterality_tag=None, view_tag=None, orientation=None, bits=16,
                    sop=str(uid("cbis", path)), study=str(uid("cbis-study", path.parts[-4])))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SeriesDescription = description
    del ds.PresentationIntentType
    return save(ds, path)


def cbis_case(root: Path, kind: str, split: str, patient: str, laterality: str, view: str,
              abnormalities: int, seed: int, new_layout: bool = False) -> tuple[str, list[tuple[str, str]]]:
    """The full image and each abnormality's crop and ROI mask; returns the full image's CSV path and each
    abnormality's (crop, ROI) CSV paths."""
    side_name = {"L": "LEFT", "R": "RIGHT"}[laterality]
    top = f"{kind}-{split}_{patient}_{side_name}_{view}"
    if new_layout:
        cbis_file(root / top / "08-07-2016-DDSM-NA-12345" / "1.000000-full mammogram images-54321"
                  / "1-1.dcm", laterality, view, seed, "full mammogram images")
    else:
        cbis_file(root / top / uid(top, 1) / uid(top, 2) / "000000.dcm", laterality, view, seed,
                  "full mammogram images")
    crops = []
    for n in range(1, abnormalities + 1):
        folder = root / f"{top}_{n}"
        if new_layout:
            cbis_file(folder / "08-07-2016-DDSM-NA-1" / "1.000000-ROI mask images-1" / "1-1.dcm", laterality,
                      view, seed, "ROI mask images")
            cbis_file(folder / "08-07-2016-DDSM-NA-1" / "2.000000-cropped images-2" / "1-1.dcm", laterality,
                      view, seed, "cropped images", (32, 24))
        else:
            sub = folder / uid(top, n, 1) / uid(top, n, 2)
            cbis_file(sub / "000000.dcm", laterality, view, seed, "cropped images", (32, 24))
            cbis_file(sub / "000001.dcm", laterality, view, seed, "ROI mask images")
        crops.append((f"{top}_{n}/{uid(top, n, 1)}/{uid(top, n, 2)}/000000.dcm",
                      f"{top}_{n}/{uid(top, n, 1)}/{uid(top, n, 2)}/000001.dcm\n"))
    return f"{top}/{uid(top, 1)}/{uid(top, 2)}/000000.dcm", crops


def cbis_dataset(root: Path) -> Path:
    """P_00001 L: a malignant mass and a benign calcification (mass and calc train CSVs); a stray ROI mask
    in a full folder (only its header says so). P_00002 R: BENIGN_WITHOUT_CALLBACK, test. P_00003 L in the
    calc train and mass test CSVs → test. P_00004 R: only a CC row. P_00005 R: the current downloader's
    layout. Density 1–4."""
    tree = root / "CBIS-DDSM"
    mass_train, mass_test, calc_train, calc_test = [], [], [], []
    seed = 0

    def case(rows, kind, split, patient, laterality, view, density, assessment, pathology, n=1, new=False):
        nonlocal seed
        seed += 1
        full, crops = cbis_case(tree, kind, split, patient, laterality, view, n, seed, new)
        for i, (crop, roi) in enumerate(crops, start=1):
            rows.append([patient, density, {"L": "LEFT", "R": "RIGHT"}[laterality], view, i, kind.lower(),
                         "OVAL", "CIRCUMSCRIBED", assessment, pathology, 3, f'"{full}"' if i == 1 else full,
                         crop, roi])

    for view in ("CC", "MLO"):
        case(mass_train, "Mass", "Training", "P_00001", "L", view, 3, 4, "MALIGNANT", n=2)
        case(calc_train, "Calc", "Training", "P_00001", "L", view, 3, 2, "BENIGN")
        case(mass_test, "Mass", "Test", "P_00002", "R", view, 1, 3, "BENIGN_WITHOUT_CALLBACK")
        case(calc_train, "Calc", "Training", "P_00003", "L", view, 2, 2, "BENIGN")
        case(mass_test, "Mass", "Test", "P_00003", "L", view, 2, 5, "MALIGNANT")
        case(calc_train, "Calc", "Training", "P_00005", "R", view, 4, 0, "BENIGN", new=True)
    case(mass_train, "Mass", "Training", "P_00004", "R", "CC", 2, 4, "BENIGN")
    # a stray mask inside a full-mammogram folder: only its header tells it apart
    stray = next((tree / "Mass-Training_P_00001_LEFT_CC").rglob("000000.dcm")).parent / "000001.dcm"
    cbis_file(stray, "L", "CC", 99, "ROI mask images")
    write_csv(root / "mass_case_description_train_set.csv", CBIS_MASS, mass_train)
    write_csv(root / "mass_case_description_test_set.csv", CBIS_MASS, mass_test)
    write_csv(root / "calc_case_description_train_set.csv", CBIS_CALC, calc_train)
    write_csv(root / "calc_case_description_test_set.csv", CBIS_CALC, calc_test)
    return root


@pytest.fixture(scope="module")
def cbis(tmp_path_factory) -> Path:
    return cbis_dataset(tmp_path_factory.mktemp("cbis") / "cbis")


def test_cbis_ddsm_full_mammograms_only_and_abnormalities_merged(cbis, tmp_path, capsys):
    before = tree_digest(cbis)
    out = tmp_path / "out"
    assert run_import("cbis-ddsm", cbis, out) == 0
    printed = capsys.readouterr().out
    assert tree_digest(cbis) == before
    labels, images = site(out, "cbis-ddsm")
    assert labels["P_00001", "L"]["pathology"] == "malignant"  # malignant mass + benign calcification
    assert labels["P_00001", "L"]["birads"] == "4" and labels["P_00001", "L"]["density"] == "c"
    assert labels["P_00001", "L"]["split"] == "train" and labels["P_00001", "L"]["symptomatic"] == ""
    assert labels["P_00002", "R"]["pathology"] == "benign" and labels["P_00002", "R"]["split"] == "test"
    assert labels["P_00002", "R"]["density"] == "a"
    assert labels["P_00003", "L"]["split"] == "test" and labels["P_00003", "L"]["birads"] == "5"
    assert ("P_00004", "R") not in labels
    assert labels["P_00005", "R"]["density"] == "d" and labels["P_00005", "R"]["birads"] == "0"
    # Mass and calc folders hold the same film: both listed, one per view is read.
    assert views_of(images, "P_00001", "L") == ["CC", "CC", "MLO", "MLO"]
    assert views_of(images, "P_00005", "R") == ["CC", "MLO"]
    paths = " ".join(i["path"] for i in images)
    assert "_CC_1" not in paths and "_MLO_1" not in paths and "000001.dcm" not in paths
    assert "ROI mask images" not in paths and "cropped images" not in paths
    assert "cropped image or ROI mask (an abnormality's folder" in printed
    assert "cropped image or ROI mask (header SeriesDescription)" in printed
    assert "breast in the train and the test CSVs" in printed or "several of the dataset's splits" in printed


def test_cbis_ddsm_files_are_secondary_capture_without_laterality(cbis):
    import pydicom

    for path in (cbis / "CBIS-DDSM").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert "ImageLaterality" not in ds and "ViewPosition" not in ds


# --- CMMD: clinical sheet (xlsx or CSV) + tagged DICOM ----------------------------------------------


def cmmd_image(root: Path, patient: str, laterality: str, view: str, n: int, manufacturer: str,
               style: str) -> None:
    """`style`: 'position' (ViewPosition), 'code' (ViewCodeSequence only), 'sc' (Secondary Capture,
    Modality OT: the project's reader refuses it, the importer reads its tags)."""
    ds = mg_dataset(stored(laterality, view, n), patient=patient, laterality=laterality, view=view,
                    view_tag="ViewCodeSequence" if style == "code" else "ViewPosition",
                    study=str(uid("cmmd", patient)), sop=str(uid("cmmd", patient, laterality, view)))
    ds.Manufacturer = manufacturer
    if style == "sc":
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.Modality = "OT"
    study = f"07-18-2010-NA-NA-{abs(hash(patient)) % 10000:04d}"
    save(ds, root / "CMMD" / patient / study / "1.000000-NA-1234" / f"1-{n}.dcm")


def cmmd_dataset(root: Path, xlsx: bool) -> Path:
    """D1-0001: L malignant, R imaged without a clinical row; D1-0002: R benign (ViewCodeSequence only);
    D1-0003: L and R; D2-0001: Secondary Capture (tag fallback); D2-0002: an extra spot view."""
    clinical = [
        ["D1-0001", "L", 44, 2, "calcification", "Malignant", "Luminal B"],
        ["D1-0002", "R", 51, 2, "mass", "Benign", ""],
        ["D1-0003", "L", 60, 2, "both", "Malignant", "HER2-enriched"],
        ["D1-0003", "R", 60, 2, "mass", "Benign", ""],
        ["D2-0001", "L", 38, 2, "mass", "Benign", ""],
        ["D2-0002", "R", 47, 2, "mass", "Malignant", "triple negative"],
    ]
    ge = "GE MEDICAL SYSTEMS"
    images = [
        ("D1-0001", "L", "position", ge), ("D1-0001", "R", "position", ge), ("D1-0002", "R", "code", ge),
        ("D1-0003", "L", "position", "HOLOGIC"), ("D1-0003", "R", "position", "HOLOGIC"),
        ("D2-0001", "L", "sc", "HOLOGIC"), ("D2-0002", "R", "code", "HOLOGIC"),
    ]
    for patient, laterality, style, manufacturer in images:
        for n, view in enumerate(("CC", "MLO"), start=1):
            number = n + (2 if laterality == "R" else 0)
            cmmd_image(root, patient, laterality, view, number, manufacturer, style)
    spot = mg_dataset(stored("R", "CC", 9), patient="D2-0002", laterality="R", view="CC",
                      view_tag="ViewCodeSequence", view_modifier=("260378005", "R-102D6", "spot compression"),
                      study=str(uid("cmmd", "D2-0002")), sop=str(uid("cmmd", "spot")))
    save(spot, root / "CMMD" / "D2-0002" / "spot" / "1.000000-NA-1" / "1-9.dcm")
    header = ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"]
    if xlsx:
        openpyxl = pytest.importorskip("openpyxl")
        book = openpyxl.Workbook()
        sheet = book.active
        sheet.append(header)
        for row in clinical:
            sheet.append(row)
        book.save(root / "CMMD_clinicaldata_revision.xlsx")
    else:
        write_csv(root / "CMMD_clinicaldata_revision.csv", header, clinical, bom=True)
    return root


@pytest.fixture(scope="module")
def cmmd(tmp_path_factory) -> Path:
    return cmmd_dataset(tmp_path_factory.mktemp("cmmd") / "manifest-1616439774456", xlsx=True)


def _check_cmmd(out: Path, printed: str) -> None:
    labels, images = site(out, "cmmd")
    assert labels["D1-0001", "L"]["pathology"] == "malignant" and ("D1-0001", "R") not in labels
    assert labels["D1-0002", "R"]["pathology"] == "benign"  # views from ViewCodeSequence
    assert labels["D2-0001", "L"]["pathology"] == "benign"  # Secondary Capture, read tag by tag
    assert {k for k in labels if k[0] == "D1-0003"} == {("D1-0003", "L"), ("D1-0003", "R")}
    assert all(row["birads"] == row["density"] == row["symptomatic"] == "" for row in labels.values())
    assert views_of(images, "D2-0002", "R") == ["CC", "MLO"]  # the spot view is not listed
    assert "image of a breast without a clinical row" in printed
    assert "unsupported view (common.dicom)" in printed
    splits: dict[str, set[str]] = {}
    for row in labels.values():
        splits.setdefault(row["patient_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())


def test_cmmd_from_xlsx(cmmd, tmp_path, capsys):
    before = tree_digest(cmmd)
    out = tmp_path / "out"
    assert run_import("cmmd", cmmd, out, "--seed", "2") == 0
    assert tree_digest(cmmd) == before
    _check_cmmd(out, capsys.readouterr().out)


def test_cmmd_from_its_csv_export_and_by_manufacturer(tmp_path, capsys):
    src = cmmd_dataset(tmp_path / "cmmd", xlsx=False)
    out = tmp_path / "out"
    assert run_import("cmmd", src, out) == 0
    _check_cmmd(out, capsys.readouterr().out)
    out2 = tmp_path / "out2"
    assert run_import("cmmd", src, out2, "--sites-by", "manufacturer") == 0
    assert sorted(p.name for p in out2.iterdir()) == ["cmmd-GE-MEDICAL-SYSTEMS", "cmmd-HOLOGIC"]
    ge, _ = site(out2, "cmmd-GE-MEDICAL-SYSTEMS")
    assert set(ge) == {("D1-0001", "L"), ("D1-0002", "R")}


def test_cmmd_xlsx_without_openpyxl_says_to_export_csv(cmmd, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "openpyxl", None)
    assert run_import("cmmd", cmmd, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "openpyxl" in err and "CMMD_clinicaldata_revision.csv" in err and "Traceback" not in err


# --- errors: one message, exit 2, nothing written -----------------------------------------------------


def test_csv_reading_tolerates_bom_semicolons_quotes_and_spaced_headers(tmp_path):
    path = tmp_path / "x.csv"
    path.write_bytes("\ufeffPatient_ID; breast density ;image file path\nP_1;3;\"a/b.dcm\n\"\n".encode())
    table = read_csv(path, ("patient id", "breast_density"))
    assert table.rows[0]["patient_id"] == "P_1" and table.rows[0]["breast density"] == "3"
    assert table.rows[0]["image file path"] == "a/b.dcm"


@pytest.mark.parametrize("case", ["no-src", "no-csv", "no-column", "not-empty", "inside", "test-fraction",
                                  "sites-by", "bad-fraction"])
def test_errors_are_one_message_and_exit_2(case, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "train_images").mkdir()
    fmt, extra = "rsna", []
    if case == "no-src":
        src = tmp_path / "missing"
    elif case == "no-column":
        write_csv(src / "train.csv", RSNA_COLUMNS[:-3], [])
    elif case in ("not-empty", "inside", "sites-by", "test-fraction", "bad-fraction"):
        write_csv(src / "train.csv", RSNA_COLUMNS, [])
    if case == "not-empty":
        out.mkdir()
        (out / "x").write_text("x")
    if case == "inside":
        out = src / "out"
    if case == "test-fraction":
        fmt, extra = "vindr", ["--test-fraction", "0.3"]
    if case == "sites-by":
        extra = ["--sites-by", "manufacturer"]
    if case == "bad-fraction":
        extra = ["--val-fraction", "0.5", "--test-fraction", "0.5"]
    before = tree_digest(src) if src.exists() else ""
    assert run_import(fmt, src, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmammo import: error: ") and err.count("\n") == 1 and "Traceback" not in err
    expected = {"no-src": "not a folder", "no-csv": "train.csv: not found", "no-column": "missing column(s)",
                "not-empty": "not empty", "inside": "inside the dataset's folder",
                "test-fraction": "own test split", "sites-by": "can split sites by site_id, machine_id",
                "bad-fraction": "leave some patients"}[case]
    assert expected in err
    if src.exists():
        assert tree_digest(src) == before
    assert case == "not-empty" or not out.exists()


def test_force_writes_into_a_non_empty_out(rsna, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    assert run_import("rsna", rsna, out, "--force") == 0
    assert (out / "notes.txt").read_text() == "kept" and (out / "rsna-site-1" / "images.csv").is_file()


def test_no_exam_is_an_error(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "train_images").mkdir(parents=True)
    row = [1, "7", "70", "L", "CC", 50, 0, 0, 0, "", 0, "", 1, "False"]
    write_csv(src / "train.csv", RSNA_COLUMNS, [row])
    assert run_import("rsna", src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "no exam found" in err and "image file missing" in err


def test_import_api_returns_sites(vindr, tmp_path):
    imported, sites = import_dataset("vindr", vindr, tmp_path / "out", Options())
    assert [s.name for s in sites] == ["vindr"] and imported.official_split
    assert len(sites[0].labels) == 9 and len(sites[0].images) == 18


# --- the imported sites are usable: `fedmammo check` ------------------------------------------------


def test_check_reads_the_imported_sites(rsna, vindr, cbis, cmmd, tmp_path, capsys):
    import json

    out = tmp_path / "out"
    for fmt, src, sites in (("rsna", rsna, ["rsna-site-1", "rsna-site-2"]), ("vindr", vindr, ["vindr"]),
                            ("cbis-ddsm", cbis, ["cbis-ddsm"]), ("cmmd", cmmd, ["cmmd"])):
        assert run_import(fmt, src, out / fmt) == 0
        for name in sites:
            report = tmp_path / f"{name}.json"
            config = tmp_path / "tiny.toml"
            config.write_text("[data]\nimage_size = [64, 48]\nworkers = 1\n")
            assert main(["check", str(out / fmt / name), "--config", str(config), "--json", str(report)]) == 0
            data = json.loads(report.read_text())
            labels, _ = site(out / fmt, name)
            assert data["counts"]["exams_usable"] == len(labels), (name, data["rejections"])
    capsys.readouterr()
