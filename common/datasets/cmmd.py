"""CMMD, The Chinese Mammography Database (TCIA): the clinical data file and the DICOM tree.

`CMMD_clinicaldata_revision.xlsx` (one sheet; or its CSV export): `ID1, LeftRight, Age, number, abnormality,
classification, subtype`, one row per breast with a finding. Images: `CMMD/<ID1>/<study>/<series>/1-1.dcm …`,
laterality and view in their headers (read without pixels). The exam key is (ID1, side) and `study_uid` is
ID1. Mappings (docs/datasets.md): classification Benign/Malignant → benign/malignant; no BI-RADS, density or
symptoms in the data (empty); images of a breast without a clinical row are skipped (CMMD describes only
breasts with a finding: the other breast has no label); a seeded split by patient; one site, or one per
manufacturer (`--sites-by manufacturer`, the headers' Manufacturer).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from common.datasets.importer import (
    VIEWS,
    Breast,
    DatasetError,
    Image,
    Imported,
    Options,
    Table,
    Tally,
    absolute,
    find_file,
    read_csv,
    rows_table,
    side,
)

DESCRIPTION = "CMMD: CMMD_clinicaldata_revision.xlsx (or its CSV export) + the DICOM tree"
SITES_BY = ("", "manufacturer")
OFFICIAL_SPLIT = False
CLINICAL = "CMMD_clinicaldata_revision"
REQUIRED = ("ID1", "LeftRight", "classification")
CLASSIFICATION = {"BENIGN": "benign", "MALIGNANT": "malignant"}
VIEW_CODES = {"399162004": "CC", "R-10242": "CC", "399368009": "MLO", "R-10226": "MLO"}
"""ViewCodeSequence codes (SNOMED CT, SNOMED RT) of the cranio-caudal and medio-lateral oblique views."""


def clinical_file(src: Path) -> Path:
    """The clinical data file: its CSV export if there is one, else the spreadsheet."""
    path = find_file(src, [f"{CLINICAL}.csv", f"{CLINICAL}.xlsx"])
    if path is None:
        found = sorted(p.name for p in src.glob("*") if p.suffix.lower() in (".csv", ".xlsx"))
        raise DatasetError(f"{src}: no {CLINICAL}.xlsx or {CLINICAL}.csv (CMMD's clinical data) in the "
                           f"folder or two levels below (found: {', '.join(found) or 'no CSV or xlsx file'})")
    return path


def read_xlsx(path: Path, required: tuple[str, ...]) -> Table:
    """The first sheet of a spreadsheet, through openpyxl (optional: `pip install fedmammo[datasets]`)."""
    try:
        import openpyxl
    except ImportError:
        raise DatasetError(f"{path}: reading .xlsx needs openpyxl, which is not installed: install it "
                           f"(pip install 'fedmammo[datasets]'), or export the sheet to CSV as "
                           f"{path.with_suffix('.csv').name} beside it") from None
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises many kinds on a damaged or foreign file
        raise DatasetError(f"{path}: not a readable .xlsx workbook ({type(exc).__name__}: {exc}); export the "
                           f"sheet to CSV as {path.with_suffix('.csv').name} beside it") from None
    try:
        sheet = workbook.worksheets[0].iter_rows(values_only=True)
        rows = [(n, [_cell(v) for v in values]) for n, values in enumerate(sheet, start=1)]
    finally:
        workbook.close()
    start = next((i for i, (_, values) in enumerate(rows) if any(values)), None)
    if start is None:
        raise DatasetError(f"{path}: its first sheet is empty")
    return rows_table(path, rows[start][1], rows[start + 1:], required)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def read(src: Path, options: Options, progress: bool = False) -> Imported:
    path = clinical_file(src)
    table = read_xlsx(path, REQUIRED) if path.suffix.lower() == ".xlsx" else read_csv(path, REQUIRED)
    imported = Imported("cmmd", {}, [], Tally(), official_split=False,
                        site_label="manufacturer" if options.sites_by else "")
    classes: dict[tuple[str, str], set[str]] = defaultdict(set)
    for row in table.rows:
        patient, laterality = row["ID1"], side(row["LeftRight"])
        classification = CLASSIFICATION.get(row["classification"].upper())
        if not patient or laterality is None:
            imported.skipped.add("clinical row without ID1 or LeftRight L/R", row.where)
            continue
        if classification is None:
            imported.skipped.add("clinical row with classification not Benign or Malignant",
                                 f"{row.where} ({row['classification']!r})")
            continue
        classes[patient, laterality].add(classification)
    for (patient, laterality), found in classes.items():
        if len(found) > 1:
            imported.changed.add("breast with a benign and a malignant clinical row: malignant",
                                 f"{patient} {laterality}")
        pathology = "malignant" if "malignant" in found else "benign"
        imported.breasts[patient, laterality] = Breast(patient, patient, laterality, pathology)
    _images(src, path, {p for p, _ in classes}, imported, bool(options.sites_by), progress)
    imported.notes.append("CMMD has no BI-RADS, density or symptoms: those columns are empty")
    return imported


def _images(src: Path, clinical: Path, patients: set[str], imported: Imported, by_manufacturer: bool,
            progress: bool) -> None:
    files = sorted(os.path.join(here, name) for here, dirs, names in os.walk(src)
                   for name in names if name.lower().endswith(".dcm") and not name.startswith("."))
    sites: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for path in tqdm(files, desc="cmmd: headers", unit="file", disable=not progress):
        relative = Path(path).relative_to(src).parts
        try:
            laterality, view, patient_tag, manufacturer = _header(Path(path))
        except _Skip as skip:
            imported.skipped.add(skip.reason, f"{path} ({skip.detail})" if skip.detail else path)
            continue
        patient = next((part for part in relative[:-1] if part in patients), patient_tag)
        if patient not in patients:
            imported.skipped.add("image of a patient without a clinical row", path)
            continue
        if (patient, laterality) not in imported.breasts:
            imported.skipped.add("image of a breast without a clinical row (CMMD describes only breasts with "
                                 "a finding)", path)
            continue
        imported.images.append(Image(absolute(Path(path)), patient, patient, laterality, view))
        sites[patient, laterality][manufacturer or "unknown"] += 1
    if by_manufacturer:
        for key, breast in imported.breasts.items():
            votes = sites.get(key)
            if votes:
                breast.site = min(votes, key=lambda name: (-votes[name], name))


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _header(path: Path) -> tuple[str, str, str, str]:
    """(laterality, view, PatientID, Manufacturer) of one file, or _Skip saying why it is skipped. Through
    the project's own reader (`common.dicom.read_header`); a file it refuses only for not being MG (SOP
    class, Modality) or for a missing UID is read tag by tag."""
    import pydicom

    from common.dicom import DicomError, read_header

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["PatientID", "Manufacturer", "ImageLaterality", "Laterality",
                                            "ViewPosition", "ViewCodeSequence"])
    except Exception as exc:  # not DICOM, or damaged
        raise _Skip("not a DICOM file", f"{type(exc).__name__}: {exc}") from None
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()
    patient = str(ds.get("PatientID", "") or "").strip()
    try:
        header = read_header(path)
    except DicomError as exc:
        if not exc.reason.startswith(("not MG", "missing tag")):
            kind, _, detail = exc.reason.partition(":")
            raise _Skip(f"{kind} (common.dicom)", detail.strip()) from None
        laterality, view = _laterality(ds), _view(ds)
    else:
        laterality, view = header.laterality, header.projection
    if laterality is None:
        raise _Skip("no laterality: no ImageLaterality or Laterality tag")
    if view not in VIEWS:
        raise _Skip(f"view {view or 'missing'}: not CC or MLO")
    return laterality, view, patient, manufacturer


def _laterality(ds) -> str | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = side(str(ds.get(keyword, "") or ""))
        if value:
            return value
    return None


def _view(ds) -> str:
    position = str(ds.get("ViewPosition", "") or "").strip().upper()
    if position:
        return position
    for item in ds.get("ViewCodeSequence") or []:
        code = str(item.get("CodeValue", "") or "")
        if code in VIEW_CODES:
            return VIEW_CODES[code]
        meaning = str(item.get("CodeMeaning", "") or "").lower()
        if "cranio-caudal" in meaning and "exaggerated" not in meaning:
            return "CC"
        if "medio-lateral oblique" in meaning:
            return "MLO"
        return meaning or code
    return ""
