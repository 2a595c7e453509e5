"""A site folder's DICOM views grouped into exams: the CC and MLO of one breast of one study.

`scan_files` reads every file's header (no pixel data); `pair_exams` groups the views per StudyInstanceUID
and laterality, attaches the labels and, with `bilateral`, the other breast's views. Whatever cannot be
used becomes a `Rejection`.

A combination study (2D views and tomosynthesis in one visit) may hold an acquired and a generated 2D image
(`Header.generated`: synthesized from the tomosynthesis, e.g. C-View) of the same breast and projection;
`generated_2d` (`[data] generated_2d`) says which one fills the view: `avoid` (default) the acquired one,
`prefer` the generated one, `only` the generated one alone (acquired images are rejected).
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
from common.manifest import MANIFEST_FILE, Listed, entry
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
    """Every file below `root` in path order, except labels.csv, images.csv, hidden files and folders, and
    the folders in `skip` (e.g. a cache kept inside the site folder)."""
    skipped = {p.resolve() for p in skip}
    files = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skipped)
        names = [n for n in sorted(names) if not n.startswith(".")]
        files += [here / n for n in names if not (here == root and n in (LABELS_FILE, MANIFEST_FILE))]
    return sorted(files)


def with_listed(files: Iterable[Path], listed: Mapping[Path, Listed]) -> list[Path]:
    """`files` and the manifest's files that are not among them (those outside the site folder)."""
    files = list(files)
    if not listed:
        return files
    seen = {f.resolve() for f in files}
    return files + sorted(p for p in listed if p not in seen)


def scan_files(files: Iterable[Path], listed: Mapping[Path, Listed] | None = None, progress: bool = False,
               desc: str = "headers") -> tuple[list[Header], list[Rejection]]:
    """The header of every mammography view among `files` (a manifest-listed file: any single-frame
    greyscale image, with the manifest's study, laterality and view); every other file, and every repeated
    SOPInstanceUID after its first file, is rejected."""
    # Imported here: a federated message whose site is unchanged never reads a header (`client.prepare`),
    # and pydicom with its codecs is a second of every ClientApp process's start-up.
    from common.dicom import DicomError, read_header

    listed = listed or {}
    headers: list[Header] = []
    rejections: list[Rejection] = []
    first_of: dict[str, Path] = {}
    for path in tqdm(list(files), desc=desc, unit="file", disable=not progress):
        if not path.is_file():
            rejections.append(Rejection(str(path), "unreadable file: not a regular file"))
            continue
        try:
            header = read_header(path, entry(listed, path))
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


def _kind(header: Header) -> str:
    return "generated 2D" if header.generated else "acquired 2D"


def _choose(candidates: list[Header], exam: str, view: str, rejections: list[Rejection],
            generated_2d: str = "avoid") -> Header | None:
    """One image for a view, deterministically: the standard projection before substitutes, then acquired
    before generated 2D (`generated_2d` 'avoid') or generated before acquired ('prefer'), For Presentation
    before For Processing, then the first path. With 'only', acquired images are rejected, and None is
    returned when no generated one is left."""
    if generated_2d not in ("avoid", "prefer", "only"):
        raise ValueError(f"generated_2d must be avoid, prefer or only, not {generated_2d!r}")
    if generated_2d == "only":
        for header in candidates:
            if not header.generated:
                rejections.append(Rejection(str(header.path), "acquired 2D view: generated_2d = only "
                                                              f"(the {view} of exam {exam})"))
        candidates = [h for h in candidates if h.generated]
        if not candidates:
            return None
    acquired_first = generated_2d == "avoid"
    ordered = sorted(candidates, key=lambda h: (h.rank, h.generated == acquired_first, h.for_processing,
                                                str(h.path)))
    kept = ordered[0]
    for other in ordered[1:]:
        rejections.append(Rejection(str(other.path), f"several images: {view} of exam {exam} has several; "
                                                     f"kept {kept.path} ({_kind(kept)}) over this "
                                                     f"{_kind(other)} image"))
    return kept


def unlabelled(headers: Iterable[Header]) -> dict[str, ExamLabel]:
    """A label without targets for every breast the views show, in study and laterality order: new
    patients' studies are exams to score, not to train on or evaluate."""
    labels = {}
    for header in sorted(headers, key=lambda h: (h.study_instance_uid, h.laterality or "", str(h.path))):
        key = exam_id(header.study_instance_uid, str(header.laterality))
        labels.setdefault(key, ExamLabel(header.patient_id, header.study_instance_uid, str(header.laterality),
                                         malignant=None, birads=None, density="", symptomatic=None, split=""))
    return labels


def pair_exams(headers: Iterable[Header], labels: Mapping[str, ExamLabel] | None,
               bilateral: bool = False, generated_2d: str = "avoid") -> tuple[list[Exam], list[Rejection]]:
    """Exams of the labelled breasts, in label order, from views whose laterality is known; with `labels`
    None (a folder without labels.csv), of every breast the views show (`unlabelled`). Of several images
    of one view, `_choose` keeps one (`generated_2d`: see the module docstring).

    Rejected: label rows without images, exams lacking CC or MLO (or, with `bilateral`, the other breast's
    CC or MLO), surplus images of a view, and images of breasts with no label row whose other breast has
    none either (the other breast of a labelled one is its contralateral, not unlabelled).
    """
    headers = list(headers)
    groups: dict[tuple[str, str], dict[str, list[Header]]] = defaultdict(lambda: defaultdict(list))
    for header in headers:
        if header.laterality is None:
            raise ValueError(f"{header.path}: laterality must be known before pairing")
        groups[header.study_instance_uid, header.laterality][header.view].append(header)
    if labels is None:
        labels = unlabelled(headers)

    rejections: list[Rejection] = []
    chosen: dict[tuple[str, str], dict[str, Header]] = {}

    def views_of(study: str, laterality: str) -> dict[str, Header]:
        key = study, laterality
        if key not in chosen:
            found = groups.get(key, {})
            picks = {v: _choose(h, exam_id(*key), v, rejections, generated_2d) for v, h in found.items()}
            chosen[key] = {v: h for v, h in picks.items() if h is not None}
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
            only = [v for v in missing if v in groups[label.study_uid, label.laterality]]
            why = f"; its acquired {' and '.join(only)} rejected: generated_2d = only" if only else ""
            rejections.append(Rejection(key, f"incomplete exam: no {' or '.join(missing)} view "
                                             f"(has {found or 'none'}){why}"))
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
