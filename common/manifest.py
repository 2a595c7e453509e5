"""A site's image manifest, `images.csv`: what each listed image is, whatever its header says or lacks.

Public datasets strip headers (no laterality, view or usable StudyInstanceUID), store digitized films as
Secondary Capture, and key exams by their own ids; hospitals' exports are no better. A site folder may
therefore hold `images.csv`, one row per image:

| column | values | meaning |
|---|---|---|
| `path` | file path | relative to the site folder, or absolute (the dataset stays where it is) |
| `study_uid` | text | the exam key `labels.csv` uses for this image's study |
| `laterality` | `L` / `R` | the breast |
| `view` | `CC` / `MLO` | the projection |
| `patient_id` | text, optional | the patient (checked against labels.csv's) |

A listed image takes these values and is read whatever its SOP class or Modality (digitized film,
Secondary Capture), provided it is one greyscale frame (`common.dicom`). Unlisted files are read as usual.
A bad row is a rejection naming `images.csv:LINE` and the column; a row whose file is missing is one too.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.rejection import Rejection

MANIFEST_FILE = "images.csv"
REQUIRED = ("path", "study_uid", "laterality", "view")


class ManifestError(ValueError):
    """images.csv as a whole cannot be used (unreadable, required columns absent)."""


@dataclass(frozen=True)
class Listed:
    """What the manifest says about one image."""

    study_uid: str
    laterality: str
    view: str
    patient_id: str = ""


def read_manifest(root: Path) -> tuple[dict[Path, Listed], list[Rejection]]:
    """The site folder's images.csv as {absolute file path: Listed}, and its bad rows; ({}, []) when the
    folder has none. A file listed twice keeps its first row."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        return {}, []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the image manifest: {exc}") from exc
    first = text.splitlines()[0] if text.strip() else ""
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(first, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.DictReader(io.StringIO(text), dialect=dialect)
    reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    if missing := [c for c in REQUIRED if c not in reader.fieldnames]:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)} (found: "
                            f"{', '.join(reader.fieldnames) or 'none'})")
    listed: dict[Path, Listed] = {}
    rejections = []
    for row in reader:
        where = f"{MANIFEST_FILE}:{reader.line_num}"
        values = {k: (row.get(k) or "").strip() for k in (*REQUIRED, "patient_id")}
        if not any(values.values()):
            continue
        problem = _problem(values)
        file = Path(values["path"]) if Path(values["path"]).is_absolute() else Path(root) / values["path"]
        if problem is None and not file.is_file():
            problem = f"file {values['path']} does not exist"
        if problem is not None:
            rejections.append(Rejection(where, f"invalid manifest row: {problem}"))
            continue
        key = file.resolve()
        if key in listed:
            rejections.append(Rejection(where, f"invalid manifest row: {values['path']} is listed twice"))
            continue
        listed[key] = Listed(values["study_uid"], values["laterality"].upper(), values["view"].upper(),
                             values["patient_id"])
    return listed, rejections


def entry(listed: Mapping[Path, Listed], path: Path) -> Listed | None:
    """What the manifest says of `path` (None when it does not list it); no path is resolved for a site
    without a manifest, which is every federated message's path through the site's files."""
    return listed.get(path.resolve()) if listed else None


def _problem(values: dict[str, str]) -> str | None:
    for column in ("path", "study_uid"):
        if not values[column]:
            return f"column {column}: empty"
    if values["laterality"].upper() not in ("L", "R"):
        return f"column laterality: {values['laterality']!r} is not one of L, R"
    if values["view"].upper() not in ("CC", "MLO"):
        return f"column view: {values['view']!r} is not one of CC, MLO"
    return None
