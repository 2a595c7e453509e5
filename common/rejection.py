"""What a site has that cannot be used, and why: one record for files, labels rows and exams, which
`fedmammo check` reports and training skips."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rejection:
    """Something the site has that cannot be used, and why. `source` is a file path, a labels-CSV row
    (`labels.csv:12`) or an exam id."""

    source: str
    reason: str

    @property
    def kind(self) -> str:
        """The reason's category: the text before its first colon ('not DICOM', 'incomplete exam', ...)."""
        return self.reason.partition(":")[0]
