"""A site folder's DICOM views grouped into exams: the CC and MLO of one breast of one study.

`scan_site` reads every file's header (no pixel data); `pair_exams` groups the views per StudyInstanceUID
and laterality, attaches the labels and, with `bilateral`, the other breast's views. Whatever cannot be
used becomes a `Rejection`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from common.labels import ExamLabel, exam_id
from common.rejection import Rejection

if TYPE_CHECKING:
    from common.dicom import Header

LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class Exam:
    label: ExamLabel
    cc: Path
    mlo: Path
    contra_cc: Path | None = None
    contra_mlo: Path | None = None

    @property
    def exam_id(self) -> str:
        return self.label.exam_id

    @property
    def paths(self) -> list[Path]:
        """The views in model input order: CC, MLO, then the contralateral CC and MLO when present."""
        return [p for p in (self.cc, self.mlo, self.contra_cc, self.contra_mlo) if p is not None]


def site_files(root: Path, skip: Iterable[Path] = ()) -> list[Path]:
    """Every file below `root` in path order, except labels.csv, hidden files and folders, and the
    folders in `skip` (e.g. a cache kept inside the site folder)."""
    skipped = {p.resolve() for p in skip}
    files = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skipped)
        names = [n for n in sorted(names) if not n.startswith(".")]
        files += [here / n for n in names if not (here == root and n == LABELS_FILE)]
    return sorted(files)


def scan_site(root: Path, skip: Iterable[Path] = (),
              progress: bool = False) -> tuple[list[Header], list[Rejection]]:
    """The header of every mammography view below `root`; every other file, and every repeated
    SOPInstanceUID after its first file, is rejected."""
    # Imported here: a federated message whose site is unchanged never reads a header (`client.prepare`),
    # and pydicom with its codecs is a second of every ClientApp process's start-up.
    from common.dicom import DicomError, read_header

    headers: list[Header] = []
    rejections: list[Rejection] = []
    first_of: dict[str, Path] = {}
    for path in tqdm(site_files(root, skip), desc=f"{root.name}: headers", unit="file", disable=not progress):
        if not path.is_file():
            rejections.append(Rejection(str(path), "unreadable file: not a regular file"))
            continue
        try:
            header = read_header(path)
        except DicomError as exc:
            rejections.append(Rejection(str(path), exc.reason))
            continue
        first = first_of.setdefault(header.sop_instance_uid, path)
        if first != path:
            rejections.append(Rejection(str(path), f"duplicate SOPInstanceUID: {header.sop_instance_uid} "
                                                   f"is also {first}"))
            continue
        headers.append(header)
    return headers, rejections


def _other(laterality: str) -> str:
    return "R" if laterality == "L" else "L"


def _choose(candidates: list[Header], exam: str, view: str, rejections: list[Rejection]) -> Header:
    """One image for a view, deterministically: the standard projection before substitutes, For
    Presentation before For Processing, then the first path."""
    ordered = sorted(candidates, key=lambda h: (h.rank, h.for_processing, str(h.path)))
    for other in ordered[1:]:
        rejections.append(Rejection(str(other.path), f"several images: {view} of exam {exam} has several; "
                                                     f"kept {ordered[0].path}"))
    return ordered[0]


def pair_exams(headers: Iterable[Header], labels: Mapping[str, ExamLabel],
               bilateral: bool = False) -> tuple[list[Exam], list[Rejection]]:
    """Exams of the labelled breasts, in label order, from views whose laterality is known.

    Rejected: label rows without images, exams lacking CC or MLO (or, with `bilateral`, the other breast's
    CC or MLO), surplus images of a view, and images of breasts with no label row whose other breast has
    none either (the other breast of a labelled one is its contralateral, not unlabelled).
    """
    groups: dict[tuple[str, str], dict[str, list[Header]]] = defaultdict(lambda: defaultdict(list))
    for header in headers:
        if header.laterality is None:
            raise ValueError(f"{header.path}: laterality must be known before pairing")
        groups[header.study_instance_uid, header.laterality][header.view].append(header)

    rejections: list[Rejection] = []
    chosen: dict[tuple[str, str], dict[str, Header]] = {}

    def views_of(study: str, laterality: str) -> dict[str, Header]:
        key = study, laterality
        if key not in chosen:
            found = groups.get(key, {})
            chosen[key] = {v: _choose(h, exam_id(*key), v, rejections) for v, h in found.items()}
        return chosen[key]

    exams = []
    for key, label in labels.items():
        if (label.study_uid, label.laterality) not in groups:
            rejections.append(Rejection(key, f"label row without images: no DICOM view has StudyInstanceUID "
                                             f"{label.study_uid} and laterality {label.laterality} "
                                             f"(patient {label.patient_id})"))
            continue
        own = views_of(label.study_uid, label.laterality)
        missing = [v for v in ("CC", "MLO") if v not in own]
        if missing:
            found = ", ".join(f"{v} {h.path}" for v, h in own.items())
            rejections.append(Rejection(key, f"incomplete exam: no {' or '.join(missing)} view "
                                             f"(has {found})"))
            continue
        contra = views_of(label.study_uid, _other(label.laterality)) if bilateral else {}
        missing = [f"{_other(label.laterality)} {v}" for v in ("CC", "MLO") if bilateral and v not in contra]
        if missing:
            rejections.append(Rejection(key, f"contralateral views missing: no {' or '.join(missing)} "
                                             "(needed with bilateral = true)"))
            continue
        exams.append(Exam(label, own["CC"].path, own["MLO"].path,
                          contra["CC"].path if contra else None, contra["MLO"].path if contra else None))

    for (study, laterality), found in groups.items():
        if exam_id(study, laterality) in labels or exam_id(study, _other(laterality)) in labels:
            continue
        reason = f"image without label: no labels.csv row for study {study}, laterality {laterality}"
        rejections += [Rejection(str(h.path), reason) for views in found.values() for h in views]
    return exams, rejections
