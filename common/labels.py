"""A site's labels CSV: one row per exam (one breast of one study).

Required columns: patient_id, study_uid, laterality (L/R), pathology (benign/malignant), birads (2–5 as
read clinically; 4A/4B/4C count as 4), density (a–d), symptomatic (0/1), split (train/val/test).
Any further column is a reader's read of the exam (BI-RADS 2–5 with 4A/4B/4C, 0/1 or a 0–100 score),
kept as text and analysed by `common.stats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REQUIRED_COLUMNS = (
    "patient_id", "study_uid", "laterality", "pathology", "birads", "density", "symptomatic", "split",
)
SPLITS = ("train", "val", "test")


def exam_id(study_uid: str, laterality: str) -> str:
    """The key of one breast of one study, the unit that is labelled, trained on and scored."""
    return f"{study_uid}_{laterality}"


@dataclass(frozen=True)
class ExamLabel:
    patient_id: str
    study_uid: str
    laterality: str
    malignant: bool
    birads: int
    density: str
    symptomatic: bool
    split: str
    readers: dict[str, str] = field(default_factory=dict)

    @property
    def exam_id(self) -> str:
        return exam_id(self.study_uid, self.laterality)

    @property
    def dense(self) -> bool:
        """BI-RADS density c/d, as the study splits its subgroups."""
        return self.density in ("c", "d")
