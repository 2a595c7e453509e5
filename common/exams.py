"""A site folder's DICOM views grouped into exams: the CC and MLO of one breast of one study."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.labels import ExamLabel


@dataclass(frozen=True)
class Rejection:
    """Something the site has that cannot be used, and why. `source` is a file path, a labels-CSV row
    (`labels.csv:12`) or an exam id."""

    source: str
    reason: str


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
