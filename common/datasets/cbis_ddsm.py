"""CBIS-DDSM (TCIA): the four case-description CSVs and the DICOM tree.

`mass_case_description_{train,test}_set.csv` and `calc_case_description_{train,test}_set.csv`, one row per
abnormality (`patient_id, breast density | breast_density, left or right breast, image view, abnormality id,
…, assessment, pathology, …, image file path, cropped image file path, ROI mask file path`). Full
mammograms lie below a top folder named `Mass-Training_P_00001_LEFT_CC` (type, split, patient, side,
view), which the CSV's `image file path` starts with, in the classic layout (`<UID>/<UID>/000000.dcm`
below it) and in the current downloader's longer one; crops and ROI masks lie below the same name with a
`_<abnormality id>` suffix, and their series are described as 'cropped images' / 'ROI mask images'.

The exam key is (patient, side); `study_uid` is the patient id (DDSM has one study per case). Mappings
(docs/datasets.md): several abnormalities in one breast → malignant if any is MALIGNANT, else benign
(BENIGN and BENIGN_WITHOUT_CALLBACK); BI-RADS the highest `assessment`; density 1–4 → a–d; the split is
the CSV's (train/test; val only with `--val-fraction`); one site (digitized film, no manufacturer).
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from common.datasets.importer import (
    SPLIT_ORDER,
    VIEWS,
    Breast,
    DatasetError,
    Image,
    Imported,
    Options,
    Tally,
    absolute,
    agreed,
    find_file,
    number,
    read_csv,
    side,
)

DESCRIPTION = "CBIS-DDSM: the mass/calc case-description CSVs (train, test) + the DICOM tree"
SITES_BY = ("",)
OFFICIAL_SPLIT = True
CSVS = {
    "mass_case_description_train_set.csv": "train",
    "mass_case_description_test_set.csv": "test",
    "calc_case_description_train_set.csv": "train",
    "calc_case_description_test_set.csv": "test",
}
REQUIRED = ("patient_id", "left or right breast", "image view", "assessment", "pathology", "image file path")
FOLDER = re.compile(r"(Mass|Calc)-(Training|Test)_(P_\d+)_(LEFT|RIGHT)_(CC|MLO)(?:_(\d+))?", re.IGNORECASE)
"""A top folder of the tree: full mammograms, or (with `_<n>`) an abnormality's crop and ROI mask."""
PATHOLOGY = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign"}
DENSITY = {1: "a", 2: "b", 3: "c", 4: "d"}
NOT_MAMMOGRAMS = ("cropped images", "roi mask images")
"""SeriesDescription (and, in the current downloader's layout, series folder names) of crops and masks."""


