"""VinDr-Mammo (PhysioNet): `breast-level_annotations.csv`, `finding_annotations.csv`, `metadata.csv` and
`images/<study_id>/<image_id>.dicom`.

One `breast-level_annotations.csv` row per image (`study_id, series_id, image_id, laterality,
view_position, height, width, breast_birads, breast_density, split`). The exam key is (study_id,
laterality); VinDr publishes no patient key, so the study is the patient. Mappings (docs/datasets.md):
"BI-RADS 4" → 4; "DENSITY C" → c; split "training" → train, "test" → test (val only with `--val-fraction`,
drawn from training studies); no pathology (VinDr has none). Sites: one, or one per manufacturer
(`--sites-by manufacturer`, from metadata.csv, else the image's header).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
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
    read_csv,
    side,
)

DESCRIPTION = "VinDr-Mammo: breast-level_annotations.csv, finding_annotations.csv, metadata.csv, images/"
SITES_BY = ("", "manufacturer")
OFFICIAL_SPLIT = True
BREASTS = "breast-level_annotations.csv"
FINDINGS = "finding_annotations.csv"
METADATA = "metadata.csv"
IMAGES = "images"
REQUIRED = ("study_id", "image_id", "laterality", "view_position", "breast_birads", "breast_density", "split")
SPLITS = {"training": "train", "train": "train", "test": "test"}


def read(src: Path, options: Options, progress: bool = False) -> Imported:
    table = read_csv(src / BREASTS, REQUIRED)
    folder = src / IMAGES
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not found; VinDr-Mammo keeps its images in "
                           f"{IMAGES}/<study_id>/<image_id>.dicom beside {BREASTS}")
    imported = Imported("vindr", {}, [], Tally(), official_split=True,
                        site_label="manufacturer" if options.sites_by else "")
    manufacturer_of = _manufacturers(src, imported) if options.sites_by else None
    rows_of: dict[tuple[str, str], list] = defaultdict(list)
    sites: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for row in table.rows:
        if (checked := image_row(row, "study_id", "laterality", "view_position", imported)) is None:
            continue
        (laterality, view), study, image_id = checked, row["study_id"], row["image_id"]
        if row["split"].lower() not in SPLITS:
            imported.skipped.add("split not 'training' or 'test'", f"{row.where} ({row['split']!r})")
            continue
        path = folder / study / f"{image_id}.dicom"
        if not path.is_file():
            imported.skipped.add("image file missing", str(path))
            continue
        rows_of[study, laterality].append(row)
        imported.images.append(Image(absolute(path), study, study, laterality, view))
        if manufacturer_of is not None:
            sites[study, laterality][_manufacturer(row, path, manufacturer_of, imported)] += 1

    for (study, laterality), rows in rows_of.items():
        name = f"{study} {laterality}"
        birads = agreed((_birads(r["breast_birads"], r.where, imported) for r in rows), "BI-RADS", name,
                        imported)
        density = agreed((_density(r["breast_density"], r.where, imported) for r in rows), "density", name,
                         imported)
        split = agreed((SPLITS[r["split"].lower()] for r in rows), "split", name, imported) or "test"
        votes = sites[study, laterality]
        site = min(votes, key=lambda key: (-votes[key], key)) if votes else ""
        imported.breasts[study, laterality] = Breast(study, study, laterality, "", birads, density, "", split,
                                                     site)
    _findings(src, imported)
    return imported


def _birads(value: str, where: str, imported: Imported) -> str:
    """'BI-RADS 4' → '4' (also '4A'…'4C' if written); empty stays empty."""
    match = re.fullmatch(r"(?:BI-?RADS)?\s*([0-6])\s*([ABC]?)", value.strip().upper())
    if match:
        return match.group(1) + match.group(2)
    if value:
        imported.changed.add("breast_birads not 'BI-RADS 0'–'BI-RADS 6': left empty", f"{where} ({value!r})")
    return ""


def _density(value: str, where: str, imported: Imported) -> str:
    """'DENSITY C' → 'c'; empty stays empty."""
    match = re.fullmatch(r"(?:DENSITY)?\s*([ABCD])", value.strip().upper())
    if match:
        return match.group(1).lower()
    if value:
        imported.changed.add("breast_density not 'DENSITY A'–'DENSITY D': left empty", f"{where} ({value!r})")
    return ""


def _manufacturers(src: Path, imported: Imported) -> dict[str, dict[str, str]]:
    """Manufacturer by image id, series id and study id, from metadata.csv where it has them."""
    path = src / METADATA
    if not path.is_file():
        imported.notes.append(f"{METADATA} not found: each image's manufacturer is read from its header")
        return {}
    table = read_csv(path)
    column = table.first_of("Manufacturer", "manufacturer name")
    if column is None:
        raise DatasetError(f"{path}: no Manufacturer column, needed for --sites-by manufacturer (found: "
                           f"{', '.join(table.columns)})")
    keys = {
        "image": table.first_of("SOP Instance UID", "image_id", "SOPInstanceUID"),
        "series": table.first_of("Series Instance UID", "series_id", "SeriesInstanceUID"),
        "study": table.first_of("Study Instance UID", "study_id", "StudyInstanceUID"),
    }
    if not any(keys.values()):
        raise DatasetError(f"{path}: no image, series or study id column (SOP Instance UID, Series Instance "
                           f"UID, Study Instance UID) to find each image's manufacturer by")
    out: dict[str, dict[str, str]] = {level: {} for level in keys}
    for row in table.rows:
        for level, key in keys.items():
            if key and row[key] and row[column]:
                out[level].setdefault(row[key], row[column])
    return out


def _manufacturer(row, path: Path, known: dict[str, dict[str, str]], imported: Imported) -> str:
    for level, column in (("image", "image_id"), ("series", "series_id"), ("study", "study_id")):
        value = known.get(level, {}).get(row[column])
        if value:
            return value
    from_header = _header_manufacturer(path)
    if from_header:
        imported.changed.add(f"manufacturer not in {METADATA}: read from the image's header", str(path))
        return from_header
    imported.changed.add("manufacturer unknown (neither metadata.csv nor header): site 'unknown'", str(path))
    return "unknown"


def _header_manufacturer(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer"])
        return str(ds.get("Manufacturer", "") or "").strip()
    except Exception:  # not DICOM or damaged: the manufacturer is simply unknown
        return ""


def _findings(src: Path, imported: Imported) -> None:
    """finding_annotations.csv: which breasts have a finding (counted, not written: labels.csv has no
    column for findings, and they are no pathology)."""
    path = src / FINDINGS
    if not path.is_file():
        imported.notes.append(f"{FINDINGS} not found (not needed: labels come from {BREASTS})")
        return
    table = read_csv(path, ("study_id", "laterality", "finding_categories"))
    found = set()
    for row in table.rows:
        categories = re.findall(r"[A-Za-z][A-Za-z ]*[A-Za-z]", row["finding_categories"])
        laterality = side(row["laterality"])
        if laterality and any(c.lower() != "no finding" for c in categories):
            found.add((row["study_id"], laterality))
    exams = sum(1 for key in imported.breasts if key in found)
    imported.notes.append(f"{exams} breast(s) have a finding in {FINDINGS} (mass, calcification, …): kept in "
                          "the dataset, not written (no pathology, no labels.csv column)")
