"""RSNA Screening Mammography Breast Cancer Detection (2022): `train.csv` and `train_images/`.

One `train.csv` row per image (`site_id, patient_id, image_id, laterality, view, age, cancer, biopsy,
invasive, BIRADS, implant, density, machine_id, difficult_negative_case`); the image is
`train_images/<patient_id>/<image_id>.dcm`, its header stripped (pairing comes from the CSV). One study per
patient: the exam key is (patient, laterality), and `study_uid` is the patient id. Mappings
(docs/datasets.md): `cancer` 1 → malignant; `cancer` 0 with `biopsy` 1 → benign (biopsied, no cancer);
`cancer` 0 and `biopsy` 0 → no pathology (screened negative, never biopsied: no reference standard);
`BIRADS` 0/1/2 as is; `density` A–D → a–d; sites by `site_id` (default) or `machine_id`; no split in the
data, so a seeded split by patient.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from common.datasets.importer import (
    Breast,
    DatasetError,
    Image,
    Imported,
    Options,
    Tally,
    absolute,
    agreed,
    image_row,
    number,
    read_csv,
)

DESCRIPTION = "RSNA Screening Mammography Breast Cancer Detection: train.csv + train_images/"
SITES_BY = ("", "site_id", "machine_id")
"""'' = site_id."""
OFFICIAL_SPLIT = False
CSV = "train.csv"
IMAGES = "train_images"
REQUIRED = ("site_id", "patient_id", "image_id", "laterality", "view", "cancer", "biopsy", "BIRADS",
            "density", "machine_id")


def read(src: Path, options: Options, progress: bool = False) -> Imported:
    table = read_csv(src / CSV, REQUIRED)
    folder = src / IMAGES
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not found; RSNA keeps its images in "
                           f"{IMAGES}/<patient_id>/<image_id>.dcm beside {CSV}")
    site_column = options.sites_by or "site_id"
    imported = Imported("rsna", {}, [], Tally(), official_split=False, site_label=site_column)
    rows_of: dict[tuple[str, str], list] = defaultdict(list)
    for row in table.rows:
        if (checked := image_row(row, "patient_id", "laterality", "view", imported)) is None:
            continue
        (laterality, view), patient, image_id = checked, row["patient_id"], row["image_id"]
        cancer, biopsy = number(row["cancer"]), number(row["biopsy"])
        if cancer not in (0, 1) or biopsy not in (0, 1):
            imported.skipped.add("row with cancer or biopsy not 0/1", row.where)
            continue
        path = folder / patient / f"{image_id}.dcm"
        if not path.is_file():
            imported.skipped.add("image file missing", str(path))
            continue
        rows_of[patient, laterality].append(row)
        imported.images.append(Image(absolute(path), patient, patient, laterality, view))

    for (patient, laterality), rows in rows_of.items():
        name = f"{patient} {laterality}"
        cancer = max(number(r["cancer"]) or 0 for r in rows)
        biopsy = max(number(r["biopsy"]) or 0 for r in rows)
        pathology = "malignant" if cancer else "benign" if biopsy else ""
        birads = agreed((_birads(r["BIRADS"], r.where, imported) for r in rows), "BI-RADS", name, imported)
        density = agreed((_density(r["density"], r.where, imported) for r in rows), "density", name, imported)
        site = agreed((r[site_column] for r in rows), site_column, name, imported)
        key = f"{site_column.removesuffix('_id')}-{site or 'unknown'}"
        imported.breasts[patient, laterality] = Breast(patient, patient, laterality, pathology, birads,
                                                       density, site=key)
    negative = sum(1 for b in imported.breasts.values() if not b.pathology)
    if negative:
        imported.notes.append(f"{negative} breast(s) with cancer 0 and biopsy 0 have no pathology (screened "
                              "negative, never biopsied: no reference standard); see docs/datasets.md")
    return imported


def _birads(value: str, where: str, imported: Imported) -> str:
    """BIRADS 0 (recall), 1 (negative), 2 (benign) as written ('1.0' = 1); empty stays empty."""
    n = number(value)
    if n is not None and 0 <= n <= 6:
        return str(n)
    if value:
        imported.changed.add("BIRADS not a category 0–6: left empty", f"{where} ({value!r})")
    return ""


def _density(value: str, where: str, imported: Imported) -> str:
    """A–D → a–d; empty stays empty."""
    if value.lower() in ("a", "b", "c", "d"):
        return value.lower()
    if value:
        imported.changed.add("density not A–D: left empty", f"{where} ({value!r})")
    return ""