def read(src: Path, options: Options, progress: bool = False) -> Imported:
    imported = Imported("cbis-ddsm", {}, [], Tally(), official_split=True)
    tables = []
    for name, split in CSVS.items():
        path = find_file(src, [name])
        if path is None:
            imported.notes.append(f"{name} not found: its abnormalities are not imported")
            continue
        tables.append((read_csv(path, REQUIRED), split))
    if not tables:
        raise DatasetError(f"{src}: none of CBIS-DDSM's case-description CSVs found ({', '.join(CSVS)})")
    rows_of: dict[tuple[str, str], list] = defaultdict(list)
    for table, split in tables:
        if not table.has("breast density"):
            raise DatasetError(f"{table.path}: missing column breast density (or breast_density)")
        for row in table.rows:
            patient, laterality, view = row["patient_id"], side(row["left or right breast"]), \
                row["image view"].upper()
            if not patient or laterality is None or view not in VIEWS:
                imported.skipped.add("abnormality row without patient, LEFT/RIGHT breast or CC/MLO view",
                                     row.where)
                continue
            if row["pathology"].upper() not in PATHOLOGY:
                imported.skipped.add("abnormality row with pathology not MALIGNANT, BENIGN or "
                                     "BENIGN_WITHOUT_CALLBACK", f"{row.where} ({row['pathology']!r})")
                continue
            folder = re.split(r"[\\/]", row["image file path"])[0]
            match = FOLDER.fullmatch(folder)
            if match is None or match.group(6) is not None:
                imported.skipped.add("abnormality row whose image file path names no full-mammogram folder",
                                     f"{row.where} ({folder!r})")
                continue
            named = (match.group(3).upper(), side(match.group(4)), match.group(5).upper())
            if named != (patient.upper(), laterality, view):
                imported.skipped.add("abnormality row whose image folder names another patient, breast or "
                                     "view", f"{row.where} ({folder})")
                continue
            rows_of[patient, laterality].append((row, split))

    for (patient, laterality), rows in rows_of.items():
        name = f"{patient} {laterality}"
        pathologies = {PATHOLOGY[r["pathology"].upper()] for r, _ in rows}
        pathology = "malignant" if "malignant" in pathologies else "benign"
        if len(pathologies) > 1:
            imported.changed.add("breast with malignant and benign abnormalities: malignant", name)
        assessments = [n for r, _ in rows if (n := number(r["assessment"])) is not None and 0 <= n <= 6]
        if len(assessments) < len(rows):
            imported.changed.add("assessment not a BI-RADS category 0–6: not counted", name)
        density = agreed((_density(r["breast density"], r.where, imported) for r, _ in rows), "density", name,
                         imported)
        splits = {s for _, s in rows}
        split = max(splits, key=SPLIT_ORDER.index)
        if len(splits) > 1:
            imported.changed.add("breast in the train and the test CSVs: test", name)
        birads = str(max(assessments)) if assessments else ""
        imported.breasts[patient, laterality] = Breast(patient, patient, laterality, pathology, birads,
                                                       density, "", split)

    _images(src, imported, progress)
    return imported


def _density(value: str, where: str, imported: Imported) -> str:
    n = number(value)
    if n in DENSITY:
        return DENSITY[n]
    if value:
        imported.changed.add("breast density not 1–4: left empty", f"{where} ({value!r})")
    return ""


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(here, name) for here, dirs, names in os.walk(folder)
                  for name in names if not name.startswith("."))


def _images(src: Path, imported: Imported, progress: bool) -> None:
    """Walk the tree: every file below a full-mammogram folder is an image of its patient, side and view,
    unless its series is a crop or an ROI mask; abnormality folders (`…_<n>`) are skipped whole."""
    candidates: list[tuple[str, tuple[str, str, str]]] = []
    for here, dirs, _ in os.walk(src):
        keep = []
        for name in sorted(dirs):
            match = FOLDER.fullmatch(name)
            if name.startswith("."):
                continue
            if match is None:
                keep.append(name)
                continue
            files = _files(os.path.join(here, name))
            if match.group(6) is not None:
                imported.skipped.add("cropped image or ROI mask (an abnormality's folder, …_<n>)",
                                     os.path.join(here, name), len(files))
                continue
            key = (match.group(3).upper(), side(match.group(4)) or "", match.group(5).upper())
            candidates += [(path, key) for path in files]
        dirs[:] = keep
    for path, (patient, laterality, view) in tqdm(candidates, desc="cbis-ddsm: headers", unit="file",
                                                  disable=not progress):
        if any(kind in part.lower() for part in Path(path).parts[-3:-1] for kind in NOT_MAMMOGRAMS):
            imported.skipped.add("cropped image or ROI mask (series folder name)", path)
            continue
        description = _series_description(path)
        if description is None:
            imported.skipped.add("not a DICOM file", path)
            continue
        if description.lower() in NOT_MAMMOGRAMS:
            imported.skipped.add("cropped image or ROI mask (header SeriesDescription)", path)
            continue
        imported.images.append(Image(absolute(Path(path)), patient, patient, laterality, view))


def _series_description(path: str) -> str | None:
    """The file's SeriesDescription ('' when absent); None when it is no DICOM file."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesDescription"])
    except Exception:  # not DICOM or damaged
        return None
    return str(ds.get("SeriesDescription", "") or "").strip()
